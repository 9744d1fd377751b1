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
from .methods import ADAPTER_FILE, EMBEDDINGS_FILE, KOHYA_FILE, LORA_FILE, PeftVectorMethod

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
    """The checkpoint folder to resume from: `latest` in --output_dir, a name in --output_dir
    (diffusers' reading), or a path; None for `latest` when there is none."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(args.output_dir)
        return found[-1][1] if found else None
    given = args.resume_from_checkpoint
    path = next((p for p in (os.path.join(args.output_dir, given), given) if os.path.isdir(p)), given)
    if not os.path.isfile(os.path.join(path, TRAINABLE_FILE)):
        raise TrainingError(f"--resume_from_checkpoint {given}: no checkpoint there (expected {TRAINABLE_FILE})")
    if not CHECKPOINT.match(os.path.basename(os.path.normpath(path))):
        raise TrainingError(f"--resume_from_checkpoint {given}: a checkpoint folder is named checkpoint-STEP (the run resumes at "
                            "that step); give it back the name it was written with")
    return path


# what a finished run leaves, by method: none is replaced without --overwrite
FINAL_OUTPUTS = (ADAPTER_FILE, LORA_FILE, KOHYA_FILE, EMBEDDINGS_FILE, PeftVectorMethod.FILE, "unet")


def existing_outputs(output_dir: str, subjects=()) -> list[str]:
    """What a run would replace in output_dir (and, under --concepts_list, in each subject's
    folder): a finished run's outputs, and the checkpoints of an earlier run."""
    names = FINAL_OUTPUTS + tuple(os.path.join(s, n) for s in subjects for n in FINAL_OUTPUTS)
    found = [n for n in names if os.path.exists(os.path.join(output_dir, n))]
    return found + [os.path.basename(p) for _, p in list_checkpoints(output_dir)]


def later_checkpoints(output_dir: str, resume_path: str) -> list[str]:
    """The checkpoints of output_dir after the one a run resumes from: the part of the earlier
    run that this one replaces."""
    step = checkpoint_step(resume_path)
    return [p for s, p in list_checkpoints(output_dir) if s > step]


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


def subject_list(args) -> list[list[str]] | None:
    """[[name, instance folder], …] of a --concepts_list run, in the list's order; None otherwise."""
    return [[c.name, os.path.abspath(c.instance_data_dir)] for c in args.concepts] if args.concepts else None


def check_resume_subjects(path: str, subjects) -> None:
    """A --concepts_list run resumes with the subjects it began with, in the same order: each subject's adapter comes
    back by name, but its optimizer state by position, so another order would hand one subject another's moments."""
    try:
        with open(os.path.join(path, RUN_FILE)) as f:
            began = json.load(f).get("subjects")
    except (OSError, ValueError):
        return  # a checkpoint from before subjects were recorded
    if began is not None and began != subjects:
        said = ", ".join(f"{n} ({os.path.basename(d)})" for n, d in began)
        raise TrainingError(f"--resume_from_checkpoint {path}: its run trained the subjects {said}, in this order; "
                            "resume with the --concepts_list it began with (the same entries, names and order)")


def load_history(folder: str) -> list[float]:
    path = os.path.join(folder, HISTORY_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def prune_checkpoints(output_dir: str, total_limit: int | None, keep: str) -> None:
    """The oldest checkpoints but `keep` (the one just written), so that `total_limit` remain:
    diffusers' count. diffusers prunes before it writes, so a write that fails (a full disk, a
    kill) leaves no checkpoint at all; here the new one is in place first."""
    if total_limit is None:
        return
    others = [p for _, p in list_checkpoints(output_dir) if os.path.normpath(p) != os.path.normpath(keep)]
    for old in others[: max(0, len(others) - total_limit + 1)]:
        shutil.rmtree(old)


def write_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None, history: list[float], run_state: dict,
                     before, during) -> str:
    """`checkpoint-{step}`: accelerate's state (the save hook writes what trains), the loss
    history and the run state; all processes call it."""
    is_main = accelerator.is_main_process
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
        prune_checkpoints(output_dir, total_limit, keep=final)
    accelerator.wait_for_everyone()
    return final
