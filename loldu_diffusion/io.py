"""Writing files so that nothing the user had is lost: temp file + rename, no silent overwrite;
and reading small files from strangers so that what is checked is what is used."""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import struct
import tempfile

TEMP_PREFIX = ".tmp-"  # atomic_save_safetensors' temp files: `.tmp-XXXX.safetensors`


def read_bounded(path: str, max_bytes: int, error: type[Exception], what: str) -> bytes:
    """The bytes of a regular file, read through one open: a reader that checks the size, then
    the header, then parses, each with its own open, can be handed another file in between (a
    stranger's upload swapped on disk), and a hash taken apart from the read can speak for other
    bytes. A missing file, a FIFO (opened without blocking), a folder, or more than `max_bytes`
    (nothing read) raise `error` with one line naming the file and `what` it should be."""
    name = os.path.basename(path) or path
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        raise error(f"{path}: no such {what}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{name}: not a regular file")
        data = fh.read(max_bytes + 1) if st.st_size <= max_bytes else b""
    if st.st_size > max_bytes or len(data) > max_bytes:
        article = "an" if what[:1] in "aeiou" else "a"
        raise error(f"{name}: {max(st.st_size, len(data)):,} bytes is larger than the {max_bytes:,}-byte limit for {article} {what}")
    return data


def unique_keys(pairs):
    """json's object_pairs_hook that refuses a repeated key (json keeps the last one silently)."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("repeated key")
    return dict(pairs)


def safetensors_header(data: bytes, max_header_bytes: int) -> dict:
    """The header of safetensors bytes, read by hand before safetensors allocates anything: its
    length bounded, its JSON without repeated keys (json would keep the last, safetensors may
    not). ValueError with a one-line reason."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"header length {n} beyond the end of the file")
    if n > max_header_bytes:
        raise OverflowError(f"safetensors header of {n} bytes is larger than the {max_header_bytes}-byte limit")
    try:
        header = json.loads(data[8 : 8 + n], object_pairs_hook=unique_keys)
        assert isinstance(header, dict)
    except Exception:  # also RecursionError from absurd nesting
        raise ValueError("the header is not valid JSON (or repeats a key)") from None
    return header


def describe_os_error(e: OSError) -> str:
    """One sentence for an I/O error, naming the path: what the user sees instead of a stack."""
    what = e.strerror or (str(e).splitlines() or [type(e).__name__])[0]
    if e.filename is not None:
        what = f"{e.filename}: {what}"
    hint = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
            errno.EROFS: "write to another folder", errno.EACCES: "check the permissions or write to another folder",
            errno.EPERM: "check the permissions or write to another folder"}.get(e.errno)
    return f"{what} ({hint})" if hint else what


def file_sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def refuse_existing(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists: choose another name or pass overwrite=True (--overwrite)")


def atomic_save_safetensors(tensors: dict, path: str, metadata: dict | None = None, overwrite: bool = False) -> str:
    """safetensors.save_file to a temp file beside `path`, fsync, then rename over it."""
    from safetensors.torch import save_file

    refuse_existing(path, overwrite)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        except Exception as e:  # safetensors reports a full disk as its own SafetensorError
            if isinstance(e, OSError):
                raise
            code = errno.ENOSPC if "space" in str(e).lower() else errno.EIO
            raise OSError(code, f"could not write ({str(e).splitlines()[0]})", path) from None
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; these files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write(path: str, write, suffix: str = "") -> str:
    """write(tmp) to `path + ".tmp" + suffix`, then rename it over `path`: a reader (or a kill)
    never sees half a file. `suffix` keeps the extension PIL and matplotlib read the format from."""
    tmp = path + ".tmp" + suffix
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str, text: str) -> str:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def check_output_folder(path: str, overwrite: bool) -> None:
    """A folder `atomic_save_dir` may write: new, or (overwrite) an existing folder that is not
    where the command runs nor above it (replacing it would delete what the user is in)."""
    refuse_existing(path, overwrite)
    target = os.path.abspath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(errno.ENOTDIR, "a file, not a folder: choose a folder name", path)
    if os.path.exists(target) and _holds_cwd(target):
        raise IsADirectoryError(errno.EISDIR, "the current folder or one above it: choose a new folder name", path)


def _holds_cwd(folder: str) -> bool:
    """Whether `folder` is the current folder or above it, by inode (symlinks, letter case and drives included)."""
    st, p = os.stat(folder), os.getcwd()
    while True:
        if os.path.samestat(st, os.stat(p)):
            return True
        parent = os.path.dirname(p)
        if parent == p:
            return False
        p = parent


def atomic_save_dir(save, path: str, overwrite: bool = False) -> str:
    """Call save(tmp_dir) in a fresh temp folder beside `path`, then move it to `path` (replacing
    an existing folder only with overwrite). The old folder is renamed aside before the new one
    is renamed in and deleted only after: a kill at any point leaves one of the two whole."""
    check_output_folder(path, overwrite)
    target = os.path.abspath(path)
    parent, name = os.path.split(target.rstrip(os.sep))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name}-", dir=parent)
    try:
        save(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a saved model is meant to be shared
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name}-old-", dir=parent) if os.path.exists(target) else None
    try:
        if old is not None:
            os.replace(target, os.path.join(old, name))
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:  # the old folder back where it was
                os.replace(os.path.join(old, name), target)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(os.path.join(old, name)):
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _read_umask() -> int:
    umask = os.umask(0)  # process-wide for an instant: read once, at import, before threads start
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _umask() -> int:
    return _UMASK


def save_png_with_settings(image, folder: str, seed: int, settings: dict) -> str:
    """`folder/NNNN_seedS.png` holding `settings` as JSON in its "parameters" text chunk (where
    A1111 keeps its settings). Written to a temp name and renamed; never replaces an earlier image."""
    import json

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(settings))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".png", dir=folder)  # unique: writers in other processes
    os.close(fd)
    try:
        image.save(tmp, pnginfo=info)
        os.chmod(tmp, 0o666 & ~_umask())
        k = 0
        while True:  # claim a name no one has (a rename would replace another writer's image)
            path = os.path.join(folder, f"{k:04d}_seed{seed}.png")
            try:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise
                except OSError:  # a file system without hard links: reserve the name, then rename over it
                    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    os.replace(tmp, path)
                return path
            except FileExistsError:
                k += 1
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
