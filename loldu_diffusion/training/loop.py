"""The DreamBooth training loop, on accelerate (processes, mixed precision, checkpoints,
trackers). `train(args)` is what `train_dreambooth_loldu.py` runs.

The arguments are settled before the loop (args.resolve_defaults, check_inputs,
settle_schedule: each returns a new namespace) and nothing changes them after; the model
family (models.py), the batch and loss (steps.py), the checkpoint writer (checkpoints.py)
and what each method trains (methods.py) live in their own modules. This file is the order
in which they run.
"""
from __future__ import annotations

import functools
import os
import time
import types

import torch

from ..adapter_file import AdapterFileError
from ..compile import compile_unet, uncompile_unet
from ..embeddings import EMBEDDINGS_FILE
from ..export import embedding_warning
from ..quiet import quiet_libraries
from . import compat, report
from .args import check_inputs, recipe_note, resolve_defaults, settle_schedule
from .concepts import subject_args
from .checkpoints import (TRAINABLE_FILE, check_resume_matches, check_resume_subjects, checkpoint_step, existing_outputs, load_history,
                          load_run_state, phase_change_note, resolve_resume, subject_list, write_checkpoint)
from .data import DataError, ImageSet, check_identifier, class_caption, class_captions, step_generator
from .errors import TrainingError
from .methods import keep_fused_choice, make_method, make_optimizer, optimizer_warnings, param_groups
from .models import (PromptEncoder, cast_frozen, ensure_class_images, frozen_modules, generate, load_models, native_resolution,
                     text_encoders_of, validation_pipeline)
from .outdir import claim_output_dir, refuse_to_replace
from .steps import LatentCache, dreambooth_loss, noised, sample_batch

TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",), "mlflow": ("mlflow",),
            "clearml": ("clearml",), "dvclive": ("dvclive",), "aim": ("aim",)}


# ---- before the model loads ----------------------------------------------------------------
def tracker_installed(name: str) -> bool:
    import importlib.util

    return any(importlib.util.find_spec(module) is not None for module in TRACKERS.get(name, (name,)))


def choose_tracker(report_to: str | None) -> tuple[str | None, str | None]:
    """(tracker, warning): a tracker that is not installed falls back to tensorboard (or none)
    with one line saying how to install it, rather than failing after the model has loaded."""
    if report_to in (None, "none", ""):
        return None, None
    if report_to not in TRACKERS or tracker_installed(report_to):
        return report_to, None
    fallback = "tensorboard" if report_to != "tensorboard" and tracker_installed("tensorboard") else None
    return fallback, (f"--report_to {report_to}: {report_to} is not installed (pip install {report_to.replace('_', '-')}); "
                      + ("logging to tensorboard instead" if fallback else "training without a tracker"))


def start_accelerator(args, report_to):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) and hasattr(AcceleratorState, "_reset_state"):
        # accelerate's state is process-wide: an earlier run in this process (the tests, the app)
        # would refuse this one's --mixed_precision
        AcceleratorState._reset_state(True)
    return Accelerator(
        # no GPU: say so, so that `accelerate launch --num_processes N` runs N CPU processes over gloo
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )


def thread_note(device_type: str, num_processes: int, threads: int, cores: int, omp: str | None) -> str | None:
    """One process on a CPU using fewer of its cores than it has, because OMP_NUM_THREADS says so: `accelerate launch`
    sets it to 1 on a CPU unless told otherwise, and a user may not know."""
    if device_type != "cpu" or num_processes != 1 or threads >= cores or omp is None:
        return None
    return (f"note: torch uses {threads} of this CPU's {cores} cores (OMP_NUM_THREADS={omp}, which `accelerate launch` sets to 1 on a "
            f"CPU unless told): `accelerate launch --num_cpu_threads_per_process {cores} …` uses them all")


def training_resolution(args, m, say) -> int:
    native = native_resolution(m)
    resolution = args.resolution or native
    if not 0.5 < resolution / native < 2:
        ratio = resolution / native
        say(f"warning: --resolution {resolution} is {ratio:.3g}× the base model's native {native} px: "
            + (f"each step costs about {ratio ** 2:.0f}× more, and " if ratio > 1 else "")
            + f"the base draws poorly at sizes it was not trained at; leave --resolution out to train at {native}")
    if resolution % (8 if m.vae_scale >= 8 else m.vae_scale):
        raise TrainingError(f"--resolution {resolution} must be a multiple of {m.vae_scale}")
    return resolution


def warn_about_photos(instance: ImageSet, native: int, say) -> None:
    photos = sum(side > 2 * native for side in instance.read_sides)
    if photos:
        say(f"warning: the embedded base only knows its own toy world ({native} px scenes of six shapes in eight colours); "
            f"{photos} of the {len(instance.read_sides)} instance images are larger pictures, likely photos, which it cannot "
            "learn recognisably: for photos, pass a real Stable Diffusion model with --pretrained_model_name_or_path")


# ---- one step --------------------------------------------------------------------------------
def subject_rows(args, run, subject, step: int, micro: int, process: int):
    """(noised batch, captions) of one subject: instance rows, then class rows under prior
    preservation. Every random draw comes from this step's own generator, the same for every
    subject, so a subject's rows are the ones a run of that subject alone would draw."""
    gen = step_generator(args.seed, step, micro, process)
    latents, captions = sample_batch(gen, subject.instance, subject.inst_cache, args.train_batch_size, args.random_flip)
    if subject.classes:
        class_latents, class_captions = sample_batch(gen, subject.classes, subject.class_cache, args.train_batch_size, args.random_flip)
        latents, captions = torch.cat([latents, class_latents]), captions + class_captions
    return noised(latents, gen, run.sched, args.noise_offset, run.device, run.weight_dtype), captions


def step_loss(args, run, step: int, micro: int, process: int):
    """(the loss of one micro-batch, each subject's part (K,)): the sum of each subject's
    DreamBooth loss, all subjects in one UNet call. Rows are interleaved (row j is subject j mod K) because a per-sample adapter
    blend serves row j with blend j mod K (LoLDULayer.sample_weights)."""
    parts = [subject_rows(args, run, s, step, micro, process) for s in run.subjects]
    k = len(parts)
    x = types.SimpleNamespace(**{f: interleave([getattr(p, f) for p, _ in parts]) for f in ("noisy", "target", "t")})
    captions = [c for row in zip(*(caps for _, caps in parts)) for c in row]
    hidden, added = run.prompts(captions)
    with run.accelerator.autocast():
        pred = run.m.family.call_unet(run.unet, x.noisy, x.t, hidden.to(run.weight_dtype), added)
    losses = [dreambooth_loss(pred if k == 1 else pred.unflatten(0, (-1, k))[:, i], p.target, p.t, run.sched, args.snr_gamma,
                              args.prior_loss_weight, with_prior=bool(s.classes)) for i, ((p, _), s) in enumerate(zip(parts, run.subjects))]
    return functools.reduce(torch.add, losses), torch.stack([loss.detach() for loss in losses])


def interleave(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[a0, b0, …, a1, b1, …]: row j of the result is row j // K of tensor j mod K."""
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors, 1).flatten(0, 1)


def clip_gradients(accelerator, parameter_sets, max_norm: float) -> None:
    """Each subject's gradients clipped on their own norm, as in a run of that subject alone."""
    if len(parameter_sets) == 1:
        accelerator.clip_grad_norm_(parameter_sets[0], max_norm)
        return
    accelerator.unscale_gradients()
    for params in parameter_sets:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def make_lr_scheduler(args, optimizer, num_processes: int):
    """diffusers' scheduler over the run's optimizer steps. accelerate steps a prepared scheduler once per process at each
    optimizer step (the batch it assumes grows with the processes), so warmup and length are counted in those units, as
    diffusers' scripts count them; counted in optimizer steps, a 2-process cosine run hit 0 halfway and climbed back."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=args.max_train_steps * num_processes, num_cycles=args.lr_num_cycles, power=args.lr_power)


def subjects_of(args) -> list:
    """The arguments of each subject's own run: [args], or one per --concepts_list entry."""
    return [args] if not args.concepts else [subject_args(args, c) for c in args.concepts]


# ---- the run ---------------------------------------------------------------------------------
def train(args) -> dict:
    quiet_libraries()  # before diffusers imports its pipelines
    t_start = time.time()
    try:
        args = resolve_defaults(args)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    args = check_inputs(args)
    resume_path = resolve_resume(args)
    found_outputs = functools.partial(existing_outputs, subjects=[c.name for c in args.concepts or ()])
    refuse_to_replace(args.output_dir, found_outputs(args.output_dir), bool(args.resume_from_checkpoint), resume_path, args.overwrite)

    report_to, tracker_warning = choose_tracker(args.report_to)
    accelerator = start_accelerator(args, report_to)
    lock = claim_output_dir(args, accelerator, resume_path, found_outputs)
    try:
        return train_in_claimed_dir(args, accelerator, resume_path, report_to, tracker_warning, t_start)
    finally:  # now, not when the frame is collected: an error's traceback keeps the frame (and the lock) alive
        if lock is not None:
            lock.close()


def train_in_claimed_dir(args, accelerator, resume_path, report_to, tracker_warning, t_start) -> dict:
    """train() once the arguments are settled and the output folder is locked: the run itself."""
    from accelerate.utils import set_seed
    from safetensors.torch import load_file, save_file

    is_main, say = accelerator.is_main_process, accelerator.print
    if tracker_warning:
        say(f"warning: {tracker_warning}")
    for line in compat.notes(args):
        say(line)
    if args.concepts and args.validation_prompt:
        say("note: --validation_prompt changes nothing with --concepts_list: the subjects' adapters are apart until the end; "
            "preview each with loldu generate --adapter OUTPUT_DIR/NAME/loldu_adapter.safetensors")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if note := thread_note(accelerator.device.type, accelerator.num_processes, torch.get_num_threads(), cores,
                           os.environ.get("OMP_NUM_THREADS")):
        say(note)
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        say("warning: --mixed_precision fp16 on a CPU: CPUs have no fast fp16 arithmetic, so every step runs many times slower "
            "than in fp32; use --mixed_precision no (or bf16, which CPUs do run fast under autocast)")
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # the base and the data
    m = load_models(args)
    resolution = training_resolution(args, m, say)
    try:
        instances = [load_instance_images(s, resolution, say) for s in subjects_of(args)]
    except DataError as e:
        raise TrainingError(str(e)) from None
    for s, instance in zip(subjects_of(args), instances):
        warning = check_identifier(s.instance_prompt)
        if warning:
            say(f"warning: {warning}")
        if args.embedded and is_main:
            warn_about_photos(instance, native_resolution(m), say)
    if args.concepts and args.max_train_steps is None and len(set(map(len, instances))) > 1:
        say("note: --num_train_epochs with --concepts_list counts the epochs of the subject with the most images; the others see "
            "theirs more often than a run of their own would (--max_train_steps gives every subject the steps it says)")
    try:
        args = settle_schedule(args, max(map(len, instances)), accelerator.num_processes)  # settled: nothing below changes args
    except ValueError as e:  # a phase too long for a run counted in epochs
        raise TrainingError(str(e)) from None
    if note := recipe_note(args):  # after settling: the phase is a quarter of the run, known here under --num_train_epochs too
        say(note)
    for line in optimizer_warnings(args):
        say(line)
    subjects = subjects_of(args)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for mod in frozen_modules(m):
        mod.to(device)
    classes = [None] * len(subjects)
    if args.with_prior_preservation:
        for i, (s, instance) in enumerate(zip(subjects, instances)):
            contexts = class_captions(instance.captions, s.instance_prompt, s.class_prompt) if args.class_prompts_from_captions else None
            unnamed = [c for c in instance.captions if class_caption(c, s.instance_prompt, s.class_prompt) is None] if contexts else []
            if unnamed and is_main:
                say(f"warning: --class_prompts_from_captions: {len(unnamed)} of {len(instance.captions)} captions name neither the "
                    f"instance prompt {s.instance_prompt!r} nor its identifier (e.g. {unnamed[0]!r}): their class images are drawn "
                    "from the class prompt alone; keep the identifier in every caption")
            ensure_class_images(s, accelerator, m, resolution, contexts)
            classes[i] = ImageSet.from_folder(s.class_data_dir, s.class_prompt, resolution, flag="--class_data_dir", warn=say,
                                              resample=args.image_interpolation_mode)
            if contexts and s.class_prompt not in contexts and s.class_prompt in classes[i].captions and is_main:
                say(f"warning: --class_data_dir {s.class_data_dir}: {classes[i].captions.count(s.class_prompt)} class images have no "
                    "caption (drawn from the class prompt alone, before --class_prompts_from_captions); delete them to have them "
                    "drawn in the photos' contexts")
    if is_main:
        os.makedirs(args.output_dir, exist_ok=True)

    def validation(unet_, desc, bar=True):
        """The validation images (None without --validation_prompt), or None and a warning: a
        failing validation never costs the run."""
        if not args.validation_prompt or not args.num_validation_images or args.concepts:  # several subjects: their adapters are apart until the end
            return None
        try:
            # the frozen base is cast to half precision below; bf16 on a CPU only runs under autocast
            with accelerator.autocast():
                return generate(validation_pipeline(m, unet_, args), args.validation_prompt, args.num_validation_images, args.seed, args,
                                resolution, desc=desc if bar else None)
        except Exception as e:  # noqa: BLE001 — any library error; the adapter matters more than its preview
            say(f"warning: {desc} failed, training goes on without these images: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
            return None

    before = validation(m.unet, desc="validation (before)") if is_main and not resume_path else None

    # the method: attach, then cast what stays frozen
    set_seed(args.seed)  # the random z₀ inits and LoRA's init draw from the global RNG
    method = make_method(args)
    models = types.SimpleNamespace(unet=m.unet, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2, tokenizer=m.tokenizer,
                                   tokenizer_2=m.tokenizer_2, scheduler=m.noise_scheduler, base_path=m.path, base_parts=m.base_parts)
    params = method.setup(models)
    n_trainable = sum(p.numel() for p in params)
    if weight_dtype != torch.float32:
        for mod in frozen_modules(m):
            cast_frozen(mod, weight_dtype)
    if args.gradient_checkpointing:
        m.unet.enable_gradient_checkpointing()
    optimizer = make_optimizer(args, param_groups(args, params, text_encoders_of(m), method.text_side_parameters()), args.optimizer_lr,
                               accelerator.mixed_precision)
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator.num_processes)
    text_encoders = text_encoders_of(m) if method.trains_text_encoder else []
    # DDP wraps only an encoder with trained weights of its own; pivotal tuning's embedding is a tensor outside every module
    # (its gradient flows through the frozen encoder and is averaged over the processes by hand, below)
    owns = [any(p.requires_grad for p in e.parameters()) for e in text_encoders]
    unet, optimizer, lr_scheduler, *prepared = accelerator.prepare(m.unet, optimizer, lr_scheduler,
                                                                   *(e for e, o in zip(text_encoders, owns) if o))
    prepared = iter(prepared)
    train_encoders = [next(prepared) if o else e for e, o in zip(text_encoders, owns)]
    outside_modules = method.text_side_parameters() if accelerator.num_processes > 1 else []
    held_in_phase = method.adapter_parameters(params) if args.ti_only_steps else []
    if args.compile:  # the module's own forward: names, state dict and adapters stay as they are (compile.py)
        compile_unet(accelerator.unwrap_model(unet), backend=args.compile_backend)
    # the trained text encoders run through their wrappers so their gradients are synchronised
    run = types.SimpleNamespace(
        accelerator=accelerator, m=m, unet=unet, sched=m.noise_scheduler, device=device, weight_dtype=weight_dtype,
        prompts=PromptEncoder(m, device, resolution, (tuple(train_encoders) + (None,))[:2] if text_encoders else None,
                              args.tokenizer_max_length, args.text_encoder_use_attention_mask),
        subjects=[types.SimpleNamespace(instance=i, classes=c, inst_cache=LatentCache(m, i, resolution, args, device, weight_dtype),
                                        class_cache=LatentCache(m, c, resolution, args, device, weight_dtype) if c else None)
                  for i, c in zip(instances, classes)])

    def save_hook(models_, weights, output_dir):
        if is_main:
            save_file(method.trainable_state(models), os.path.join(output_dir, TRAINABLE_FILE))
            method.save_checkpoint_models(models, output_dir)  # full fine-tuning: checkpoint-N/unet as diffusers writes it
        weights.clear()  # the frozen base is not checkpointed: only what trains

    def load_hook(models_, input_dir):
        method.load_trainable_state(models, load_file(os.path.join(input_dir, TRAINABLE_FILE)))
        models_.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    global_step, history = 0, []
    earlier, during = {}, []  # the killed part of a resumed run: its time and validation images
    if args.resume_from_checkpoint and resume_path is None:
        say(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir}; starting a new run")
    if resume_path:
        check_resume_matches(resume_path, method.trainable_state(models))
        check_resume_subjects(resume_path, subject_list(args))
        accelerator.load_state(resume_path)
        keep_fused_choice(optimizer)
        global_step, history = checkpoint_step(resume_path), load_history(resume_path)
        earlier, before, during = load_run_state(resume_path)
        say(f"resumed from {resume_path} at step {global_step}")
        if note := phase_change_note(resume_path, earlier.get("ti_only_steps"), args.ti_only_steps, global_step):
            say(note)
    if is_main and report_to:
        accelerator.init_trackers("dreambooth-" + args.method, config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    # the loop
    sync_check = accelerator.num_processes > 1 and n_trainable < 10_000_000
    divergence = 0.0
    bar = tqdm_bar(args, global_step, is_main)
    unet.train()
    train_time, steps_run = earlier.get("train_seconds", 0.0), earlier.get("steps_run", 0)
    while global_step < args.max_train_steps:
        t0 = time.time()
        for micro in range(args.gradient_accumulation_steps):
            with accelerator.accumulate(unet, *train_encoders):
                loss, subject_losses = step_loss(args, run, global_step, micro, accelerator.process_index)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    for p in outside_modules:
                        if p.grad is not None:
                            p.grad = accelerator.reduce(p.grad, reduction="mean")
                if global_step < args.ti_only_steps:  # the inversion phase: AdamW skips parameters without a gradient
                    for p in held_in_phase:
                        p.grad = None
                if accelerator.sync_gradients and args.max_grad_norm:
                    clip_gradients(accelerator, method.parameter_sets(params), args.max_grad_norm)
                optimizer.step()
                method.after_step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        global_step += 1
        steps_run += 1
        loss_value = accelerator.gather(loss.detach()[None]).mean().item()
        history.append(loss_value)
        if sync_check:
            divergence = max(divergence, process_divergence(accelerator, params))
            if divergence > 0:
                raise RuntimeError(f"trainable values differ across processes at step {global_step} (max {divergence:g})")
        step_time = time.time() - t0
        train_time += step_time
        lr_now = lr_scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_now:.2g}", s_per_step=f"{step_time:.2f}")
        logged = {"loss": loss_value, "lr": lr_now, "step_time_s": step_time}
        if args.concepts:  # "loss" is the subjects' sum: each one's own curve too, as its own run would log it
            logged |= {f"loss/{c.name}": v for c, v in zip(args.concepts, accelerator.gather(subject_losses[None]).mean(0).tolist())}
        accelerator.log(logged, step=global_step)
        # validation first: the checkpoint then holds this step's images too
        if is_main and args.validation_steps and global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
            imgs = validation(accelerator.unwrap_model(unet), f"validation at step {global_step}", bar=False)
            if imgs:
                during.append((global_step, imgs))
                report.save_grid([imgs], os.path.join(args.output_dir, f"validation_step_{global_step}.png"))
                report.log_images(accelerator, "validation", imgs, global_step)
        if global_step % args.checkpointing_steps == 0:  # the last step too, as diffusers' scripts do
            state = {"seconds": earlier.get("seconds", 0.0) + time.time() - t_start, "train_seconds": train_time, "steps_run": steps_run,
                     "ti_only_steps": args.ti_only_steps, "subjects": subject_list(args)}
            write_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit, history, state, before, during)
    bar.close()
    accelerator.wait_for_everyone()

    summary = {}
    if is_main:
        unet_u = uncompile_unet(accelerator.unwrap_model(unet))  # validation and saving run eager: other shapes, no recompiles
        unet_u.eval()
        summary = {
            "method": args.method, "base_model": os.path.basename(os.path.normpath(args.pretrained_model_name_or_path)),
            "steps": global_step, "trainable_parameters": n_trainable, "learning_rate": args.learning_rate,
            "rank": args.rank, "batch_size": args.train_batch_size, "resolution": resolution,
            "seconds": round(earlier.get("seconds", 0.0) + time.time() - t_start, 1), "seconds_per_step": round(train_time / max(steps_run, 1), 4),
            "final_loss": history[-1] if history else None, "final_lr": lr_scheduler.get_last_lr()[0], "processes": accelerator.num_processes,
            "max_process_divergence": divergence if sync_check else None,
        }
        models.unet = unet_u
        finish(args, method, models, summary, history, before, during, validation, accelerator, say)
    accelerator.end_training()
    return summary


def tqdm_bar(args, initial: int, is_main: bool):
    from tqdm.auto import tqdm

    return tqdm(total=args.max_train_steps, initial=initial, desc=f"{args.method} training", disable=not is_main)


def process_divergence(accelerator, params) -> float:
    """Largest difference of any trainable value between processes (0 when they agree)."""
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    everyone = accelerator.gather(flat[None])
    return float((everyone - everyone[0]).abs().max())


def finish(args, method, models, summary, history, before, during, validation, accelerator, say) -> None:
    """Write the method's output first, then what shows it: validation images and grid, loss
    curve, the toy judge's report (embedded base), the model card."""
    metadata = {"instance_prompt": args.instance_prompt, "class_prompt": args.class_prompt, "validation_prompt": args.validation_prompt,
                "training": {k: summary[k] for k in ("steps", "learning_rate", "batch_size", "resolution", "seconds")}}
    outputs = method.save(models, args.output_dir, metadata)
    summary["outputs"] = [os.path.relpath(p, args.output_dir) for p in outputs]
    summary["output_bytes"] = sum(report.size_of(p) for p in outputs)
    report.write_json(os.path.join(args.output_dir, "train_summary.json"), summary)
    # the adapter is on disk before the final validation runs: a failure there costs only its images
    after = validation(models.unet, desc="validation (after)")
    if after:
        report.log_images(accelerator, "validation", after, summary["steps"])
    grids = report.write_images(args.output_dir, before, during, after)
    report.loss_curve(history, os.path.join(args.output_dir, "loss.png"))
    report.write_json(os.path.join(args.output_dir, "train_summary.json"), summary)
    subjects = subjects_of(args)
    for s in subjects:
        judged = judge_toy_subject(s, method)
        if judged:
            if args.concepts:
                summary.setdefault("judged", {})[os.path.basename(s.output_dir)] = judged
            else:
                summary["judged"] = judged
            report.write_json(os.path.join(args.output_dir, "train_summary.json"), summary)
            say(f"judged ({judged['n']} images per prompt): '{s.instance_prompt}' shows the whole subject in {judged['subject']:.0%} "
                f"of images, {judged['subject_of_ceiling']:.0%} of what the base draws when told exactly ({judged['ceiling']:.0%}); "
                f"the class prompt took its colour or marking {judged['drift_points']:+.0f} points more often than the base")
    if args.output_kohya_format:
        summary["outputs"] += [os.path.relpath(p, args.output_dir) for p in method.save_kohya(models, args.output_dir)]
        report.write_json(os.path.join(args.output_dir, "train_summary.json"), summary)
        for embedding in (o for o in summary["outputs"] if os.path.basename(o) == EMBEDDINGS_FILE):
            say(f"note: --output_kohya_format: {embedding_warning(f'the token embedding {embedding}')}")
    for s in subjects:  # each subject's card lists the outputs in its own folder
        own = [os.path.relpath(os.path.join(args.output_dir, o), s.output_dir) for o in summary["outputs"]]
        report.model_card(s, summary | {"outputs": [o for o in own if not o.startswith("..")]}, grids if not args.concepts else {})
    say(f"wrote {', '.join(summary['outputs'])} ({summary['output_bytes']:,} bytes) to {args.output_dir} "
        f"in {summary['seconds']:.0f} s ({summary['seconds_per_step']:.3f} s/step)")
    if args.push_to_hub:
        say(f"uploaded to {push_to_hub(args)}")


def load_instance_images(args, resolution, say) -> ImageSet:
    """--instance_data_dir (a folder), or --dataset_name (the datasets library), × --repeats."""
    if args.dataset_name:
        images = ImageSet.from_dataset(args.dataset_name, args.dataset_config_name, args.image_column, args.caption_column,
                                       args.instance_prompt, resolution, args.cache_dir, resample=args.image_interpolation_mode)
    else:
        images = ImageSet.from_folder(args.instance_data_dir, args.instance_prompt, resolution, warn=say, resample=args.image_interpolation_mode)
    return images.repeated(args.repeats)


def push_to_hub(args) -> str:
    """Upload the output folder (without checkpoints) to --hub_model_id; one line if it fails."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    try:
        repo_id = create_repo(repo_id, exist_ok=True, token=args.hub_token).repo_id
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token, commit_message="End of training",
                      ignore_patterns=["step_*", "epoch_*", "checkpoint-*", "logs/*", ".loldu-train.lock", "class_images/*"])
    except Exception as e:  # noqa: BLE001 — network, auth and hub errors differ between releases
        raise TrainingError(f"--push_to_hub: the upload to {repo_id} failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); "
                            f"the output is in {args.output_dir}: upload it later with huggingface-cli upload {repo_id} {args.output_dir}") from None
    return f"https://huggingface.co/{repo_id}"


def judge_toy_subject(args, method):
    """On the embedded base, a folder rendered by toy.concepts says which subject it shows: judge
    the output the way `loldu bench learning` does. None elsewhere (real photos have no judge)."""
    from ..toy.concepts import read_subject

    subject = read_subject(args.instance_data_dir) if args.embedded and args.judge_images > 0 else None
    if subject is None:
        return None
    from ..bench.learning import judge_output

    return judge_output(args, method, subject, args.judge_images)


def main(argv=None) -> int:
    import sys

    from .args import parse_args

    args = parse_args(argv)
    try:
        train(args)
    except (TrainingError, AdapterFileError, FileExistsError, OSError) as e:
        if int(os.environ.get("RANK", "0")) == 0:  # every process finds the same mistake: say it once
            from ..io import describe_os_error

            print(f"error: {describe_os_error(e) if isinstance(e, OSError) and not isinstance(e, FileExistsError) else e}", file=sys.stderr)
        # A failure must fail (scripts and CI read the status). `accelerate launch` answers it with
        # a traceback of its own unless launched with --quiet (-q); the README says so.
        return 2
    return 0
