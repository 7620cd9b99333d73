"""Checkpoints: keep the last K plus best, resume from the newest good one (writes via toolkit.files).

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
import warnings
from pathlib import Path
from typing import Any

import torch

from toolkit.artifacts import LATEST_FILE
from toolkit.errors import CheckpointError
from toolkit.files import atomic_torch_save, atomic_write_json, safe_load

log = logging.getLogger(__name__)

__all__ = ["CheckpointManager", "capture_rng", "restore_rng"]

_STEP_RE = re.compile(r"^step-(\d+)\.pt$")
# Temp files of toolkit.files.atomic_write for step files and the pointer; only a SIGKILL/power cut mid-save
# leaves one behind (any exception removes its own).
_STALE_TMP_RE = re.compile(r"^\.(step-\d+\.pt|latest\.json)\..+\.tmp$")


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

    pointer_name = LATEST_FILE

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
