"""Learning suite: is the subject learnt, how close to what the base can draw, and at what cost
to the rest of the model? Every method a user might pick instead runs in the same run.

For each admitted subject (bench subjects, on which defaults are chosen, and held-out ones,
reported apart), each method and each training seed, DreamBooth runs with the real trainer and
every checkpoint is judged on n images per prompt kind:
    subject     instance prompt ("a photo of sks heart") → the whole subject (shape, colour, marking)
    ceiling     the base told exactly ("a photo of a purple heart with a stripe"): what "learnt"
                is measured against; subject / ceiling is the headline number
    recontext   the subject on backgrounds no instance image shows ("… on a olive background"):
                subject and background right, against the ceiling of the exact description there
    drift       class-prompt images ("a photo of a heart") that take the subject's colour or
                marking, in points above the base model (the larger of the two)
"steps to learn" is the first checkpoint at ≥ 80 % of the ceiling. The judge plays the role
DINO / CLIP-I / CLIP-T play in the DreamBooth benchmark.
"""
from __future__ import annotations

import collections
import math
import os
import tempfile
import types

import torch
from tqdm.auto import tqdm

from ..toy.concepts import (BENCH_SUBJECTS, HELD_OUT_SUBJECTS, TRAIN_BACKGROUNDS, UNSEEN_BACKGROUNDS, explicit_rate, is_admitted,
                             render_subject)
from ..training.args import EMBEDDED
from ..training.report import write_json

CHECKPOINTS = (50, 100, 200, 300)
LEARNT = 0.8  # of the ceiling
# the trainer's default on the embedded base, on captioned photos (a test checks their flags agree); the core runs it
DEFAULT_CONFIG = "loldu-custom-diffusion-cosine-captioned-context-prior-r16-ti50"
DRIFT_BAR = 15  # points above the base: issue 11's bar, with LEARNT, at step 200


def configs(quick: bool, which: str = "all"):
    """The default LoLDU, then the peers a user would pick instead, at learning rates that
    learn on the embedded base; `which`: "core" (LoLDU and the small-file peers) or "all"."""
    lr = EMBEDDED["learning_rate"]
    loldu = dict(name="loldu", method="loldu", lr=lr)
    lora = dict(name="lora-r4", method="lora", lr=1e-3, args=["--rank", "4"])
    if quick:
        return [loldu, lora]
    # the trainer's default on the embedded base (training.args.EMBEDDED_RECIPE) on captioned photos, then LoLDU alone (the
    # paper's recipe). `default_args` is the recipe without its inversion phase (session 12's default, the base of most rows)
    default_args = ["--unet_targets", "attn2.to_k,attn2.to_v", "--train_text_encoder_ti", "--with_prior_preservation",
                    "--num_class_images", "48", "--lr_scheduler", "cosine", "--class_prompts_from_captions"]
    # pivotal tuning's inversion phase first (cloneofsimo/lora's lora_pti): the embedding trains alone for 50 steps (a
    # quarter of the 200 the bench judges at; the trainer's default is a quarter of any run), then the adapter joins.
    # Session 12's default missed zwx s0 (0.94 of the ceiling at step 50, drift +10 at step 100, then fading as the prior
    # pulled the adapter back) where textual inversion alone holds 0.98
    inversion = ["--ti_only_steps", "50"]
    # since session 14 at rank 16 (468 values, 36x fewer than LoRA r=4 on the same targets): once the embedding carries the
    # identity, half the rank learnt as well as rank 32 (session 13's default, `…-ti50`)
    default = dict(name=DEFAULT_CONFIG, method="loldu", lr=lr, args=[*default_args, "--rank", "16", *inversion], captions=True,
                   class_captions=True)
    session13 = dict(name="loldu-custom-diffusion-cosine-captioned-context-prior-ti50", method="loldu", lr=lr,
                     args=[*default_args, *inversion], captions=True, class_captions=True)
    # the default's recipe for the peers that take it at their own lr (the bar compares them at equal recipe and
    # targets): the identifier's embedding stays at the default's lr
    recipe = [*default_args, "--text_encoder_lr", "1e-2"]
    core = [default, session13, loldu, lora,
            dict(name="vera", method="vera", lr=1e-2),
            dict(name="ia3", method="ia3", lr=1e-2),
            dict(name="textual-inversion", method="ti", lr=5e-3),
            # the session-10 default (uncaptioned, no inversion phase) without its adapter: the identifier's embedding alone
            # at the default's lr and schedule (prior preservation gives it no gradient: the class prompt lacks the
            # identifier). Does the adapter add anything?
            dict(name="textual-inversion-cosine", method="ti", lr=lr, args=["--lr_scheduler", "cosine"]),
            # the other "only vectors train" peers with the default's recipe and targets (their plain rows drift as LoLDU alone)
            dict(name="vera-custom-diffusion-cosine", method="vera", lr=1e-2, args=recipe),
            dict(name="ia3-custom-diffusion-cosine", method="ia3", lr=1e-2, args=recipe)]
    if which == "core":
        return core
    return core + [
        dict(name="lora-r1", method="lora", lr=1e-3, args=["--rank", "1"]),
        dict(name="olora-r4", method="olora", lr=1e-3, args=["--rank", "4"]),
        dict(name="full-adamw", method="full", lr=5e-5),
        dict(name="full-attention-only", method="full", lr=5e-5, args=["--full_targets", "to_q,to_k,to_v,to_out.0"]),
        # issue 11's fairness check proper (fine-tuning only the attention projections against the whole UNet): at the whole
        # UNet's lr the attention weights alone reached 0.38 where the whole UNet reached 0.94 — each at its own lr
        dict(name="full-attention-only-lr2e-4", method="full", lr=2e-4, args=["--full_targets", "to_q,to_k,to_v,to_out.0"]),
        dict(name="full-attention-only-lr5e-4", method="full", lr=5e-4, args=["--full_targets", "to_q,to_k,to_v,to_out.0"]),
        dict(name="full-fira-r16", method="full", lr=5e-5, args=["--optimizer", "fira", "--fira_rank", "16"]),
        dict(name="loldu-cosine", method="loldu", lr=lr, args=["--lr_scheduler", "cosine"]),
        dict(name="loldu-lr3e-3", method="loldu", lr=3e-3),
        dict(name="loldu-lr1e-3", method="loldu", lr=1e-3),
        dict(name="loldu-constant-init", method="loldu", lr=lr, args=["--init", "constant"]),
        dict(name="loldu-prior", method="loldu", lr=lr, args=["--with_prior_preservation", "--num_class_images", "48"]),
        # against drift: the text encoder sees "sks" before "heart" (causal attention), the UNet only the result
        dict(name="loldu-text-encoder", method="loldu", lr=lr, args=["--train_text_encoder"]),
        dict(name="loldu-text-encoder-prior", method="loldu", lr=lr,
             args=["--train_text_encoder", "--with_prior_preservation", "--num_class_images", "48"]),
        # pivotal + prior + cosine on every attention projection (the default until the Custom Diffusion targets were measured)
        dict(name="loldu-ti-prior-cosine", method="loldu", lr=lr,
             args=["--train_text_encoder_ti", "--with_prior_preservation", "--num_class_images", "48", "--lr_scheduler", "cosine"]),
        # the lead above with the lr decaying to 0 by the last step: at constant lr it collapsed between steps 100 and 200
        dict(name="loldu-text-encoder-prior-cosine", method="loldu", lr=lr,
             args=["--train_text_encoder", "--with_prior_preservation", "--num_class_images", "48", "--lr_scheduler", "cosine"]),
        # … with the text encoder at a tenth of the UNet's lr: its swings between checkpoints
        dict(name="loldu-text-encoder-prior-cosine-telr1e-3", method="loldu", lr=lr,
             args=["--train_text_encoder", "--with_prior_preservation", "--num_class_images", "48", "--lr_scheduler", "cosine",
                   "--text_encoder_lr", "1e-3"]),
        dict(name="loldu-r8", method="loldu", lr=lr, args=["--rank", "8"]),
        # pivotal tuning: the identifier's own embedding carries the subject, so the class prompt (which lacks
        # it) has no shared value to drift through but the UNet's; prior preservation holds that one
        dict(name="loldu-ti", method="loldu", lr=lr, args=["--train_text_encoder_ti"]),
        dict(name="loldu-ti-prior", method="loldu", lr=lr, args=["--train_text_encoder_ti", "--with_prior_preservation", "--num_class_images", "48"]),
        # … with the lr decaying to 0 by the last step: at constant lr, zwx went 1.00 -> 0.02 of the ceiling between steps 100 and 200
        # … with the identifier's embedding at a tenth of the lr (its coordinates have std 0.03; at 1e-2 Adam moves them 0.01 a step)
        dict(name="loldu-ti-prior-cosine-telr1e-3", method="loldu", lr=lr,
             args=["--train_text_encoder_ti", "--with_prior_preservation", "--num_class_images", "48", "--lr_scheduler", "cosine",
                   "--text_encoder_lr", "1e-3"]),
        # the other way round: the UNet's adapter at 3e-3, the identifier's embedding at 1e-2 (at 1e-3 it carried too little
        # of the subject and the shared adapter drifted: zwx +48, sks +40)
        dict(name="loldu-ti-prior-unetlr3e-3", method="loldu", lr=3e-3,
             args=["--train_text_encoder_ti", "--with_prior_preservation", "--num_class_images", "48", "--text_encoder_lr", "1e-2"]),
        # both at 3e-3: at 1e-2 the embedding over-fits between steps 100 and 200 (zwx: yellow stars in one pose)
        dict(name="loldu-ti-prior-lr3e-3", method="loldu", lr=3e-3,
             args=["--train_text_encoder_ti", "--with_prior_preservation", "--num_class_images", "48"]),
        # stabilisers against the swings between checkpoints (pfm 0.98 -> 0.00 -> 0.89 of the ceiling at 50/100/200):
        # min-SNR loss weighting (Hang et al. 2023), horizontal flips (every shape here is mirror-symmetric) and cosine decay
        dict(name="loldu-text-encoder-prior-cosine-snr5-flip", method="loldu", lr=lr,
             args=["--train_text_encoder", "--with_prior_preservation", "--num_class_images", "48", "--lr_scheduler", "cosine",
                   "--snr_gamma", "5", "--random_flip"]),
        dict(name="loldu-ti-prior-unetlr3e-3-cosine-snr5-flip", method="loldu", lr=3e-3,
             args=["--train_text_encoder_ti", "--with_prior_preservation", "--num_class_images", "48", "--text_encoder_lr", "1e-2",
                   "--lr_scheduler", "cosine", "--snr_gamma", "5", "--random_flip"]),
        # the best recipe (pivotal + prior + cosine) with the adapter at 3e-3 and the embedding at 1e-2, as LoRA's pivotal
        # recipe splits them: at 1e-2 LoLDU's adapter kept 0.12 of new backgrounds where LoRA's kept 0.67
        dict(name="loldu-ti-prior-cosine-unetlr3e-3", method="loldu", lr=3e-3,
             args=["--train_text_encoder_ti", "--text_encoder_lr", "1e-2", "--with_prior_preservation", "--num_class_images", "48",
                   "--lr_scheduler", "cosine"]),
        # the peer under the same drift control: does LoRA r=4 with prior preservation learn where LoLDU with it does not?
        dict(name="lora-r4-prior", method="lora", lr=1e-3, args=["--rank", "4", "--with_prior_preservation", "--num_class_images", "48"]),
        # … and with pivotal tuning, the recipe of loldu-ti-prior (diffusers' advanced script's pivotal LoRA)
        dict(name="lora-r4-ti-prior", method="lora", lr=1e-3,
             args=["--rank", "4", "--train_text_encoder_ti", "--text_encoder_lr", "1e-2", "--with_prior_preservation", "--num_class_images", "48"]),
        # Custom Diffusion's recipe with LoLDU: only the cross-attentions' keys and values adapt (they see the text, not the
        # image), the identifier's embedding trains, prior preservation holds the class
        dict(name="loldu-custom-diffusion", method="loldu", lr=lr,
             args=["--unet_targets", "attn2.to_k,attn2.to_v", "--train_text_encoder_ti", "--with_prior_preservation",
                   "--num_class_images", "48"]),
        # … with cosine decay, on uncaptioned photos: the default of sessions 10 and 11
        dict(name="loldu-custom-diffusion-cosine", method="loldu", lr=lr, args=default_args),
        # the peer with the same recipe and targets (PEFT matches "attn2.to_k" as a suffix of the module path, as LoLDU does)
        dict(name="lora-r4-custom-diffusion-cosine", method="lora", lr=1e-3, args=["--rank", "4", *recipe]),
        # the default with its adapter at 3e-3 (the embedding stays at 1e-2): less of the adapter's reweighting of every
        # token's keys and values (new backgrounds 0.27 of the ceiling, textual inversion alone 0.68)
        dict(name="loldu-custom-diffusion-cosine-unetlr3e-3", method="loldu", lr=3e-3, args=recipe),
        # pivotal tuning without prior preservation: the embedding (lr 1e-2) carries the subject, the shared adapter only
        # refines it at a tenth of that lr, so the class prompt has little to drift through
        dict(name="loldu-ti-unetlr1e-3", method="loldu", lr=1e-3, args=["--train_text_encoder_ti", "--text_encoder_lr", "1e-2"]),
        # the default with each instance image captioned with its background ("a photo of sks heart on a white background"):
        # on new backgrounds the default's subject turns red (its embedding alone: red too), as if the identifier had learnt
        # "on a light background" along with the subject
        dict(name="loldu-custom-diffusion-cosine-captioned", method="loldu", lr=lr, args=[*default_args, "--no_class_prompts_from_captions"],
             captions=True),
        dict(name="lora-r4-custom-diffusion-cosine-captioned", method="lora", lr=1e-3,
             args=["--rank", "4", *recipe, "--no_class_prompts_from_captions"], captions=True),
        # the default at each layer's full rank (rank 128 stops at min(out, in): 1,600 δ instead of 640): VeRA's update on the
        # keys and values is effectively full rank (r 256 > the 128-wide text input) and keeps new backgrounds twice as well
        dict(name="loldu-custom-diffusion-cosine-fullrank", method="loldu", lr=lr, args=[*default_args, "--rank", "128"]),
        # captioned images and a prior over contexts: the 48 class images drawn from "a photo of a heart on a {white, gray,
        # beige} background" (the photos' own backgrounds, never the judged new ones) and captioned so; the adapter changes
        # every token's keys and values, so the prior now also holds what background words do
        dict(name="loldu-custom-diffusion-cosine-captioned-context-prior", method="loldu", lr=lr, args=default_args, captions=True,
             class_captions=True),
        # session 13's default at half its rank (320 δ + 20 σ + the 128-value embedding = 468: 36x fewer values than LoRA
        # r=4 on the same targets, where rank 32 is 21x); at full rank it learnt no better and kept new backgrounds no better (rank is not the limit)
        dict(name="loldu-custom-diffusion-cosine-captioned-context-prior-r16", method="loldu", lr=lr,
             args=[*default_args, "--rank", "16"], captions=True, class_captions=True),
        # the peer under the same captions and context prior (equal recipe, equal class images)
        dict(name="lora-r4-custom-diffusion-cosine-captioned-context-prior", method="lora", lr=1e-3, args=["--rank", "4", *recipe],
             captions=True, class_captions=True),
        # … with the default's inversion phase too (equal recipe again since session 13)
        dict(name="lora-r4-custom-diffusion-cosine-captioned-context-prior-ti50", method="lora", lr=1e-3,
             args=["--rank", "4", *recipe, *inversion], captions=True, class_captions=True),
        # the "only vectors train" peer and the kilobyte anchor with the same captions (VeRA also with the context prior;
        # textual inversion trains no shared weight, so it has no prior to keep)
        dict(name="vera-custom-diffusion-cosine-captioned-context-prior", method="vera", lr=1e-2, args=recipe, captions=True,
             class_captions=True),
        dict(name="textual-inversion-cosine-captioned", method="ti", lr=lr, args=["--lr_scheduler", "cosine"], captions=True),
        dict(name="ia3-custom-diffusion-cosine-captioned-context-prior", method="ia3", lr=1e-2, args=recipe, captions=True,
             class_captions=True),
        # the "only vectors train" peers with the default's inversion phase too (equal recipe, as LoRA's -ti50 row)
        dict(name="vera-custom-diffusion-cosine-captioned-context-prior-ti50", method="vera", lr=1e-2,
             args=[*recipe, *inversion], captions=True, class_captions=True),
        dict(name="ia3-custom-diffusion-cosine-captioned-context-prior-ti50", method="ia3", lr=1e-2,
             args=[*recipe, *inversion], captions=True, class_captions=True),
        # the embedding's norm fixed at the class word's (it inflated 0.73 -> 2.2 by step 200 as zwx's colour went)
        dict(name="loldu-ti-prior-fixednorm", method="loldu", lr=lr,
             args=["--train_text_encoder_ti", "--ti_norm", "fixed", "--with_prior_preservation", "--num_class_images", "48"]),
    ]


@torch.no_grad()
def judge_prompts(pipe, judge, prompts: list[str], seed: int) -> list[dict]:
    from ..toy.evaluate_base import generate

    return judge.read(generate(pipe, prompts, seed, batch=96))


def _rate(hits) -> float:
    hits = list(hits)
    return sum(hits) / len(hits)


def _unseen_backgrounds(n: int) -> list[str]:
    return [UNSEEN_BACKGROUNDS[i % len(UNSEEN_BACKGROUNDS)] for i in range(n)]


def judge_model(pipe, judge, subject, n: int, seed: int = 1000) -> dict:
    """The four measures of a (possibly adapted) pipeline, n images each."""
    bgs = _unseen_backgrounds(n)
    prompts = [subject.instance_prompt] * n + [subject.prompt_on(b) for b in bgs] + [subject.class_prompt] * n
    read = judge_prompts(pipe, judge, prompts, seed)
    inst, ctx, cls = read[:n], read[n : 2 * n], read[2 * n :]
    return {
        "subject": _rate(map(subject.shown_in, inst)),
        # which attribute an instance image misses, when the whole subject is not shown
        "subject_shape": _rate(a["shape"] == subject.shape for a in inst),
        "subject_color": _rate(a["object_color"] == subject.object_color for a in inst),
        "subject_marking": _rate(a["marking"] == subject.marking for a in inst),
        "recontext": _rate(subject.shown_in(a) and a["background_color"] == b for a, b in zip(ctx, bgs)),
        "class_color": _rate(a["object_color"] == subject.object_color for a in cls),
        "class_marking": _rate(a["marking"] == subject.marking for a in cls),
        "class_subject": _rate(map(subject.shown_in, cls)),
    }


def base_rates(pipe, judge, subject, n: int, seed: int = 1000) -> dict:
    """The untrained base on the judged prompts, its ceiling (told exactly) and admission. The
    class-prompt images judged here are the ones admission counts (not a second set)."""
    bgs = _unseen_backgrounds(n)
    read = judge_prompts(pipe, judge, [subject.description_on(b) for b in bgs], seed + 30_000)
    out = judge_model(pipe, judge, subject, n, seed)
    out["ceiling_recontext"] = _rate(subject.shown_in(a) and a["background_color"] == b for a, b in zip(read, bgs))
    out["ceiling"] = explicit_rate(pipe, judge, subject, n)
    out["admitted"] = is_admitted(out["ceiling"], out["class_subject"])
    return out


def judge_output(args, method, subject, n: int = 48) -> dict:
    """What the trainer reports after training a toy-world subject on the embedded base: the same
    measures as the benchmark, for the output it just wrote."""
    from ..toy.judge import load_judge
    from ..training.models import load_models, make_pipeline

    judge = load_judge()
    m = load_models(args)
    pipe = make_pipeline(m, m.unet, args)
    base = base_rates(pipe, judge, subject, n)
    method.load_output(pipe, args.output_dir)
    after = judge_model(pipe, judge, subject, n)
    rel = relative({"subject": subject.identifier, "curve": [{"step": 0, **after}]}, {subject.identifier: base})[0]
    return {"n": n, "ceiling": base["ceiling"], "subject": after["subject"], "subject_of_ceiling": rel["subject"],
            "drift_points": rel["drift"], "recontext_of_ceiling": rel["recontext"], "base": base, "after": after}


def trainer_argv(cfg: dict, subject, seed: int, steps: int, every: int, instance_dir: str, out: str,
                 base_path: str | None = None) -> list[str]:
    """The trainer's command line of one bench run: the config's recipe, the subject, checkpoints every `every` steps."""
    argv = ["--instance_data_dir", instance_dir, "--instance_prompt", subject.instance_prompt, "--class_prompt", subject.class_prompt,
            "--method", cfg["method"], "--learning_rate", str(cfg["lr"]), "--max_train_steps", str(steps), "--seed", str(seed),
            "--checkpointing_steps", str(every), "--output_dir", out, "--report_to", "none", "--num_validation_images", "1",
            "--validation_steps", str(10**9), "--num_inference_steps", "2", "--judge_images", "0", "--overwrite",
            # each config names its whole recipe: the embedded base's LoLDU recipe (pivotal + prior + cosine, rank 16) is off
            # unless asked (LoLDU's rows before session 14 are at rank 32)
            "--no_train_text_encoder_ti", "--no_prior_preservation", "--lr_scheduler", "constant", "--no_class_prompts_from_captions",
            "--ti_only_steps", "0"] + (["--rank", "32"] if cfg["method"] == "loldu" else []) + cfg.get("args", [])
    if base_path:  # another toy-world base (its marker file gives it the embedded base's defaults)
        argv += ["--pretrained_model_name_or_path", base_path]
    return argv


def context_class_prompts(subject) -> list[str]:
    """The class prompt on each training background, as --class_prompts_from_captions derives it from the captioned photos."""
    from ..training.data import class_captions

    return class_captions([subject.prompt_on(b) for b in TRAIN_BACKGROUNDS], subject.instance_prompt, subject.class_prompt)


def captioned_class_images(pipe, subject, out_dir: str, n: int = 48, seed: int = 100_000) -> str:
    """n class images on the training backgrounds in turn, each with a NAME.txt caption that says which: at seed 0,
    the images --class_prompts_from_captions draws (the same prompts and seeds; the images agree to ±1 of 255)."""
    from ..toy.evaluate_base import generate

    contexts = context_class_prompts(subject)
    prompts = [contexts[k % len(contexts)] for k in range(n)]
    os.makedirs(out_dir, exist_ok=True)
    for k, (prompt, img) in enumerate(zip(prompts, generate(pipe, prompts, seed))):
        img.save(os.path.join(out_dir, f"class_{k:05d}.png"))
        with open(os.path.join(out_dir, f"class_{k:05d}.txt"), "w") as f:
            f.write(prompt + "\n")
    return out_dir


def run_one(cfg, subject, seed, instance_dir, work, steps, checkpoints, n, judge, base_path=None, class_dir=None):
    from safetensors.torch import load_file

    from ..training import parse_args, train
    from ..training.args import resolve_defaults
    from ..training.checkpoints import TRAINABLE_FILE
    from ..training.models import load_models, make_pipeline
    from ..training.methods import make_method

    out = os.path.join(work, f"{cfg['name']}-{subject.identifier}-{seed}")
    argv = trainer_argv(cfg, subject, seed, steps, math.gcd(*checkpoints), instance_dir, out, base_path)
    if class_dir:  # prepared by run_plan, shared by the subject's runs
        argv += ["--class_data_dir", class_dir]
    args = resolve_defaults(parse_args(argv))  # settled once: the method below sees what train() saw
    summary = train(args)
    method = make_method(args)

    def pipeline_at(step):
        m = load_models(args)
        pipe = make_pipeline(m, m.unet, args)
        if step == steps:
            method.load_output(pipe, out)
        else:
            models = types.SimpleNamespace(unet=m.unet, text_encoder=m.text_encoder, text_encoder_2=None, tokenizer=m.tokenizer)
            method.setup(models)
            method.load_trainable_state(models, load_file(os.path.join(out, f"checkpoint-{step}", TRAINABLE_FILE)))
        return pipe

    curve = [{"step": s, **judge_model(pipeline_at(s), judge, subject, n)} for s in checkpoints]
    return {"config": cfg["name"], "subject": subject.identifier, "seed": seed, "curve": curve,
            "seconds_per_step": summary["seconds_per_step"], "trainable": summary["trainable_parameters"],
            "output_bytes": summary["output_bytes"]}


def run(quick: bool = False, steps: int | None = None, out_dir: str = "bench_results", subjects: int | None = None,
        seeds: int | None = None, n: int | None = None, which: str = "all", held_out: bool = True, configs_only=None,
        subject_names=None) -> dict:
    """Every (config, admitted subject, seed), subject by subject."""
    steps = steps or (4 if quick else CHECKPOINTS[-1])
    bench = list(BENCH_SUBJECTS[: subjects or (1 if quick else len(BENCH_SUBJECTS))])
    held = [] if quick or not held_out else list(HELD_OUT_SUBJECTS)
    if subject_names:
        bench = [s for s in BENCH_SUBJECTS if s.identifier in subject_names]
        held = [s for s in HELD_OUT_SUBJECTS if s.identifier in subject_names]
    cfgs = [c["name"] for c in configs(quick, which) if not configs_only or c["name"] in configs_only]
    plan = [(c, s.identifier, seed) for s in bench + held for c in cfgs for seed in range(seeds or (1 if quick else 2))]
    return run_plan(plan, steps, n or (4 if quick else 48), out_dir, quick)


def run_plan(plan: list[tuple[str, str, int]], steps: int = CHECKPOINTS[-1], n: int = 48, out_dir: str = "bench_results",
             quick: bool = False, base_path: str | None = None) -> dict:
    """Run (config name, subject identifier, seed) triples in the order given, skipping subjects the
    base does not admit. Runs are appended to OUT/learning_partial.json as they finish, so a long
    run that is stopped keeps what it measured (`merge` reads such files)."""
    from ..assets import TOY_WORLD_MARKER, is_toy_world_base
    from ..toy.evaluate_base import load_pipeline
    from ..toy.judge import load_judge

    if base_path and not is_toy_world_base(base_path):
        raise ValueError(f"--base {base_path}: not a toy-world base (no {TOY_WORLD_MARKER}); the judge reads only the toy world: "
                         "make one with python -m loldu_diffusion.toy.train_base or python -m loldu_diffusion.toy.identifier_rows")
    checkpoints = (steps // 2, steps) if quick else tuple(c for c in CHECKPOINTS if c < steps) + (steps,)
    by_name = {c["name"]: c for c in configs(quick)} | {c["name"]: c for c in configs(False)}
    subjects = {s.identifier: s for s in BENCH_SUBJECTS + HELD_OUT_SUBJECTS}
    judge, base = load_judge(), load_pipeline(base_path)
    result = {"base_path": base_path, "steps": steps, "checkpoints": list(checkpoints), "n": n, "seeds": sorted({p[2] for p in plan}), "runs": [], "base": {},
              "held_out": list(dict.fromkeys(p[1] for p in plan if subjects[p[1]] in HELD_OUT_SUBJECTS)),
              "configs": list(dict.fromkeys(p[0] for p in plan))}
    partial = os.path.join(out_dir, "learning_partial.json")
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for cfg_name, ident, seed in tqdm(plan, desc="learning runs"):
            subject = subjects[ident]
            if ident not in result["base"]:
                result["base"][ident] = base_rates(base, judge, subject, n)
            if not (result["base"][ident]["admitted"] or quick):
                continue
            captions = by_name[cfg_name].get("captions", False)
            inst = os.path.join(work, f"subject-{ident}" + ("-captioned" if captions else ""))
            if not os.path.isdir(inst):
                render_subject(subject, inst, captions=captions)
            classes = os.path.join(work, f"class-{ident}-captioned") if by_name[cfg_name].get("class_captions") else None
            if classes and not os.path.isdir(classes):
                captioned_class_images(base, subject, classes)
            result["runs"].append(run_one(by_name[cfg_name], subject, seed, inst, work, steps, checkpoints, n, judge, base_path, classes))
            if not quick:
                write_json(partial, result)
    result["summary"] = summarize(result)
    return result


def merge(paths: list[str]) -> dict:
    """One result from several (e.g. subjects split across processes): runs and base rates are
    joined, then summarized again."""
    import json

    parts = [json.load(open(p)) for p in paths]
    out = {k: parts[0][k] for k in ("steps", "checkpoints", "n")}
    out["seeds"] = sorted({s for p in parts for s in p["seeds"]})
    out["configs"] = list(dict.fromkeys(c for p in parts for c in p["configs"]))
    out["held_out"] = list(dict.fromkeys(h for p in parts for h in p["held_out"]))
    out["base"] = {k: v for p in parts for k, v in p["base"].items()}
    out["runs"] = [r for p in parts for r in p["runs"]]
    if any((p["steps"], p["checkpoints"], p["n"]) != (out["steps"], out["checkpoints"], out["n"]) for p in parts):
        raise ValueError("these results were measured with different steps, checkpoints or n; they cannot be merged")
    seen = collections.Counter((r["config"], r["subject"], r["seed"]) for r in out["runs"])
    twice = [k for k, c in seen.items() if c > 1]
    if twice:  # a file given twice, or a merged file with one of its parts: every mean would count the run twice
        raise ValueError(f"{len(twice)} run(s) appear in more than one file, e.g. {twice[0]}: merge each run once")
    out["summary"] = summarize(out)
    return out


# ---- reading the runs ----------------------------------------------------------------------
def relative(run_: dict, base: dict) -> list[dict]:
    """A run's curve as subject/ceiling, recontext/ceiling and drift in points above the base."""
    b = base[run_["subject"]]
    out = []
    for c in run_["curve"]:
        out.append({
            "step": c["step"],
            "subject": c["subject"] / max(b["ceiling"], 1e-9),
            "recontext": c["recontext"] / max(b["ceiling_recontext"], 1e-9),
            "drift": 100 * max(c["class_color"] - b["class_color"], c["class_marking"] - b["class_marking"]),
        })
    return out


def mean_se(xs: list[float]) -> tuple[float, float]:
    k = len(xs)
    m = sum(xs) / k
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (k - 1) / k) if k > 1 else float("nan")
    return m, se


def summarize(result: dict) -> dict:
    """Per (config, bench|held-out): mean ± standard error over subjects × seeds at every checkpoint."""
    out = {}
    held = set(result["held_out"])
    for run_ in result["runs"]:
        group = "held-out" if run_["subject"] in held else "bench"
        s = out.setdefault(f"{run_['config']}|{group}", {"config": run_["config"], "group": group, "rel": [], "s_per_step": [],
                                                         "trainable": run_["trainable"], "bytes": run_["output_bytes"]})
        s["rel"].append(relative(run_, result["base"]))
        s["s_per_step"].append(run_["seconds_per_step"])
    for s in out.values():
        rel = s.pop("rel")
        s["runs"] = len(rel)
        s["steps"] = [c["step"] for c in rel[0]]
        for k in ("subject", "recontext", "drift"):
            s[k] = [mean_se([r[j][k] for r in rel]) for j in range(len(s["steps"]))]
        firsts = [next((c["step"] for c in r if c["subject"] >= LEARNT), None) for r in rel]
        s["steps_to_learn"] = firsts
        s["learnt_by_200"] = sum(f is not None and f <= 200 for f in firsts)
        at = max(j for j, step in enumerate(s["steps"]) if step <= 200) if min(s["steps"]) <= 200 else None
        s["bar_at_200"] = None if at is None else sum(r[at]["subject"] >= LEARNT and r[at]["drift"] <= DRIFT_BAR for r in rel)
        s["s_per_step"] = sum(s["s_per_step"]) / len(s["s_per_step"])
    return out


def _pm(ms, scale=1.0, fmt="{:.2f}"):
    m, se = ms
    return (fmt.format(m * scale)) + ("" if math.isnan(se) else " ± " + fmt.format(se * scale))


def markdown(r: dict) -> str:
    lines = [f"{r['steps']} steps; judged at steps {', '.join(map(str, r['checkpoints']))} on n = {r['n']} images per prompt kind; "
             f"training seeds {', '.join(map(str, r['seeds']))}; mean ± standard error over subjects × seeds.", "",
             "**Admission** (base model, n images each): told exactly → whole subject ≥ 0.80; class prompt → ≤ 0.05.", "",
             "| subject | set | explicit (ceiling) | class prompt | admitted | ceiling on unseen backgrounds |", "|---|---|---|---|---|---|"]
    for ident, b in r["base"].items():
        lines.append(f"| {ident} | {'held-out' if ident in r['held_out'] else 'bench'} | {b['ceiling']:.2f} | {b['class_subject']:.2f} | "
                     f"{'yes' if b['admitted'] else '**no**'} | {b['ceiling_recontext']:.2f} |")
    cks = r["checkpoints"]
    lines += ["", "| config | set | runs | trained values | file bytes | s/step | "
              + " | ".join(f"subject/ceiling @{c}" for c in cks) + " | drift (pts) | recontext/ceiling | runs ≥ 0.8 by 200 | runs meeting the bar at 200 |",
              "|---|---|---|---|---|---|" + "---|" * len(cks) + "---|---|---|---|"]
    for s in sorted(r["summary"].values(), key=lambda s: (s["group"] != "bench", r["configs"].index(s["config"]))):
        lines.append(f"| {s['config']} | {s['group']} | {s['runs']} | {s['trainable']:,} | {s['bytes']:,} | {s['s_per_step']:.3f} | "
                     + " | ".join(_pm(x) for x in s["subject"]) + f" | {_pm(s['drift'][-1], fmt='{:.0f}')} | {_pm(s['recontext'][-1])} | "
                     f"{s['learnt_by_200']}/{s['runs']} | {'—' if s.get('bar_at_200') is None else s['bar_at_200']}/{s['runs']} |")
    return "\n".join(lines)


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the comparisons a reader needs (the default on uncaptioned and on captioned photos, LoLDU alone, the small-file
    # peers plain and with the default's recipe, LoRA at equal recipe); every other variant stays in the table
    plotted = {c["name"] for c in configs(False, "core")} | {"lora-r4-custom-diffusion-cosine", "loldu-custom-diffusion-cosine",
                                                              "loldu-custom-diffusion-cosine-captioned-context-prior",
                                                              "lora-r4-custom-diffusion-cosine-captioned-context-prior",
                                                              "vera-custom-diffusion-cosine-captioned-context-prior",
                                                              "lora-r4-custom-diffusion-cosine-captioned-context-prior-ti50",
                                                              "vera-custom-diffusion-cosine-captioned-context-prior-ti50",
                                                              "textual-inversion-cosine-captioned",
                                                              "ia3-custom-diffusion-cosine-captioned-context-prior"}
    rows = [x for x in r["summary"].values() if x["group"] == "bench"]
    rows = [x for x in rows if x["config"] in plotted] or rows
    fig, axes = plt.subplots(1, 3, figsize=(16, 4), sharex=True)
    for i, s in enumerate(rows):
        for ax, k in zip(axes, ("subject", "recontext", "drift")):
            m = [v[0] for v in s[k]]
            se = [0 if math.isnan(v[1]) else v[1] for v in s[k]]
            style = "-" if s["config"].startswith("loldu") else "--"
            ax.errorbar(s["steps"], m, yerr=se, label=s["config"], color=plt.cm.tab20(i % 20), linestyle=style, capsize=2)
    for ax, title in zip(axes, ("subject / ceiling", "recontextualisation / ceiling", "drift onto the class prompt (points)")):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].axhline(LEARNT, color="gray", linewidth=0.6)
    axes[2].axhline(DRIFT_BAR, color="gray", linewidth=0.6)
    fig.suptitle("bench subjects, mean ± standard error over runs (LoLDU solid)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="center right")
    fig.savefig(path, dpi=100)
    plt.close(fig)
