"""Writing files so that nothing the user had is lost: temp file + rename, no silent overwrite."""
from __future__ import annotations

import os
import shutil
import tempfile


def refuse_existing(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists: choose another name or pass overwrite=True (--overwrite)")


def atomic_save_safetensors(tensors: dict, path: str, metadata: dict | None = None, overwrite: bool = False) -> str:
    """safetensors.save_file to a temp file beside `path`, fsync, then rename over it."""
    from safetensors.torch import save_file

    refuse_existing(path, overwrite)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; these files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save_dir(save, path: str, overwrite: bool = False) -> str:
    """Call save(tmp_dir), then move tmp_dir to `path` (replacing it only with overwrite)."""
    refuse_existing(path, overwrite)
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
