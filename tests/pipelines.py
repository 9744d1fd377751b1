"""Tiny SD and SDXL model folders in diffusers format, built from configs with random weights:
the real-SD code paths (loading, SDXL conditioning, LoRA export) at test speed."""
import os

import torch

from loldu_diffusion.toy.models import build_tokenizer, text_config_for

# SD 1.5 / SDXL's own schedule (ε-prediction), not the embedded base's v-prediction one
SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           prediction_type="epsilon", steps_offset=1)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=16)


def _text_config(tok):
    cfg = text_config_for(tok)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.projection_dim = 32, 64, 2, 32
    return cfg


def _unet(**kw):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                                attention_head_dim=4, norm_num_groups=16, **kw)


def make_tiny_sd(path: str, seed: int = 0) -> str:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    if os.path.isfile(os.path.join(path, "model_index.json")):
        return path
    torch.manual_seed(seed)
    tok = build_tokenizer(os.path.join(path, "tokenizer"))
    unet = _unet(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(tok)), tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def make_tiny_sdxl(path: str, seed: int = 0) -> str:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if os.path.isfile(os.path.join(path, "model_index.json")):
        return path
    torch.manual_seed(seed)
    tok = build_tokenizer(os.path.join(path, "tokenizer"))
    unet = _unet(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=64, transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32)
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(tok)),
                                     text_encoder_2=CLIPTextModelWithProjection(_text_config(tok)),
                                     tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG))
    pipe.save_pretrained(path)
    return path
