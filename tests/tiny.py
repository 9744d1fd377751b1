"""Tiny SD / SDXL components built from configs (random weights), shared by the tests."""
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection


def tiny_unet(seed=0, cross_attention_dim=32, **kw):
    torch.manual_seed(seed)
    cfg = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=16,
    )
    cfg.update(kw)
    return UNet2DConditionModel(**cfg).eval()


def tiny_sdxl_unet(seed=0):
    return tiny_unet(
        seed, cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32, transformer_layers_per_block=(1, 2),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def tiny_text_encoder(seed=0, hidden=32, projection=False):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=99, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, projection_dim=hidden,
                         bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def unet_inputs(unet, batch=2, seed=1, tokens=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500][:batch])
    c = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=g)
    return x, t, c


def craft(src, dst, tensors=None, meta=None, raw=None, extra_meta=None):
    """A copy of adapter file `src` at `dst` with its tensors / LoLDU metadata / raw metadata
    string edited in place by the given functions (how the tests make broken files)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(src, "pt") as f:
        m = f.metadata()
    t = load_file(src)
    if tensors:
        tensors(t)
    if meta:
        lm = json.loads(m["loldu"])
        meta(lm)
        m["loldu"] = json.dumps(lm)
    if raw:
        m["loldu"] = raw(m["loldu"])
    m.update(extra_meta or {})
    save_file(t, dst, metadata=m)
    return dst
