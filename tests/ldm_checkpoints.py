"""Tiny SD 1.x / SD 2.x / SDXL models written as single-file checkpoints in the original (LDM)
key layout, by diffusers' own diffusers→LDM scripts (tests/diffusers_scripts, vendored
unchanged), and a folder of their configs in the layout of the package's shipped ones.

The scripts hard-code the real models' block layout, so the tiny models keep it where it
matters: two resnets per UNet level, SD's attention pattern (no attention in the last down
level and the first up level; SDXL's none in the first down level), a four-level VAE. diffusers
tells the families apart by widths, so those are kept too: SD 2's cross-attention is 1024 wide
(its text encoder is OpenCLIP-wide), SDXL's second text encoder is wider than its first and
has at least 10 layers.

Everything else is the shipped family folder's (loldu_diffusion/configs): model_index.json, the
scheduler, and for SD 1 and SDXL the tokenizers built from the shipped CLIP vocabulary (49,408
tokens; SD 2 keeps the embedded base's small tokenizer: its 1024-wide text encoder over the full
vocabulary would be 200 MB). So the tests load through the shipped configs' every part but the
model sizes.
"""
import importlib.util
import json
import os
import shutil

import torch

from loldu_diffusion.single_file import CONFIGS  # the shipped ones, whatever $LOLDU_SINGLE_FILE_CONFIGS says

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "diffusers_scripts")
FAMILIES = ("sd1", "sd2-v", "sdxl")


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tokenizers(family: str) -> dict:
    """{"tokenizer": …(, "tokenizer_2": …)}: the shipped ones (SD 2: the embedded base's)."""
    from transformers import CLIPTokenizer

    from loldu_diffusion.assets import default_base_path
    from loldu_diffusion.single_file import _tokenizers, config_folder

    if family.startswith("sd2"):
        return {"tokenizer": CLIPTokenizer.from_pretrained(os.path.join(default_base_path(), "tokenizer"))}
    return _tokenizers(config_folder(family, CONFIGS))


def _scheduler(family: str):
    import diffusers

    from loldu_diffusion.single_file import config_folder

    folder = config_folder(family, CONFIGS)
    with open(os.path.join(folder, "model_index.json")) as f:
        name = json.load(f)["scheduler"][1]
    return getattr(diffusers, name).from_pretrained(folder, subfolder="scheduler")


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=2, norm_num_groups=8, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)


def _text(tok, hidden=32, layers=2, act="quick_gelu", projection=False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from loldu_diffusion.toy.models import text_config_for

    cfg = text_config_for(tok)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads = hidden, 37, layers, 4
    cfg.projection_dim, cfg.hidden_act, cfg.max_position_embeddings = 32, act, tok.model_max_length
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _unet(**kw):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, layers_per_block=2, norm_num_groups=16, **kw)


def tiny_pipeline(family: str, seed: int = 0):
    """A random tiny pipeline of the family (sd1, sd2, sd2-v, sdxl), in memory, with the shipped
    scheduler and tokenizers of its family."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    toks = _tokenizers(family)
    tok = toks["tokenizer"]
    if family == "sdxl":
        unet = _unet(block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32 + 64,
                     attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32)
        return StableDiffusionXLPipeline(vae=_vae(), text_encoder=_text(tok), text_encoder_2=_text(tok, 64, 10, "gelu", projection=True),
                                         unet=unet, scheduler=_scheduler(family), **toks)
    v2 = family.startswith("sd2")
    hidden = 1024 if v2 else 32
    unet = _unet(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=hidden, attention_head_dim=(2, 4) if v2 else 4,
                 use_linear_projection=v2)
    return StableDiffusionPipeline(vae=_vae(), text_encoder=_text(tok, hidden, act="gelu" if v2 else "quick_gelu"), tokenizer=tok,
                                   unet=unet, scheduler=_scheduler(family), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_configs(pipe, family: str, folder: str) -> str:
    """The shipped family folder with the tiny model's component configs in place of the real
    ones (and, for SD 2, its tokenizer): what the tests point $LOLDU_SINGLE_FILE_CONFIGS at."""
    from loldu_diffusion.single_file import config_folder

    shutil.copytree(config_folder(family, CONFIGS), folder)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        part = getattr(pipe, name, None)
        if hasattr(part, "save_config"):  # diffusers' models
            part.save_config(os.path.join(folder, name))
        elif part is not None:  # transformers' text encoders
            part.config.save_pretrained(os.path.join(folder, name))
    if family.startswith("sd2"):
        pipe.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    return folder


def _text_model_layout(state: dict) -> dict:
    """transformers ≥ 5.6 names CLIPTextModel's weights without the `text_model.` prefix that the
    scripts (and every real checkpoint) have; put it back."""
    return {k if k.startswith("text_model.") or k.startswith("text_projection") else "text_model." + k: v for k, v in state.items()}


def ldm_state_dict(pipe, family: str) -> dict:
    """The pipeline's weights in the original single-file layout, as the diffusers scripts'
    __main__ assembles them. SD 2's text encoder is written as OpenCLIP by the script's own
    convert_text_enc_state_dict_v20 (its __main__ picks that by a 23rd layer a tiny model lacks)."""
    own = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
    if family == "sdxl":
        s = script("convert_diffusers_to_original_sdxl")
        te1 = s.convert_openai_text_enc_state_dict(_text_model_layout(own(pipe.text_encoder)))
        te2 = s.convert_openclip_text_enc_state_dict(_text_model_layout(own(pipe.text_encoder_2)))
        text = {**{"conditioner.embedders.0.transformer." + k: v for k, v in te1.items()},
                **{"conditioner.embedders.1.model." + k: v for k, v in te2.items()}}
        text["conditioner.embedders.1.model.text_projection"] = text.pop("conditioner.embedders.1.model.text_projection.weight").T.contiguous()
    else:
        s = script("convert_diffusers_to_original_stable_diffusion")
        te = _text_model_layout(own(pipe.text_encoder))
        if family.startswith("sd2"):
            te = s.convert_text_enc_state_dict_v20({"transformer." + k: v for k, v in te.items()})
            text = {"cond_stage_model.model." + k: v for k, v in te.items()}
        else:
            text = {"cond_stage_model.transformer." + k: v for k, v in s.convert_text_enc_state_dict(te).items()}
    unet = {"model.diffusion_model." + k: v for k, v in s.convert_unet_state_dict(own(pipe.unet)).items()}
    vae = {"first_stage_model." + k: v for k, v in s.convert_vae_state_dict(own(pipe.vae)).items()}
    return {k: v.contiguous() for k, v in {**unet, **vae, **text}.items()}
