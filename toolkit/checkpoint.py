"""Atomic checkpoints: write-tmp-then-rename, keep the last K plus best, resume from the newest good one.

Nothing here knows about Accelerate: callers hand in plain state dicts (model, optimizer,
scheduler, scaler, RNG, step, data epoch, config) and get plain dicts back.

Everything saved must load with ``torch.load(weights_only=True)``: that loader refuses
arbitrary pickled objects, so a checkpoint downloaded from elsewhere cannot run code on load.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "atomic_torch_save",
    "atomic_write_json",
    "atomic_write_text",
    "capture_rng",
    "restore_rng",
    "safe_load",
]

_STEP_RE = re.compile(r"^step-(\d+)\.pt$")
# Temp files of _atomic_write for step files and the pointer; only a SIGKILL/power cut mid-save
# leaves one behind (any exception removes its own).
_STALE_TMP_RE = re.compile(r"^\.(step-\d+\.pt|latest\.json)\..+\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or holds objects weights_only refuses."""


# --------------------------------------------------------------------------- atomic writes


def _atomic_write(path: str | os.PathLike, write) -> Path:
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
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``text`` atomically."""
    return _atomic_write(path, lambda f: f.write(text.encode(encoding)))


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


# --------------------------------------------------------------------------- RNG state


def capture_rng() -> dict:
    """Snapshot python, numpy, torch CPU and every CUDA device's RNG as weights_only-safe data."""
    state: dict[str, Any] = {
        "python": _to_plain(random.getstate()),
        "torch": torch.get_rng_state(),
    }
    try:
        import numpy as np

        # numpy's legacy state is ('MT19937', uint32[624], pos, has_gauss, cached_gaussian);
        # ndarrays are not weights_only-loadable, so store plain ints/lists.
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {
            "name": str(name),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        }
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Inverse of :func:`capture_rng`; parts absent from ``state`` are left alone."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())  # map_location may have moved it
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state(
            (s["name"], np.asarray(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"], s["cached_gaussian"])
        )
    if "cuda" in state and torch.cuda.is_available():
        saved = [t.cpu() for t in state["cuda"]]
        n = torch.cuda.device_count()
        if len(saved) != n:
            # Resuming on a different GPU count: restore what lines up rather than fail.
            warnings.warn(f"RNG state has {len(saved)} CUDA devices, this machine has {n}; restoring the first {min(n, len(saved))}")
        for i, s in enumerate(saved[:n]):
            torch.cuda.set_rng_state(s, device=i)


def _to_plain(x: Any) -> Any:
    # random.getstate() is nested tuples; weights_only loads tuples fine, but lists round-trip
    # identically through JSON too, and restore_rng rebuilds the tuples it needs.
    if isinstance(x, tuple):
        return [_to_plain(v) for v in x]
    return x


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    """Keep ``step-000000123.pt`` files (last ``keep_last``), a ``latest.json`` pointer and ``best*.pt``.

    Resume logic trusts the pointer first, then falls back to the newest step file that loads,
    so a run killed mid-save (or a corrupted disk block) costs at most one checkpoint interval.
    """

    pointer_name = "latest.json"

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    @staticmethod
    def filename(step: int) -> str:
        # Zero-padded so lexical order is step order in `ls` too.
        return f"step-{int(step):09d}.pt"

    def step_files(self) -> list[tuple[int, Path]]:
        """All ``step-*.pt`` files, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(self, state: dict, step: int) -> Path:
        """Write ``state`` as the checkpoint for ``step``, move the pointer, prune old files."""
        path = atomic_torch_save(state, self.directory / self.filename(step))
        # Pointer only after the data file is durable: a pointer never names a partial file.
        atomic_write_json(self.directory / self.pointer_name, {"step": int(step), "file": path.name})
        self._prune(keep=path)
        self._remove_stale_temps()
        return path

    def _remove_stale_temps(self) -> None:
        # A save killed mid-write leaves a checkpoint-sized temp file that nothing else would
        # ever delete. Safe to remove here: one process writes a run's checkpoints, one at a time.
        for p in self.directory.iterdir():
            if _STALE_TMP_RE.match(p.name):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass

    def save_best(self, state: dict, name: str = "best.pt") -> Path:
        """Write ``state`` to ``name`` (never pruned)."""
        if Path(name).name != name:
            raise ValueError(f"name must be a bare file name, got {name!r}")
        return atomic_torch_save(state, self.directory / name)

    def _prune(self, keep: Path) -> None:
        files = self.step_files()
        excess = len(files) - self.keep_last
        for _, p in files:
            if excess <= 0:
                break
            if p == keep:
                # The file just written is sacred even if it carries a smaller step number
                # (e.g. a run restarted from an earlier checkpoint).
                continue
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            excess -= 1

    def _pointer_target(self) -> Path | None:
        ptr = self.directory / self.pointer_name
        if not ptr.is_file():
            return None
        try:
            name = json.loads(ptr.read_text())["file"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            _warn(f"{ptr}: unreadable pointer ({e}); scanning step files instead")
            return None
        return self.directory / Path(name).name  # never follow a path outside the directory

    def _candidates(self):
        """Pointer target first, then step files newest first (each path once)."""
        seen: set[Path] = set()
        target = self._pointer_target()
        if target is not None:
            if target.is_file():
                seen.add(target)
                yield target
            else:
                _warn(f"{self.directory / self.pointer_name} points at missing {target.name}; scanning step files")
        for _, p in reversed(self.step_files()):
            if p not in seen:
                yield p

    def _first_loadable(self, map_location: Any) -> tuple[Path, Any] | None:
        # Validation *is* a full load: the only reliable way to catch a truncated zip. The
        # object is handed back so load_latest does not read a large file twice.
        for p in self._candidates():
            try:
                return p, safe_load(p, map_location=map_location)
            except CheckpointError as e:
                _warn(f"skipping unusable checkpoint: {e}")
        return None

    def latest(self) -> Path | None:
        """The newest checkpoint that actually loads (pointer first), or ``None`` if there is none."""
        found = self._first_loadable("cpu")
        return None if found is None else found[0]

    def load_latest(self, map_location: Any = "cpu") -> dict | None:
        """Load the checkpoint :meth:`latest` picks, or ``None`` when there is nothing to resume."""
        found = self._first_loadable(map_location)
        return None if found is None else found[1]


def _warn(msg: str) -> None:
    # Both channels: warnings for interactive use and tests, logging for batch-job log files.
    warnings.warn(msg, stacklevel=3)
    log.warning(msg)
