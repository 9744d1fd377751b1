"""Configurations of the embedded base model: real Stable Diffusion classes at toy size.

The same classes (`AutoencoderKL`, `UNet2DConditionModel`, `CLIPTextModel`, `CLIPTokenizer`)
are what SD 1.5 uses, so every code path that runs on the embedded model runs on SD 1.5.
"""
from __future__ import annotations

import json
import os
import string
import tempfile

from .world import vocabulary

MAX_TOKENS = 24  # the longest caption is 16 tokens with its start/end tokens

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 48, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
    mid_block_add_attention=False,
)  # 64×64 RGB ↔ 16×16×4 latents (factor 4 instead of SD's 8: the images are tiny)

TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS,
    hidden_act="quick_gelu",
    projection_dim=128,
)

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    # A cross-attention transformer at every resolution, the full 16×16 latent included (SD 1.5
    # has 5 of its 16 at full latent resolution): v2 had none there, so the subject's layout
    # could not flow through attention and every attention adapter was handicapped in a way it
    # is not on SD. 3 of the 10 transformer blocks now sit at 16×16 (+30 % per training step).
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    cross_attention_dim=128,
    attention_head_dim=4,
    norm_num_groups=32,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    # Zero terminal SNR + v-prediction + trailing timesteps (Lin et al. 2023, as SD 2.x-style
    # configs allow). With SD 1.5's ε schedule, x_T still carries the latents' spatial mean, so
    # the model learnt to copy the background colour from the initial noise and ignored
    # "on a white background" entirely (same colour for every prompt at a given seed).
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
)


def build_tokenizer(out_dir: str):
    """Train a CLIP-style BPE on the world's words so each one is a single token; single
    characters stay in the vocabulary so any other word still tokenizes (in pieces)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    words = vocabulary()
    alphabet = list(string.ascii_lowercase + string.digits + ".,!?'-")
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=4000,
        special_tokens=[],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(words * 50 + alphabet, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for ch in alphabet:  # every character also as a word end, as CLIP has
        vocab.setdefault(ch + "</w>", len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer(
            os.path.join(tmp, "vocab.json"),
            os.path.join(tmp, "merges.txt"),
            model_max_length=MAX_TOKENS,
            pad_token="<|endoftext|>",
        )
        for w in words:
            ids = tok(w, add_special_tokens=False).input_ids
            assert len(ids) == 1, f"tokenizer splits {w!r} into {ids}"
        tok.save_pretrained(out_dir)
    return tok


def text_config_for(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
