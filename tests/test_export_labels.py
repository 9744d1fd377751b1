"""Kohya exports are labelled for the family they belong to, as kohya's train_network.py and
sai_model_spec.py label a LoRA: A1111 treats an unlabelled SD 2.x LoRA as SD 1 and applies it
wrongly. Single-file bases export kohya by default; a diffusers-format export warns."""
import types

import pytest

from loldu_diffusion.export import DIFFUSERS_FORMAT_WARNING, base_family, default_format, format_warning, kohya_labels
from tiny import tiny_sdxl_unet, tiny_unet


def _pipe(unet, prediction_type):
    return types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(config={"prediction_type": prediction_type}))


@pytest.mark.parametrize("cross,xl,pred,version,v2,vpar,arch,res", [
    (32, False, "epsilon", "sd_v1", False, False, "stable-diffusion-v1/lora", "512x512"),
    (1024, False, "epsilon", "sd_v2", True, False, "stable-diffusion-v2-512/lora", "512x512"),
    (1024, False, "v_prediction", "sd_v2_v", True, True, "stable-diffusion-v2-768-v/lora", "768x768"),
    (64, True, "epsilon", "sdxl_base_v1-0", False, False, "stable-diffusion-xl-v1-base/lora", "1024x1024"),
])
def test_family_labels(cross, xl, pred, version, v2, vpar, arch, res):
    unet = tiny_sdxl_unet() if xl else tiny_unet(cross_attention_dim=cross)
    fam = base_family(_pipe(unet, pred))
    assert (fam["ss_base_model_version"], fam["v2"], fam["v_parameterization"], fam["modelspec"]["architecture"]) == (version, v2, vpar, arch)
    assert fam["modelspec"]["prediction_type"] == ("v" if vpar else "epsilon") and fam["modelspec"]["resolution"] == res
    labels = kohya_labels(_pipe(unet, pred), rank=4, title="sks-dog", timestamp=1_700_000_000)
    assert (labels["ss_v2"], labels["ss_v_parameterization"], labels["ss_network_dim"], labels["ss_network_alpha"]) == (str(v2), str(vpar), "4", "4")
    assert labels["modelspec.sai_model_spec"] == "1.0.1" and labels["modelspec.title"] == labels["ss_output_name"] == "sks-dog"
    assert labels["modelspec.implementation"] == ("https://github.com/Stability-AI/generative-models" if xl else "diffusers")
    assert labels["modelspec.date"].startswith("2023-11-1") and all(isinstance(v, str) for v in labels.values())


def test_a_bare_unet_is_labelled_by_its_architecture():
    assert base_family(tiny_unet(cross_attention_dim=1024))["ss_base_model_version"] == "sd_v2"


def test_single_file_bases_export_kohya_and_diffusers_exports_warn(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"\0")
    assert default_format(str(model)) == "kohya" and default_format(str(tmp_path)) == "diffusers" and default_format(None) == "diffusers"
    assert format_warning("diffusers") == DIFFUSERS_FORMAT_WARNING and format_warning("kohya") is None
    assert "\n" not in DIFFUSERS_FORMAT_WARNING and "ComfyUI and A1111 want the kohya format" in DIFFUSERS_FORMAT_WARNING
