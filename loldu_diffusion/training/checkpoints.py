"""Checkpoints: what a killed run resumes from. Only what trains is saved (the frozen base is
not), plus the loss history and the run's time and validation images so that a resumed run
reports the whole run. A checkpoint is written to `checkpoint-N.tmp` and renamed: a kill
mid-save never leaves a broken one. Names and pruning follow diffusers' DreamBooth scripts."""
from __future__ import annotations

import json
import os
import re
import shutil

from .errors import TrainingError
from .methods import ADAPTER_FILE, LORA_FILE

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINABLE_FILE = "trainable.safetensors"
RUN_FILE = "run.json"
HISTORY_FILE = "history.json"


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    found = [(int(mt.group(1)), os.path.join(output_dir, n)) for n in os.listdir(output_dir) if (mt := CHECKPOINT.match(n))]
    return sorted(found)


def checkpoint_step(path: str) -> int:
    return int(CHECKPOINT.match(os.path.basename(os.path.normpath(path))).group(1))


def resolve_resume(args) -> str | None:
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(args.output_dir)
        return found[-1][1] if found else None
    path = args.resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(args.output_dir, path)
    if not os.path.isfile(os.path.join(path, TRAINABLE_FILE)):
        raise TrainingError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no checkpoint there (expected {TRAINABLE_FILE})")
    return path


def existing_outputs(output_dir: str, subjects=()) -> list[str]:
    """What a run would replace in output_dir (and, under --concepts_list, in each subject's folder)."""
    names = (ADAPTER_FILE, LORA_FILE, "unet") + tuple(os.path.join(s, ADAPTER_FILE) for s in subjects)
    return [n for n in names if os.path.exists(os.path.join(output_dir, n))]


def save_run_state(folder: str, state: dict, before, during) -> None:
    """Time so far and the validation images, beside a checkpoint: a resumed run then reports
    the whole run (total seconds, validation_before.png, the grid) and not only its own part."""
    images = {"before": before or []} | {str(step): imgs for step, imgs in during}
    for tag, imgs in images.items():
        for i, im in enumerate(imgs):
            im.save(os.path.join(folder, f"validation_{tag}_{i}.png"))
    with open(os.path.join(folder, RUN_FILE), "w") as f:
        json.dump(dict(state, images={tag: len(imgs) for tag, imgs in images.items()}), f)


def load_run_state(folder: str) -> tuple[dict, list | None, list]:
    """(state, before, during) as save_run_state wrote them; empty for older checkpoints."""
    from PIL import Image

    path = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(path):
        return {}, None, []
    with open(path) as f:
        state = json.load(f)

    def read(tag, n):
        out = []
        for i in range(n):
            with Image.open(os.path.join(folder, f"validation_{tag}_{i}.png")) as im:
                out.append(im.convert("RGB"))
        return out

    images = state.pop("images", {})
    during = sorted(((int(tag), read(tag, n)) for tag, n in images.items() if tag != "before"), key=lambda si: si[0])
    return state, read("before", images.get("before", 0)) or None, during


def phase_change_note(path: str, began: int | None, phase: int, step: int) -> str | None:
    """A resumed run whose inversion phase (--ti_only_steps; a quarter of the run in the embedded recipe unless given)
    differs from the one the checkpoint's run began with, where the difference still matters: say so and how to keep the
    first."""
    if began is None or began == phase or step >= max(began, phase):
        return None
    return (f"note: {os.path.basename(os.path.normpath(path))} is from a run whose embedding trained alone for its first {began} steps; "
            f"this run's is {phase}: add --ti_only_steps {began} to resume it as it began")


def check_resume_matches(path: str, expected: dict) -> None:
    """The checkpoint holds the values this run trains, by name and shape, or one line naming what differs (a run resumed
    with other flags: pivotal tuning turned on, another --rank or --unet_targets, another --method)."""
    from safetensors import safe_open

    with safe_open(os.path.join(path, TRAINABLE_FILE), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    wanted = {k: tuple(v.shape) for k, v in expected.items()}
    missing, unexpected = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
    reshaped = sorted(k for k in wanted.keys() & saved.keys() if wanted[k] != saved[k])
    if missing or unexpected or reshaped:
        said = [f"{what} {names[:2]}{' …' if len(names) > 2 else ''}" for what, names in
                (("lacks", missing), ("has values this run does not train:", unexpected), ("has other shapes for", reshaped)) if names]
        raise TrainingError(f"--resume_from_checkpoint {path}: the checkpoint {'; '.join(said)}: resume with the flags it was made with "
                            "(--method, --rank, --unet_targets, --train_text_encoder, --train_text_encoder_ti; an embedded-base run from before "
                            "session 14 trained at --rank 32)")


def load_history(folder: str) -> list[float]:
    path = os.path.join(folder, HISTORY_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def prune_checkpoints(output_dir: str, total_limit: int | None) -> None:
    """Oldest first, leaving room for the one about to be written (diffusers' semantics)."""
    if total_limit is None:
        return
    existing = list_checkpoints(output_dir)
    for _, old in existing[: max(0, len(existing) - total_limit + 1)]:
        shutil.rmtree(old)


def write_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None, history: list[float], run_state: dict,
                     before, during) -> str:
    """`checkpoint-{step}`: accelerate's state (the save hook writes what trains), the loss
    history and the run state; all processes call it."""
    is_main = accelerator.is_main_process
    if is_main:
        prune_checkpoints(output_dir, total_limit)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
    except RuntimeError as e:  # torch.save on a full disk: "basic_ios::clear", "PytorchStreamWriter failed"
        raise OSError(f"could not write the checkpoint {tmp}: {str(e).splitlines()[0]} (is the disk full?)") from None
    if is_main:
        with open(os.path.join(tmp, HISTORY_FILE), "w") as f:
            json.dump(history, f)
        save_run_state(tmp, run_state, before, during)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final
