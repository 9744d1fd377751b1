"""load_adapter on every pipeline kind; SDXL end to end (two text encoders, LoRA export)."""
import pytest
import torch

from loldu_diffusion import LoLDUConfig, inject_loldu, load_adapter, loldu_parameters, save_adapter
from loldu_diffusion.config import DEFAULT_TEXT_ENCODER_TARGETS
from loldu_diffusion.export import export_lora


def perturbed_adapter(pipe, path, seed=0):
    inject_loldu(pipe, LoLDUConfig(rank=4, init="uniform", text_encoder_targets=DEFAULT_TEXT_ENCODER_TARGETS))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in loldu_parameters(pipe):
            p.add_(0.2 * torch.randn_like(p))
    save_adapter(pipe, str(path))


def xl_unet_out(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    c = torch.randn(1, 7, 64, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([300]), c, added_cond_kwargs=added).sample


@pytest.mark.parametrize("kind", ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"])
def test_sd_pipeline_siblings(tiny_sd_path, tmp_path, kind):
    import diffusers
    from PIL import Image

    src = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    perturbed_adapter(src, tmp_path / "a.safetensors")
    pipe = getattr(diffusers, kind).from_pretrained(tiny_sd_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    load_adapter(pipe, str(tmp_path / "a.safetensors"))
    kw = dict(num_inference_steps=2, height=16, width=16, output_type="np", generator=torch.Generator().manual_seed(0))
    if kind != "StableDiffusionPipeline":
        kw.update(image=Image.new("RGB", (16, 16), (200, 20, 20)), strength=0.9)
    if kind == "StableDiffusionInpaintPipeline":
        kw["mask_image"] = Image.new("L", (16, 16), 255)
    with_adapter = pipe("a photo of sks heart", **kw).images
    from loldu_diffusion import loldu_disabled

    kw["generator"] = torch.Generator().manual_seed(0)
    with loldu_disabled(pipe):
        without = pipe("a photo of sks heart", **kw).images
    assert with_adapter.shape == without.shape and abs(with_adapter - without).max() > 1e-4


def test_sdxl_end_to_end(tiny_sdxl_path, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    perturbed_adapter(pipe, tmp_path / "xl.safetensors")
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    f = load_adapter(fresh, str(tmp_path / "xl.safetensors"))
    assert set(f.layers) == {"unet", "text_encoder", "text_encoder_2"} and f.metadata["base_architecture"].startswith("sdxl")
    assert torch.allclose(xl_unet_out(fresh), xl_unet_out(pipe), atol=1e-5)
    # exact LoRA export, loaded by diffusers' own SDXL loader, for both formats
    for fmt in ("diffusers", "kohya"):
        out = tmp_path / f"xl_{fmt}.safetensors"
        export_lora(fresh, str(out), fmt)
        lora = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
        lora.load_lora_weights(str(out))
        assert torch.allclose(xl_unet_out(lora), xl_unet_out(fresh), rtol=1e-4, atol=1e-5), fmt
        ids = lora.tokenizer_2(["a photo of sks heart"], padding="max_length", max_length=24, return_tensors="pt").input_ids
        with torch.no_grad():
            assert torch.allclose(lora.text_encoder_2(ids)[0], fresh.text_encoder_2(ids)[0], atol=1e-4), fmt
    img2img = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl_path)
    load_adapter(img2img, str(tmp_path / "xl.safetensors"))
    assert torch.allclose(xl_unet_out(img2img), xl_unet_out(pipe), atol=1e-5)
    # an SD 1.x adapter on an SDXL base is refused with a clear message
    from loldu_diffusion import AdapterFileError

    with pytest.raises(AdapterFileError, match="different architecture"):
        from pipelines import make_tiny_sd
        from diffusers import StableDiffusionPipeline

        sd = StableDiffusionPipeline.from_pretrained(make_tiny_sd(str(tmp_path / "sd")), safety_checker=None)
        perturbed_adapter(sd, tmp_path / "sd.safetensors")
        load_adapter(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path), str(tmp_path / "sd.safetensors"))
