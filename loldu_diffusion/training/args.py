"""The trainer's command line: diffusers' `train_dreambooth_lora.py` names, plus LoLDU's.

Defaults left as None are filled from the base model and the method by `resolve_defaults`:
with no arguments at all, the bundled example subject is trained on the embedded base model;
given a real SD model, the paper's DreamBooth setting applies (METHODS.md).
"""
from __future__ import annotations

import argparse
import os

from ..config import DEFAULT_TEXT_ENCODER_TARGETS, DEFAULT_UNET_TARGETS, INITS
from . import compat
from .compat import add_diffusers_flags

METHODS = ("loldu", "lora", "olora", "full", "vera", "ia3", "ti")
PAPER = dict(rank=32, learning_rate=5e-4, lr_warmup_steps=15, max_train_steps=1000, train_batch_size=1)
# On the embedded base (learning benchmark in BENCHMARKS.md, n = 48, 2 seeds): at lr 1e-2 the
# subject reaches ≥ 0.8 of the ceiling by step 200 in 6/6 bench runs; 600 steps add no subject and
# lose what is left of recontextualisation; lr 1e-3 reaches it in 4/10 runs. The paper's SD
# setting (lr 5e-4, batch 1) is kept for real bases: nothing here measures it.
EMBEDDED = dict(learning_rate=1e-2, max_train_steps=200, train_batch_size=4, validation_steps=100)
# LoLDU's recipe on the embedded base when a class prompt is known (the bundled subject has one), from
# the learning benchmark (8 subjects × 2 seeds, n = 48): pivotal tuning + prior preservation + cosine
# decay on the cross-attentions' keys and values (Custom Diffusion's targets) met issue 11's bar
# (subject ≥ 0.8 of the ceiling, drift ≤ 15 points) in 14/16 runs (12/16 on every projection), where
# LoLDU alone drifted +80 points or more in every run. On captioned photos the class images are drawn in the
# captions' contexts (session 12: 15/16 runs met the bar, new backgrounds 0.79 / 0.70 of the ceiling against
# 0.54 / 0.59 with a prior over the class alone); uncaptioned photos are unchanged by it. Since session 13 the
# embedding trains alone for the first quarter of the steps (--ti_only_steps, pivotal tuning's inversion phase): on
# captioned photos 16/16 runs met the bar (15/16 without). Since session 14 at rank 16 (468 values, 36x fewer than
# LoRA r=4 on the same targets): 16/16 runs, new backgrounds 0.96 / 0.96 of the ceiling (rank 32: 16/16, 0.93 / 0.73). Each part has its own flag.
# Elsewhere (real bases, other methods): diffusers' defaults (LoLDU's rank: the paper's 32).
EMBEDDED_RECIPE = dict(train_text_encoder_ti=True, with_prior_preservation=True, num_class_images=48, lr_scheduler="cosine",
                       unet_targets=("attn2.to_k", "attn2.to_v"), class_prompts_from_captions=True, rank=16)
PLAIN = dict(train_text_encoder_ti=False, with_prior_preservation=False, num_class_images=100, lr_scheduler="constant",
             unet_targets=DEFAULT_UNET_TARGETS, class_prompts_from_captions=False, rank=None)  # rank: the method's own default
# diffusers.optimization.SchedulerType, without importing diffusers to build the parser (a test checks they agree)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "piecewise_constant")
LR_DEFAULTS = {"loldu": 5e-4, "lora": 1e-4, "olora": 1e-4, "full": 5e-6, "vera": 1e-2, "ia3": 1e-2, "ti": 5e-3}


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="DreamBooth with LoLDU (or LoRA / OLoRA / full fine-tuning baselines). With no arguments: "
        "trains the bundled example subject on the embedded base model.",
    )
    a = p.add_argument
    # model and data (diffusers names)
    a("--pretrained_model_name_or_path", default=None, help="local diffusers model folder or single-file .safetensors / .ckpt (SD 1.x/2.x/SDXL); default: the embedded tiny base")
    a("--revision", default=None)
    a("--variant", default=None, help="weights variant, e.g. fp16")
    a("--instance_data_dir", "--instance_dir", dest="instance_data_dir", default=None, help="folder of 3–10 subject images (a NAME.txt beside an image is its caption)")
    a("--instance_prompt", default=None, help="e.g. 'a photo of sks dog'")
    a("--concepts_list", default=None, metavar="JSON", help="several subjects in one run, one LoLDU adapter each (written to "
      "OUTPUT_DIR/NAME/): a JSON list of {instance_prompt, instance_data_dir[, class_prompt, class_data_dir, name]}")
    a("--class_data_dir", default=None)
    a("--class_prompt", default=None)
    a("--with_prior_preservation", action="store_true", default=None,
      help="default: off, but on for LoLDU on the embedded base when a --class_prompt is known (its recipe, README)")
    a("--no_prior_preservation", dest="with_prior_preservation", action="store_false", default=None,
      help="turn the embedded base's default prior preservation off")
    a("--class_prompts_from_captions", action="store_true", default=None,
      help="with prior preservation and captioned instance images: draw and caption the class images in the captions' "
      "contexts, each caption with the instance prompt replaced by the class prompt ('… sks dog on a beach' → '… a dog on a beach')")
    a("--no_class_prompts_from_captions", dest="class_prompts_from_captions", action="store_false", default=None)
    a("--prior_loss_weight", type=float, default=1.0)
    a("--num_class_images", type=int, default=None, help="default 100 (diffusers'); 48 in the embedded base's recipe")
    a("--sample_batch_size", type=int, default=4, help="batch size when generating class images")
    a("--resolution", type=int, default=None, help="default: the base model's native size")
    a("--center_crop", action="store_true")
    a("--random_flip", action="store_true")
    a("--train_batch_size", type=int, default=None, help="default 1 (the paper's setting); 4 on the embedded base")
    a("--num_train_epochs", type=int, default=None)
    a("--max_train_steps", type=int, default=None)
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--gradient_checkpointing", action="store_true")
    a("--learning_rate", type=float, default=None)
    a("--scale_lr", action="store_true")
    a("--lr_scheduler", default=None, choices=LR_SCHEDULERS, help="any of diffusers' get_scheduler names "
      "(default constant; cosine in the embedded base's recipe)")
    a("--lr_warmup_steps", type=int, default=PAPER["lr_warmup_steps"])
    a("--lr_num_cycles", type=int, default=1)
    a("--lr_power", type=float, default=1.0)
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=None, help="default 0 for LoLDU (decay pulls z to 0, i.e. away from the base), 1e-2 otherwise")
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit where installed")
    a("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    a("--allow_tf32", action="store_true")
    a("--seed", type=int, default=42)
    a("--output_dir", default="loldu-dreambooth-model")
    a("--overwrite", action="store_true", help="replace outputs already in --output_dir")
    a("--logging_dir", default="logs")
    a("--report_to", default="tensorboard", help="tensorboard, or none")
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    a("--validation_prompt", default=None, help="default: the instance prompt")
    a("--num_validation_images", type=int, default=4, help="0: no validation images (the embedded base otherwise draws them before and after)")
    a("--validation_steps", type=int, default=None, help="also validate every N steps (before and after are always written)")
    a("--num_inference_steps", type=int, default=None, help="sampling steps for validation images (default 25; 20 on the embedded base)")
    a("--class_num_inference_steps", type=int, default=None,
      help="sampling steps for the generated class images (default 25; 20 on the embedded base). Apart from --num_inference_steps "
      "so that cheap validation images never make a poor prior: 2-step class images are blurred, mixed-colour blobs")
    a("--guidance_scale", type=float, default=None)
    a("--train_text_encoder", action="store_true")
    a("--train_text_encoder_ti", action="store_true", default=None, help="pivotal tuning (diffusers' advanced DreamBooth name): also "
      "train the identifier token's embedding (--placeholder_token), written beside the adapter as learned_embeds.safetensors "
      "(default: off, but on for LoLDU on the embedded base when a --class_prompt is known)")
    a("--no_train_text_encoder_ti", dest="train_text_encoder_ti", action="store_false", default=None,
      help="turn the embedded base's default pivotal tuning off")
    a("--ti_norm", default="free", choices=("free", "fixed"), help="the trained token embedding (--train_text_encoder_ti, --method ti): "
      "free, or fixed at its initial norm (the class word's) so that only its direction trains — learned embeddings otherwise "
      "inflate to out-of-distribution norms (Directional Textual Inversion, Kim et al. 2025)")
    a("--ti_only_steps", type=int, default=None, metavar="N", help="--train_text_encoder_ti: the first N steps train the identifier's "
      "embedding alone, then the adapter joins it (pivotal tuning's inversion phase first, as cloneofsimo/lora's lora_pti; default 0, "
      "but a quarter of --max_train_steps in LoLDU's recipe on the embedded base)")
    a("--snr_gamma", type=float, default=None)
    a("--noise_offset", type=float, default=0.0)
    a("--dataloader_num_workers", type=int, default=0, help="accepted for compatibility; images are preloaded")
    a("--local_rank", type=int, default=-1, help="set by the launcher")
    # method
    a("--method", default="loldu", choices=METHODS)
    a("--rank", type=int, default=None, help="LoLDU rank (32; 16 in the embedded base's recipe) or LoRA rank (4)")
    a("--alpha", type=float, default=None, help="LoLDU/LoRA alpha (default: = rank)")
    a("--init", default="lu", choices=INITS, help="LoLDU z₀ init")
    a("--unet_targets", type=_csv, default=None, help="attention projections to adapt (default to_q,to_k,to_v,to_out.0; "
      "attn2.to_k,attn2.to_v — the cross-attentions' keys and values, Custom Diffusion's choice — in the embedded base's recipe)")
    a("--text_encoder_targets", type=_csv, default=DEFAULT_TEXT_ENCODER_TARGETS)
    a("--full_targets", type=_csv, default=None, help="for --method full: train only these modules' weights (e.g. to_q,to_k,to_v,to_out.0); default: the whole UNet")
    a("--judge_images", type=int, default=None, help="on the embedded base, with a toy-world subject (subject.json beside the images): "
      "judge this many images per prompt kind after training and report subject/ceiling and drift (default 48; 0 = off)")
    a("--placeholder_token", default=None, help="for --method ti and --train_text_encoder_ti: the token whose embedding trains (default: the instance prompt's identifier)")
    a("--optimizer", default="adamw", type=str.lower, choices=["adamw", "prodigy", "fira"],
      help="adamw; prodigy (pip install prodigyopt; use --learning_rate 1.0); fira for --method full")
    a("--compile", action="store_true", help="torch.compile the UNet's forward for training (the first steps pay the compilation)")
    a("--compile_backend", default="inductor", help="torch.compile backend for --compile (inductor; aot_eager traces without code generation)")
    a("--fira_rank", type=int, default=128)
    a("--fira_update_proj_gap", type=int, default=200)
    a("--fira_alpha", type=float, default=0.25)
    add_diffusers_flags(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1:
        args.local_rank = env_rank
    return args


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of `args` with the None defaults filled from the base (embedded or real) and the
    method. The caller's namespace is not changed, and resolving twice gives the same."""
    from ..assets import DEFAULT_CLASS_PROMPT, DEFAULT_INSTANCE_PROMPT, default_base_path, default_concept_path, is_toy_world_base

    args = argparse.Namespace(**vars(args))
    given = args.pretrained_model_name_or_path
    args.embedded = given is None or is_toy_world_base(given)  # the embedded base, or another toy-world one
    if args.embedded:
        args.pretrained_model_name_or_path = given or default_base_path()
        if args.instance_data_dir is None and args.dataset_name is None and not args.concepts_list:
            args.instance_data_dir = default_concept_path()
            args.instance_prompt = args.instance_prompt or DEFAULT_INSTANCE_PROMPT
            args.class_prompt = args.class_prompt or DEFAULT_CLASS_PROMPT
    args.recipe = "embedded" if (args.embedded and args.method == "loldu" and args.class_prompt and not args.concepts_list
                                 and not args.train_text_encoder) else "plain"
    if args.class_prompts_from_captions and args.with_prior_preservation is False:
        raise ValueError("--class_prompts_from_captions draws class images: it needs prior preservation (drop --no_prior_preservation)")
    if args.class_prompts_from_captions and args.with_prior_preservation is None and args.recipe == "plain":
        raise ValueError("--class_prompts_from_captions draws class images: add --with_prior_preservation"
                         + ("" if args.concepts_list else " and --class_prompt"))
    for name, value in (EMBEDDED_RECIPE if args.recipe == "embedded" else PLAIN).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    # the recipe's context prior lapses with prior preservation turned off (so resolving again accepts what it made)
    args.class_prompts_from_captions = bool(args.class_prompts_from_captions and args.with_prior_preservation)
    args.concepts = concepts_of(args)
    if args.instance_data_dir is None and args.dataset_name is None and not args.concepts:
        raise ValueError("--instance_data_dir is required with --pretrained_model_name_or_path (a folder of 3–10 subject images)")
    if args.instance_prompt is None and not args.concepts:
        raise ValueError("--instance_prompt is required, e.g. --instance_prompt 'a photo of sks dog'")
    if args.with_prior_preservation and not args.class_prompt and not args.concepts:
        raise ValueError("--with_prior_preservation needs --class_prompt (e.g. 'a photo of a dog')")
    if args.with_prior_preservation and not args.class_data_dir and not args.concepts:
        args.class_data_dir = os.path.join(args.output_dir, "class_images")
    lora_like = args.method in ("lora", "olora")
    if args.rank is None:
        args.rank = 4 if lora_like else 256 if args.method == "vera" else PAPER["rank"]
    if args.learning_rate is None:
        args.learning_rate = EMBEDDED["learning_rate"] if args.embedded and args.method == "loldu" else LR_DEFAULTS[args.method]
    if args.max_train_steps is None and args.num_train_epochs is None:
        args.max_train_steps = EMBEDDED["max_train_steps"] if args.embedded else PAPER["max_train_steps"]
    if args.train_batch_size is None:
        args.train_batch_size = EMBEDDED["train_batch_size"] if args.embedded else PAPER["train_batch_size"]
    if args.ti_only_steps is None and args.max_train_steps is not None:  # with --num_train_epochs: settle_schedule's
        args.ti_only_steps = inversion_phase(args, args.max_train_steps)
    if args.validation_steps is None and args.validation_epochs is None and args.embedded:
        args.validation_steps = EMBEDDED["validation_steps"]
    if args.adam_weight_decay is None:
        args.adam_weight_decay = 0.0 if args.method == "loldu" else 1e-2
    if args.judge_images is None:
        args.judge_images = 48 if args.embedded else 0
    sampling_steps = 20 if args.embedded else 25  # validation and class images alike, each settable on its own
    if args.num_inference_steps is None:
        args.num_inference_steps = sampling_steps
    if args.class_num_inference_steps is None:
        args.class_num_inference_steps = sampling_steps
    if args.guidance_scale is None:
        args.guidance_scale = 4.0 if args.embedded else 7.5
    # as diffusers: a real base validates only when --validation_prompt is given; the embedded
    # base (seconds per image) always shows its before/after
    args.validation_prompt = args.validation_prompt or (args.instance_prompt if args.embedded else None)
    if args.offset_noise and not args.noise_offset:
        args.noise_offset = 0.1  # train_dreambooth.py's --offset_noise
    compat.check(args)
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "sample_batch_size", "class_num_inference_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    if args.num_validation_images < 0:
        raise ValueError("--num_validation_images must be 0 (no validation images) or more")
    if args.rank < 1:
        raise ValueError("--rank must be at least 1")
    if args.optimizer == "prodigy":
        import importlib.util

        if importlib.util.find_spec("prodigyopt") is None:
            raise ValueError("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt")
    if args.method != "full" and args.optimizer == "fira":
        raise ValueError("--optimizer fira is for --method full (full fine-tuning); adapters train with AdamW")
    if args.train_text_encoder_ti and args.method == "ti":
        raise ValueError("--train_text_encoder_ti trains the identifier's embedding beside an adapter; --method ti trains only "
                         "that embedding: drop one of them")
    if args.ti_norm != "free" and not (args.train_text_encoder_ti or args.method == "ti"):
        raise ValueError("--ti_norm is for a trained token embedding: add --train_text_encoder_ti (or use --method ti)")
    if args.ti_only_steps is not None and args.ti_only_steps < 0:
        raise ValueError(f"--ti_only_steps {args.ti_only_steps}: give a number of steps, 0 or more")
    if args.ti_only_steps and not args.train_text_encoder_ti:
        raise ValueError("--ti_only_steps is the embedding's phase of pivotal tuning: add --train_text_encoder_ti (with an adapter "
                         "--method, not ti)")
    if args.ti_only_steps is not None and args.max_train_steps is not None:
        check_inversion_phase(args.ti_only_steps, args.max_train_steps)
    return args


def inversion_phase(args, steps: int) -> int:
    """The steps the identifier's embedding trains alone: --ti_only_steps, else a quarter of the run in the embedded
    base's recipe (50 of its 200; the learning bench measured 50 of 200), else none."""
    if args.ti_only_steps is not None:
        return args.ti_only_steps
    return steps // 4 if args.recipe == "embedded" and args.train_text_encoder_ti else 0


def check_inversion_phase(phase: int, steps: int) -> None:
    if phase and phase >= steps:  # no phase, nothing to check (a 0-step run stays the caller's business)
        raise ValueError(f"--ti_only_steps {phase}: give fewer steps than the run's {steps}, or the adapter never trains")


def concepts_of(args) -> tuple | None:
    """The subjects of --concepts_list (None without it), after the flags it replaces."""
    if not args.concepts_list:
        return None
    from .concepts import read_concepts_list

    given = [f for f in ("instance_data_dir", "instance_prompt", "class_prompt", "class_data_dir", "dataset_name") if getattr(args, f)]
    if given:
        raise ValueError(f"--concepts_list gives each subject's images and prompts: leave --{given[0]} out (or put it in the list's entries)")
    if args.train_text_encoder_ti or args.ti_only_steps:
        flag = "--train_text_encoder_ti" if args.train_text_encoder_ti else "--ti_only_steps (pivotal tuning's phase)"
        raise ValueError(f"--concepts_list with {flag} is not supported yet: train each subject's embedding in its own run")
    if args.method != "loldu":
        raise ValueError(f"--concepts_list trains one LoLDU adapter per subject in one run; --method {args.method} trains "
                         "shared weights: run it once per subject")
    return read_concepts_list(args.concepts_list, args.output_dir, args.with_prior_preservation)


def check_inputs(args: argparse.Namespace) -> argparse.Namespace:
    """What can be checked before anything heavy loads (and before accelerate starts), so that
    a mistake costs seconds, not a model load. Returns a copy with `model_path`: the local
    folder --pretrained_model_name_or_path resolves to."""
    from .data import DataError, caption_for, readable_images
    from .errors import TrainingError
    from .models import resolve_model_path

    if args.resolution is not None and args.resolution < 1:
        raise TrainingError(f"--resolution {args.resolution}: must be a positive size in pixels (e.g. 512 for SD 1.5); "
                            "leave it out for the base model's native size")
    from ..adapter_file import MAX_TEXT

    prompts = [(f"--{k}", getattr(args, k, None)) for k in ("instance_prompt", "class_prompt", "validation_prompt")]
    prompts += [(f"--concepts_list {args.concepts_list}: subject {c.name!r}: {k}", getattr(c, k)) for c in args.concepts or ()
                for k in ("instance_prompt", "class_prompt")]
    for flag, text in prompts:  # the adapter file keeps them as one line of text (what a reader accepts): said now, not at the end
        if text and (len(text) > MAX_TEXT or not text.isprintable()):
            raise TrainingError(f"{flag}: give one line of printable text of at most {MAX_TEXT:,} characters")
    for c in args.concepts or ():
        if not os.path.isdir(c.instance_data_dir):
            raise TrainingError(f"--concepts_list {args.concepts_list}: subject {c.name!r}: instance_data_dir {c.instance_data_dir!r}: no such folder")
    folder = args.instance_data_dir
    if args.dataset_name is None and not args.concepts and not os.path.isdir(folder):
        raise TrainingError(f"--instance_data_dir {folder!r}: no such folder")
    if args.concepts:
        photo_folders = [(c.instance_data_dir, c.instance_prompt, f"--concepts_list {args.concepts_list}: subject {c.name!r}: instance_data_dir")
                         for c in args.concepts]
    else:  # a --dataset_name is read by the datasets library, after the model loads
        photo_folders = [] if args.dataset_name else [(folder, args.instance_prompt, "--instance_data_dir")]
    try:  # the photos and their captions, read here too: an empty folder or a bad caption costs no model load
        for f, prompt, flag in photo_folders:
            for path, _ in readable_images(f, flag)[0]:
                caption_for(path, prompt)
    except DataError as e:
        raise TrainingError(str(e)) from None
    if args.push_to_hub:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise TrainingError("--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it where there is "
                                "network, or leave --push_to_hub out and upload the output folder later (huggingface-cli upload)")
    return argparse.Namespace(**vars(args) | {"model_path": resolve_model_path(args)})


def recipe_note(args: argparse.Namespace) -> str | None:
    """What the embedded base's recipe turned on for this run (settled args), and the flags that turn each part off; or,
    for LoLDU on the embedded base with a flag that leaves the recipe out, which flag."""
    if args.recipe != "embedded":
        lapsed_by = "--train_text_encoder" if args.train_text_encoder else "--concepts_list" if args.concepts_list else None
        if not (args.embedded and args.method == "loldu" and lapsed_by and (args.class_prompt or args.concepts_list)):
            return None
        return (f"note: {lapsed_by}: LoLDU's recipe on the embedded base (pivotal tuning, prior preservation, cosine decay, the "
                "cross-attentions' keys and values) is off for this run (and LoLDU's rank is 32, not 16) and diffusers' defaults apply; each part has its own flag "
                "(README, 'Choices')")
    phase = f" (the embedding alone for the first {args.ti_only_steps} steps)" if args.ti_only_steps else ""
    return (f"note: LoLDU's recipe on the embedded base: pivotal tuning {'on' if args.train_text_encoder_ti else 'off'}{phase}, prior "
            f"preservation {'on' if args.with_prior_preservation else 'off'}"
            f"{' (class images in the contexts the captions name)' if args.class_prompts_from_captions else ''}, "
            f"lr schedule {args.lr_scheduler}, UNet targets {','.join(args.unet_targets)}, rank {args.rank} (README, 'Choices'); "
            "--no_train_text_encoder_ti, "
            "--ti_only_steps 0, --no_prior_preservation, --no_class_prompts_from_captions, --lr_scheduler constant, "
            "--unet_targets to_q,to_k,to_v,to_out.0, --rank 32 change it")


def settle_schedule(args: argparse.Namespace, n_images: int, num_processes: int) -> argparse.Namespace:
    """A copy with what depends on the data and the processes: max_train_steps from
    --num_train_epochs when only that is given, and `optimizer_lr` (--learning_rate, times the
    effective batch under --scale_lr, as diffusers does). The summary keeps --learning_rate."""
    import math

    # as diffusers' scripts: an epoch is each process's share of the batches, in optimizer steps (n_images counts --repeats),
    # over the instance or the class images, whichever are more (DreamBoothDataset's length under prior preservation)
    if args.with_prior_preservation:
        n_images = max(n_images, args.num_class_images)
    steps_per_epoch = math.ceil(math.ceil(math.ceil(n_images / args.train_batch_size) / num_processes) / args.gradient_accumulation_steps)
    steps = args.max_train_steps
    if steps is None:
        steps = args.num_train_epochs * steps_per_epoch
    lr = args.learning_rate
    if args.scale_lr:
        lr = lr * args.gradient_accumulation_steps * args.train_batch_size * num_processes
    every = args.validation_steps
    if args.validation_epochs and not every:
        every = args.validation_epochs * steps_per_epoch
    phase = inversion_phase(args, steps)
    check_inversion_phase(phase, steps)
    return argparse.Namespace(**vars(args) | {"max_train_steps": steps, "optimizer_lr": lr, "validation_steps": every,
                                              "ti_only_steps": phase})
