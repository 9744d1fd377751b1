"""Single-file checkpoints (.safetensors / .ckpt in the original LDM layout): each family loads
offline as the model it was written from; the shipped configs are the real models'; bad files
are one line; the trainer, the CLI and the app take a file as they take a folder."""
import json
import os
import re
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm_checkpoints import FAMILIES, ldm_state_dict, tiny_pipeline, write_configs
from loldu_diffusion.single_file import (CONFIGS_ENV, SingleFileError, checkpoint_family, config_folder, family_of_keys,
                                         load_single_file)

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with openai/clip-vit-large-patch14's tokenizer


def _lightning_ckpt(state: dict, path, step: int) -> None:
    """A .ckpt as original SD training wrote them: the weights under state_dict, the step as a
    numpy scalar, and PyTorch Lightning's ModelCheckpoint (its class as a key, and an object)."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    fakes = {n: types.ModuleType(n) for n in names}
    fakes[names[-1]].ModelCheckpoint = cls
    before = {n: sys.modules.get(n) for n in names}
    sys.modules.update(fakes)
    try:
        callback = cls()
        callback.best_model_path, callback.monitor = "/logs/last.ckpt", None
        torch.save({"state_dict": state, "global_step": np.int64(step), "epoch": 6, "callbacks": {cls: {"best": callback}}}, str(path))
    finally:
        for n, m in before.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


@pytest.fixture(scope="module")
def singles(tmp_path_factory):
    """Per family: the tiny pipeline, its .safetensors and .ckpt; and the tiny config folders."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for fam in FAMILIES:
        pipe = tiny_pipeline(fam)
        write_configs(pipe, fam, str(root / "configs" / fam))
        state = ldm_state_dict(pipe, fam)
        save_file(state, str(root / f"{fam}.safetensors"))
        if fam == "sd1":
            _lightning_ckpt(state, root / f"{fam}.ckpt", step=470000)
        else:
            torch.save({"state_dict": state}, str(root / f"{fam}.ckpt"))
        out[fam] = types.SimpleNamespace(pipe=pipe, state=state, files=[str(root / f"{fam}.safetensors"), str(root / f"{fam}.ckpt")])
    write_configs(out["sd2-v"].pipe, "sd2", str(root / "configs" / "sd2"))  # SD 2-base's folder (ε) with the tiny model
    out["configs"] = str(root / "configs")
    return out


@pytest.fixture
def tiny_configs(singles, monkeypatch):
    monkeypatch.setenv(CONFIGS_ENV, singles["configs"])
    return singles["configs"]


def _outputs(pipe):
    """The UNet's, the VAE's and the text encoders' outputs on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    unet = pipe.unet
    x = torch.randn(1, 4, 8, 8, generator=g)
    c = torch.randn(1, 5, unet.config.cross_attention_dim, generator=g)
    added = None
    if unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    ids = pipe.tokenizer(["a photo of sks heart"], return_tensors="pt").input_ids
    with torch.no_grad():
        out = {"unet": unet(x, torch.tensor([500]), c, added_cond_kwargs=added).sample,
               "vae": pipe.vae.decode(x).sample, "text_encoder": pipe.text_encoder(ids)[0]}
        if getattr(pipe, "text_encoder_2", None) is not None:
            out["text_encoder_2"] = pipe.text_encoder_2(ids)[0]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_a_single_file_loads_as_the_model_it_was_written_from(singles, tiny_configs, family):
    from loldu_diffusion import LoLDUConfig, inject_loldu, loldu_parameters
    from loldu_diffusion.export import lora_state_dict

    ref = singles[family].pipe
    want = _outputs(ref)
    for path in singles[family].files:
        assert checkpoint_family(path) == family
        pipe = load_single_file(path)
        assert pipe._loldu_family == family and type(pipe) is type(ref)
        for name, tensor in _outputs(pipe).items():
            torch.testing.assert_close(tensor, want[name], rtol=0, atol=1e-6, msg=f"{path}: {name}")
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if getattr(ref, name, None) is not None:
                a, b = getattr(ref, name).state_dict(), getattr(pipe, name).state_dict()
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{path}: {name}"
        assert pipe.scheduler.config.prediction_type == ref.scheduler.config.prediction_type
    # the kohya labels of an export from it say which family it is (A1111 applies an SD 2 LoRA as SD 1 otherwise)
    inject_loldu(pipe, LoLDUConfig(rank=2))
    with torch.no_grad():
        for p in loldu_parameters(pipe):
            p.add_(0.1)
    meta = lora_state_dict(pipe, "kohya", title="sks")[1]
    want = {"sd1": ("sd_v1", "False", "False", "stable-diffusion-v1/lora", "diffusers"),
            "sd2-v": ("sd_v2_v", "True", "True", "stable-diffusion-v2-768-v/lora", "diffusers"),
            "sdxl": ("sdxl_base_v1-0", "False", "False", "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models")}
    got = (meta["ss_base_model_version"], meta["ss_v2"], meta["ss_v_parameterization"], meta["modelspec.architecture"],
           meta["modelspec.implementation"])
    assert got == want[family] and meta["modelspec.title"] == meta["ss_output_name"] == "sks"


def test_sd2_prediction_type_as_diffusers_decides_it_unless_a_yaml_beside_says(singles, tiny_configs, tmp_path):
    state = singles["sd2-v"].state
    with pytest.warns(UserWarning, match=r"taken as v-prediction .* no .*\.yaml beside it"):  # a guess, said at run time
        assert checkpoint_family(singles["sd2-v"].files[0]) == "sd2-v"  # no global_step: diffusers' default, v-prediction (SD 2.1 768)
    base = tmp_path / "sd2-base.ckpt"
    torch.save({"state_dict": state, "global_step": 875000}, str(base))  # SD 2 base's step: ε (diffusers' rule)
    assert checkpoint_family(str(base)) == "sd2"
    pipe = load_single_file(str(base))
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe._loldu_config == config_folder("sd2")
    yaml = tmp_path / "sd2-base.yaml"  # A1111's convention: the LDM config beside the checkpoint decides
    yaml.write_text('model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: "v"\n')
    assert checkpoint_family(str(base)) == "sd2-v"
    yaml.write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert checkpoint_family(str(base)) == "sd2"
    for text in ("just: [text", "model:\n  params: 3\n"):  # not YAML; YAML whose model.params is not a mapping
        yaml.write_text(text)
        with pytest.raises(SingleFileError, match=r"sd2-base.yaml: not an LDM model config") as e:
            checkpoint_family(str(base))
        assert "\n" not in str(e.value)


def _real_ldm_keys(family: str) -> dict:
    """The key set (meta tensors of the real shapes) of a real checkpoint of the family: the
    shipped configs instantiated without weights, written out by the diffusers scripts."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = config_folder(family)
    with init_empty_weights():
        pipe = types.SimpleNamespace(unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet")),
                                     vae=AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
                                     text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")))
        if family == "sdxl":
            pipe.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
    return ldm_state_dict(pipe, family)


def test_family_detection_on_real_key_sets():
    keys = {fam: _real_ldm_keys(fam) for fam in ("sd1", "sd2", "sdxl")}
    assert family_of_keys(keys["sd1"]) == "sd1"
    assert family_of_keys(keys["sd2"]) == "sd2-v" and family_of_keys(keys["sd2"], global_step=875000) == "sd2"
    assert family_of_keys(keys["sdxl"]) == "sdxl"
    unet_in = "model.diffusion_model.input_blocks.0.0.weight"
    inpainting = dict(keys["sd1"], **{unet_in: torch.empty(320, 9, 3, 3, device="meta")})
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in keys["sdxl"].items()
               if not k.startswith("conditioner.embedders.0.")}
    unet_only = {k: v for k, v in keys["sd1"].items() if k.startswith("model.diffusion_model.")}
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.empty(4, 320)}
    vae = {k: v for k, v in keys["sd1"].items() if k.startswith("first_stage_model.")}
    for bad, match in [(inpainting, r"an SD 1.x inpainting model; single files of SD 1.x, SD 2.x and SDXL base models load here"),
                       (refiner, r"the SDXL refiner"),
                       (unet_only, r"an SD 1.x checkpoint without its text encoder and VAE weights \(a UNet-only or pruned file\?\)"),
                       (lora, r"a LoRA, not a Stable Diffusion checkpoint \(no model.diffusion_model.\* weights\)"),
                       (vae, r"a VAE, not a Stable Diffusion checkpoint")]:
        with pytest.raises(SingleFileError, match="^x.safetensors: " + match) as e:
            family_of_keys(bad, "x.safetensors")
        assert "\n" not in str(e.value)


def test_the_shipped_configs_are_the_real_models():
    """Parameter counts of SD 1.5, SD 2.1 (-base) and SDXL base 1.0 (UNet, VAE, text encoders),
    their CLIP tokenizers (one vocabulary, OpenCLIP's pad token "!"), sizes and schedules."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loldu_diffusion.single_file import _tokenizers

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    real = {"sd1": (859_520_964, 123_060_480, 512, "epsilon", ["<|endoftext|>"]),
            "sd2": (865_910_724, 340_387_840, 512, "epsilon", ["!"]),
            "sd2-v": (865_910_724, 340_387_840, 768, "v_prediction", ["!"]),
            "sdxl": (2_567_463_684, 123_060_480, 1024, "epsilon", ["<|endoftext|>", "!"])}
    for fam, (unet_n, text_n, size, prediction, pads) in real.items():
        folder = config_folder(fam)
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
            assert (count(unet), count(vae), count(text)) == (unet_n, 83_653_863, text_n), fam
            if fam == "sdxl":
                assert count(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))) == 694_659_840
        assert unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) == size
        with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
            assert json.load(f)["prediction_type"] == prediction
        toks = _tokenizers(folder)
        assert [t.pad_token for t in toks.values()] == pads
        for tok in toks.values():
            assert len(tok) == 49408 and tok.model_max_length == 77
            assert tok("a photo of a cat").input_ids == CAT
            assert tok("a photo of a cat", padding="max_length", max_length=9).input_ids == CAT + [tok.pad_token_id] * 2
        assert [t.pad_token_id for t in toks.values()] == [49407 if p != "!" else 0 for p in pads]


def test_bad_files_are_one_line_naming_the_file(singles, concept_dir, tmp_path, capsys):
    from loldu_diffusion.cli import main as loldu
    from loldu_diffusion.training import TrainingError, parse_args, train

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Payload()}, str(tmp_path / "evil.ckpt"))
    (tmp_path / "cut.safetensors").write_bytes(open(singles["sd1"].files[0], "rb").read()[:5000])
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, str(tmp_path / "style.safetensors"))
    (tmp_path / "model.sft").write_bytes(b"\0")
    (tmp_path / "Model.SafeTensors").write_bytes(b"\0")
    cases = {"Model.SafeTensors": r"rename it to end in .safetensors, in lower case \(diffusers reads any other name as a pickled .ckpt\)",
             "evil.ckpt": r"this checkpoint needs Python code to load \(pickled io.open\), which is never run here; use the model's .safetensors",
             "cut.safetensors": r"not a readable safetensors file \(truncated or corrupt\?\)",
             "junk.ckpt": r"not a readable PyTorch checkpoint \(truncated or corrupt\?\)",
             "style.safetensors": r"a LoRA, not a Stable Diffusion checkpoint",
             "model.sft": r"a safetensors file under the .sft extension; rename it to .safetensors"}
    for name, match in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(SingleFileError, match=f"^{re.escape(path)}: {match}") as e:
            checkpoint_family(path)
        assert "\n" not in str(e.value)
    assert not marker.exists()  # the pickled call never ran
    # the tiny SD 1 file against the real SD 1.5 configs: a model of another architecture
    with pytest.raises(SingleFileError, match=r"sd1.safetensors: it does not load as an SD 1.x model \(.*\); a fine-tune of another") as e:
        load_single_file(singles["sd1"].files[0])
    assert "\n" not in str(e.value)
    # each entry point says it in one line, with its flag
    evil = str(tmp_path / "evil.ckpt")
    assert loldu(["generate", "--base", evil, "--prompt", "x", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"loldu generate: error: --base {evil}: this checkpoint needs Python code") and "\n" not in err
    with pytest.raises(TrainingError, match=f"^--pretrained_model_name_or_path {re.escape(evil)}: this checkpoint needs Python code"):
        train(parse_args(["--pretrained_model_name_or_path", evil, "--instance_data_dir", concept_dir, "--instance_prompt", "a sks dog",
                          "--output_dir", str(tmp_path / "o")]))


def test_a_file_the_system_will_not_read_is_not_called_corrupt(tmp_path, monkeypatch):
    """Permissions, a folder under a model's name: "download it again" would be the wrong fix."""
    from loldu_diffusion.single_file import read_keys

    for name in ("folder.safetensors", "folder.ckpt"):
        (tmp_path / name).mkdir()
        with pytest.raises(SingleFileError, match=f"^{re.escape(str(tmp_path / name))}: a folder, not a model file"):
            read_keys(str(tmp_path / name))
    torch.save({"w": torch.ones(1)}, str(tmp_path / "locked.ckpt"))

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(torch, "load", refuse)  # (the tests run as root here, where chmod refuses nothing)
    with pytest.raises(SingleFileError, match=r"locked.ckpt: cannot be read \(Permission denied\)"):
        read_keys(str(tmp_path / "locked.ckpt"))


def test_the_trainer_cli_and_app_take_a_single_file(singles, tiny_configs, concept_dir, tmp_path, capsys):
    from safetensors import safe_open

    from loldu_diffusion import AdapterFile
    from loldu_diffusion.app import Studio
    from loldu_diffusion.cli import main as loldu
    from loldu_diffusion.training import parse_args, train
    from loldu_diffusion.training.methods import ADAPTER_FILE

    base = singles["sd1"].files[0]
    out = tmp_path / "run"
    summary = train(parse_args(["--pretrained_model_name_or_path", base, "--instance_data_dir", concept_dir, "--instance_prompt",
                                "a photo of sks heart", "--max_train_steps", "2", "--resolution", "64", "--report_to", "none",
                                "--output_dir", str(out)]))
    assert summary["steps"] == 2 and summary["base_model"] == "sd1.safetensors"
    adapter = str(out / ADAPTER_FILE)
    assert AdapterFile.read(adapter).delta["unet"].abs().sum() > 0
    xl = train(parse_args(["--pretrained_model_name_or_path", singles["sdxl"].files[1], "--instance_data_dir", concept_dir, "--instance_prompt",
                           "a photo of sks heart", "--max_train_steps", "1", "--resolution", "64", "--report_to", "none",
                           "--train_text_encoder", "--output_dir", str(tmp_path / "xl")]))
    assert xl["steps"] == 1 and set(AdapterFile.read(str(tmp_path / "xl" / ADAPTER_FILE)).layers) == {"unet", "text_encoder", "text_encoder_2"}
    assert "StableDiffusionPipeline.from_single_file(" in (out / "README.md").read_text()
    # export-lora from the file: kohya by default, labelled for SD 1
    lora = tmp_path / "sks.safetensors"
    assert loldu(["export-lora", adapter, "--base", base, "-o", str(lora)]) == 0
    said = capsys.readouterr()
    assert "(kohya LoRA" in said.out and "warning" not in said.err
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_sd_model_name"] == "sd1.safetensors" and meta["modelspec.title"] == "sks"
    assert loldu(["export-lora", adapter, "--base", base, "--format", "diffusers", "-o", str(tmp_path / "d.safetensors")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ComfyUI and A1111 want the kohya format (--format kohya)")
    # the app: the file is its base, and its export defaults to kohya
    studio = Studio(base)
    session = studio.new_session()
    session.add(adapter)
    assert session.export_lora().endswith("blend_lora_kohya.safetensors")
    # full fine-tuning from a file writes a whole pipeline folder, its VAE and tokenizer from the file
    full = tmp_path / "full"
    train(parse_args(["--pretrained_model_name_or_path", base, "--instance_data_dir", concept_dir, "--instance_prompt", "a photo of sks heart",
                      "--max_train_steps", "1", "--resolution", "64", "--report_to", "none", "--method", "full", "--output_dir", str(full)]))
    from diffusers import DiffusionPipeline

    saved = DiffusionPipeline.from_pretrained(str(full))
    ref = singles["sd1"].pipe
    assert all(torch.equal(v, ref.vae.state_dict()[k]) for k, v in saved.vae.state_dict().items())
    assert saved.tokenizer("a photo of sks heart").input_ids == ref.tokenizer("a photo of sks heart").input_ids
