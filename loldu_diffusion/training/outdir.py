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
# checkpoint-N.tmp folders, io.atomic_save_dir's .tmp-NAME-* folders, the full method's .pipeline.tmp* folder
# (.lora.tmp and unet.tmp before session 15); in --output_dir and in each --concepts_list subject's folder
_TEMP_FILES = (".tmp-*.safetensors", ".tmp-*.png", "*.tmp.png", "*.tmp")
_TEMP_DIRS = ("checkpoint-*.tmp", ".tmp-*", ".pipeline.tmp*", ".lora.tmp", "unet.tmp")


def refuse_to_replace(output_dir: str, found: list[str], resume_asked: bool, resume_path, overwrite: bool) -> None:
    """What --output_dir holds (`found`: a finished run's outputs, an earlier run's checkpoints)
    is replaced only with --overwrite. Resuming from one of its own checkpoints continues that
    run, unless checkpoints after it exist (two runs' checkpoints would mix, and `latest` would
    pick the abandoned one); resuming from a checkpoint elsewhere is a new run here."""
    from .checkpoints import later_checkpoints

    if overwrite or not found:
        return
    if resume_path is not None:
        if not _inside(resume_path, output_dir):
            raise TrainingError(f"--resume_from_checkpoint {resume_path} is not in --output_dir {output_dir}, which already holds "
                                f"{_listed(found)}; pass --overwrite to replace it, or choose an empty --output_dir")
        later = [os.path.basename(p) for p in later_checkpoints(output_dir, resume_path)]
        if later:
            raise TrainingError(f"--resume_from_checkpoint {os.path.basename(os.path.normpath(resume_path))}: {output_dir} also holds the "
                                f"later {_listed(later)} of the run it went on to; pass --overwrite to remove them and go on from here, "
                                "or move them out of the folder")
        return
    if resume_asked:
        raise TrainingError(f"--resume_from_checkpoint: no checkpoint in {output_dir}, which already holds {_listed(found)}; "
                             "pass --overwrite to train anew and replace it, or choose another --output_dir")
    raise TrainingError(f"--output_dir {output_dir} already holds {_listed(found)}; pass --overwrite to replace it, "
                         "--resume_from_checkpoint latest to continue, or choose another --output_dir")


def _listed(names: list[str], most: int = 4) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _inside(path: str, folder: str) -> bool:
    return os.path.dirname(os.path.realpath(path)) == os.path.realpath(folder)


def replaced_checkpoints(output_dir: str, resume_path) -> list[str]:
    """Under --overwrite, the checkpoints the run replaces: all of them for a new run, those after
    the one it resumes from otherwise (a checkpoint elsewhere: all of this folder's)."""
    from .checkpoints import later_checkpoints, list_checkpoints

    if resume_path is not None and _inside(resume_path, output_dir):
        return later_checkpoints(output_dir, resume_path)
    return [p for _, p in list_checkpoints(output_dir)]


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
            if args.overwrite:
                replaced = replaced_checkpoints(args.output_dir, resume_path)
                for p in replaced:
                    shutil.rmtree(p)
                if replaced:
                    accelerator.print(f"removed {_listed([os.path.basename(p) for p in replaced])} of the earlier run (--overwrite)")
            removed = [n for folder in [args.output_dir] + [os.path.join(args.output_dir, c.name) for c in args.concepts or ()]
                       if os.path.isdir(folder) for n in remove_stale_temp(folder)]
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
