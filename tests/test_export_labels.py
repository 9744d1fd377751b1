"""Kohya exports are labelled for the family they belong to, as kohya's sai_model_spec labels
them: A1111 treats an unlabelled SD 2.x LoRA as SD 1 and applies it wrongly."""
import types

import pytest

from loldu_diffusion.export import base_family
from tiny import tiny_sdxl_unet, tiny_unet


def _pipe(unet, prediction_type):
    return types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(config={"prediction_type": prediction_type}))


@pytest.mark.parametrize("cross,xl,pred,version,v2,vpar,arch", [
    (32, False, "epsilon", "sd_v1", False, False, "stable-diffusion-v1/lora"),
    (1024, False, "epsilon", "sd_v2", True, False, "stable-diffusion-v2-512/lora"),
    (1024, False, "v_prediction", "sd_v2", True, True, "stable-diffusion-v2-768-v/lora"),
    (64, True, "epsilon", "sdxl_base_v1-0", False, False, "stable-diffusion-xl-v1-base/lora"),
])
def test_family_labels(cross, xl, pred, version, v2, vpar, arch):
    unet = tiny_sdxl_unet() if xl else tiny_unet(cross_attention_dim=cross)
    fam = base_family(_pipe(unet, pred))
    assert (fam["ss_base_model_version"], fam["v2"], fam["v_parameterization"], fam["modelspec"]["architecture"]) == (version, v2, vpar, arch)
    assert fam["modelspec"]["prediction_type"] == ("v" if vpar else "epsilon")


def test_a_bare_unet_is_labelled_by_its_architecture():
    assert base_family(tiny_unet(cross_attention_dim=1024))["ss_base_model_version"] == "sd_v2"
