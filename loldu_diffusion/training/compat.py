"""The flags of diffusers' `train_dreambooth.py`, `train_dreambooth_lora.py` and
`train_dreambooth_lora_sdxl.py` that are not LoLDU's own, so a command written for them runs
here unchanged. Each is honoured, or, where it cannot mean anything here, accepted with the
one-line note `notes(args)` returns (printed at start). `tests/peer/` runs diffusers' own test
files against this trainer.
"""
from __future__ import annotations

import argparse

# flag → why it changes nothing here (printed when the flag is given)
NOTES = {
    "enable_xformers_memory_efficient_attention": "PyTorch's scaled_dot_product_attention (memory-efficient) is already used",
    "pre_compute_text_embeddings": "text embeddings of a frozen text encoder are already computed once per caption",
    "set_grads_to_none": "gradients are already set to None after each step",
    "validation_images": "it is for DeepFloyd IF upscalers, which this trainer does not train",
    "class_labels_conditioning": "it is for DeepFloyd IF, which this trainer does not train",
    "prior_generation_precision": "class images are drawn at the precision the base model is loaded in",
}
INTERPOLATION = ("lanczos", "bicubic", "bilinear", "nearest", "box", "hamming")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_diffusers_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("diffusers DreamBooth compatibility")
    a = g.add_argument
    # model
    a("--tokenizer_name", default=None, help="tokenizer folder, if not the base model's")
    a("--pretrained_vae_model_name_or_path", default=None, help="a VAE folder to use instead of the base model's (e.g. madebyollin/sdxl-vae-fp16-fix)")
    a("--cache_dir", default=None, help="Hugging Face cache folder for hub ids and datasets")
    a("--tokenizer_max_length", type=int, default=None, help="tokenizer length (default: the tokenizer's own, 77 for CLIP)")
    a("--text_encoder_use_attention_mask", action="store_true", help="pass the padding mask to the text encoder")
    # data
    a("--dataset_name", default=None, help="a datasets-library dataset (hub id, or a local folder / imagefolder) instead of --instance_data_dir")
    a("--dataset_config_name", default=None)
    a("--image_column", default="image")
    a("--caption_column", default=None, help="per-image captions from this column (default: --instance_prompt for every image)")
    a("--repeats", type=int, default=1, help="repeat the instance images this many times per epoch")
    a("--image_interpolation_mode", default=None, choices=INTERPOLATION, help="resize filter (default bicubic)")
    # training
    a("--offset_noise", action="store_true", help="noise offset 0.1 (as train_dreambooth.py); --noise_offset sets any value")
    a("--text_encoder_lr", type=float, default=None, help="learning rate of what trains in the text encoder, the identifier's embedding under --train_text_encoder_ti included (default: --learning_rate)")
    a("--adam_weight_decay_text_encoder", type=float, default=None, help="weight decay of the text encoder's group (default: --adam_weight_decay)")
    a("--lora_dropout", type=float, default=0.0, help="--method lora/olora: dropout on the LoRA branch")
    a("--use_dora", action="store_true", help="--method lora: DoRA (PEFT)")
    a("--prodigy_beta3", type=float, default=None)
    a("--prodigy_decouple", type=_bool, default=True)
    a("--prodigy_use_bias_correction", type=_bool, default=True)
    a("--prodigy_safeguard_warmup", type=_bool, default=True)
    a("--do_edm_style_training", action="store_true", help="not supported (EDM-parameterised bases): refused with a note")
    # validation and output
    a("--validation_epochs", type=int, default=None, help="validate every N epochs (converted to steps)")
    a("--validation_scheduler", default=None, choices=["DPMSolverMultistepScheduler", "DDPMScheduler"],
      help="sampler for validation images (default: the base model's)")
    a("--skip_save_text_encoder", action="store_true", help="--method full: do not write the text encoder into the output pipeline")
    a("--output_kohya_format", action="store_true", help="also write the adapter as a kohya LoRA (A1111, ComfyUI): *_kohya.safetensors")
    a("--push_to_hub", action="store_true", help="upload the output folder to the Hugging Face Hub at the end")
    a("--hub_model_id", default=None, help="the Hub repository (default: the output folder's name)")
    a("--hub_token", default=None)
    for flag in NOTES:
        if not any(flag == act.dest for act in p._actions):
            extra = {"nargs": "+", "default": None} if flag == "validation_images" else \
                {"default": None} if flag in ("class_labels_conditioning", "prior_generation_precision") else {"action": "store_true"}
            a(f"--{flag}", help=f"accepted for compatibility: {NOTES[flag]}", **extra)


def notes(args) -> list[str]:
    """One line per given flag that changes nothing here."""
    return [f"note: --{flag} changes nothing here: {why}" for flag, why in NOTES.items() if getattr(args, flag, None)]


def check(args) -> None:
    """The combinations this trainer refuses, each with one line (ValueError)."""
    if args.do_edm_style_training:
        raise ValueError("--do_edm_style_training: EDM-style training (Playground v2.5 bases) is not supported by this trainer; "
                         "leave the flag out for SD 1.x/2.x/SDXL")
    if args.use_dora and args.method != "lora":
        raise ValueError(f"--use_dora is a LoRA variant: use it with --method lora (not --method {args.method})")
    if args.lora_dropout and args.method not in ("lora", "olora"):
        raise ValueError(f"--lora_dropout applies to --method lora/olora (not --method {args.method})")
    if args.output_kohya_format and args.method not in ("loldu", "lora", "olora"):
        raise ValueError(f"--output_kohya_format: --method {args.method} writes no LoRA (use --method loldu, lora or olora)")
    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    if args.dataset_name and args.instance_data_dir:
        raise ValueError("give --dataset_name or --instance_data_dir, not both")
