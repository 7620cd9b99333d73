"""Files written whole or not at all, and torch files loaded without running code.

* :func:`atomic_write` and its text/JSON/torch forms: write a temp file beside the target,
  fsync, ``os.replace``: a crash leaves the old file or the new one, never half of either.
* :func:`new_temp_folder` + :func:`rename_onto_new`: build a folder beside its target and
  move it into place only when complete, never onto something that appeared meanwhile.
* :func:`safe_load`: ``torch.load(weights_only=True)`` (a pickle with code in it is
  refused) with one error type, :class:`~toolkit.errors.CheckpointError`, for any damage.

Checkpoints, tracking files, reports, benchmark JSON, shard folders and data sets all write
through here.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import CheckpointError

__all__ = [
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "new_temp_folder",
    "rename_onto_new",
    "safe_load",
]


# --------------------------------------------------------------------------- atomic writes


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path``, fsync it, then ``os.replace``.

    The temp file lives in the same directory so the rename never crosses a filesystem
    (``os.replace`` is only atomic within one). A crash before the rename leaves the old
    ``path`` untouched; the temp file is removed on any exception.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions of any new file
        # (umask), so teammates and the host user outside a container can read runs.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        # BaseException too: a KeyboardInterrupt mid-save must not leave litter behind.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable across a power cut; not supported everywhere (Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` that never leaves a half-written file at ``path``."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``text`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode(encoding)))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Replace ``path`` with ``obj`` as JSON atomically (trailing newline, stable key order)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


# --------------------------------------------------------------------------- safe loading


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error type for every failure.

    Raises :class:`CheckpointError` naming the file when it is missing, truncated, corrupt, or
    holds objects the weights-only unpickler refuses (arbitrary classes, functions).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # RuntimeError, UnpicklingError, EOFError, ... depending on the damage
        text = str(e)
        # torch's message is a long paragraph; keep the part that says what went wrong.
        detail = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
        detail = " ".join(detail.split())[:300] or type(e).__name__
        if "Unsupported global" in text:
            reason = "holds objects that weights_only loading refuses (save only tensors, dicts, lists, numbers, str, None)"
        else:
            reason = "unreadable (truncated or corrupt; was the save interrupted?)"
        raise CheckpointError(f"{path}: {reason}: {detail}") from e


# --------------------------------------------------------------------------- folders


def new_temp_folder(out: str | os.PathLike) -> Path:
    """An empty hidden folder beside ``out`` (same file system, so the final rename is atomic)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def rename_onto_new(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """``os.rename(tmp, out)`` that raises FileExistsError if anything is at ``out``.

    ``os.rename`` silently replaces an *empty* folder, so ``out`` is first created with
    ``os.mkdir``, which fails if anything appeared there; the rename then lands on this empty
    folder of ours, and fails (FileExistsError too) if someone put files in it in between.
    """
    os.mkdir(out)  # FileExistsError: something is there
    try:
        os.rename(tmp, out)
    except OSError as exc:
        try:
            os.rmdir(out)
        except OSError:
            pass  # someone else's files are in it now: theirs to keep
        raise FileExistsError(f"{out} changed while it was being replaced ({exc.strerror})") from None
