"""The output folder belongs to one run: a lock, no silent replacement, no stale temp files.

Two trainers on one --output_dir would mix their checkpoints and replace each other's adapter,
so the main process holds an exclusive `flock` on `OUTPUT_DIR/.loldu-train.lock` for the whole
run (the kernel releases it when the process ends, kill -9 included). Only while holding it may
the run delete the temp files a killed write left behind: nobody else is writing there.
"""
from __future__ import annotations

import fnmatch
import os
import shutil

from .errors import TrainingError

LOCK_FILE = ".loldu-train.lock"
# what our atomic writes leave when killed: io.atomic_save_safetensors, report's *.tmp(.png),
# checkpoint-N.tmp folders, io.atomic_save_dir's .tmp-NAME-* folders (.lora.tmp and unet.tmp before session 15)
_TEMP_FILES = (".tmp-*.safetensors", ".tmp-*.png", "*.tmp.png", "*.tmp")
_TEMP_DIRS = ("checkpoint-*.tmp", ".tmp-*", ".lora.tmp", "unet.tmp")


def refuse_to_replace(output_dir: str, found: list[str], resume_asked: bool, resume_path, overwrite: bool) -> None:
    """A finished run's outputs are replaced only with --overwrite, also when
    `--resume_from_checkpoint latest` finds no checkpoint to continue from."""
    if resume_path is not None or overwrite or not found:
        return
    if resume_asked:
        raise TrainingError(f"--resume_from_checkpoint: no checkpoint in {output_dir}, which already holds {', '.join(found)}; "
                             "pass --overwrite to train anew and replace it, or choose another --output_dir")
    raise TrainingError(f"--output_dir {output_dir} already holds {', '.join(found)}; pass --overwrite to replace it, "
                         "--resume_from_checkpoint latest to continue, or choose another --output_dir")


def lock_output_dir(output_dir: str):
    """The open lock file (keep it referenced for the run), or TrainingError if another run
    holds it. Raises OSError (one line at the entry point) if the folder cannot be written."""
    import fcntl

    os.makedirs(output_dir, exist_ok=True)
    f = open(os.path.join(output_dir, LOCK_FILE), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise TrainingError(f"--output_dir {output_dir} is in use by another training run ({holder}); "
                             "wait for it to finish or choose another --output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def remove_stale_temp(output_dir: str) -> list[str]:
    """Delete the temp files and folders killed writes left in `output_dir` (hold the lock)."""
    removed = []
    for n in sorted(os.listdir(output_dir)):
        p = os.path.join(output_dir, n)
        if os.path.islink(p):
            continue
        if os.path.isdir(p) and any(fnmatch.fnmatch(n, pat) for pat in _TEMP_DIRS):
            shutil.rmtree(p)
            removed.append(n)
        elif os.path.isfile(p) and any(fnmatch.fnmatch(n, pat) for pat in _TEMP_FILES):
            os.unlink(p)
            removed.append(n)
    return removed


def claim_output_dir(args, accelerator, resume_path, found_outputs):
    """Lock the folder (main process), check again under the lock that nothing would be
    replaced silently, clean stale temp files. Every process raises the same error."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = lock_output_dir(args.output_dir)
            refuse_to_replace(args.output_dir, found_outputs(args.output_dir), bool(args.resume_from_checkpoint),
                              resume_path, args.overwrite)
            removed = remove_stale_temp(args.output_dir)
            if removed:
                accelerator.print(f"removed {len(removed)} temp file(s) left by an interrupted run: {', '.join(removed)}")
        except (TrainingError, OSError) as e:
            error = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = broadcast_object_list([None if error is None else str(error)])
        if shared[0] is not None and error is None:
            error = TrainingError(shared[0])
    if error is not None:
        if lock is not None:
            lock.close()
        raise error
    return lock
