"""Image folder -> pandas manifest -> stratified train/val split (+ held-out test classes).

The manifest is the single source of truth for what goes into the shards: one row per
image file, with its relative path, class name, class index (classes sorted by name) and
split. Every other file under the folder is reported with the reason it is not an image of
a class (``ignored``), so nothing is dropped without a trace.
"""
from __future__ import annotations

import heapq
import math
import numbers
import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from toolkit.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

# Reasons a file is not in the manifest (the ``reason`` column of ignored.csv).
HIDDEN = "hidden"
NOT_IN_CLASS = "not in a class folder"
NOT_AN_IMAGE = "not an image extension"
BROKEN_LINK = "broken symlink"
NOT_A_FILE = "not a regular file"
SYMLINK_LOOP = "symlink loop (points to a folder above it)"
ALREADY_LISTED = "folder already listed through another path"


def list_image_folder(root: str | Path) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """List ``root/<class>/<file>`` into a manifest; account for every other file.

    Returns ``(manifest, ignored)``. The manifest has columns ``path`` (relative, POSIX),
    ``label`` (class name), ``index`` (class index: classes sorted, only folders that hold
    images are classes, so index i always names ``classes[i]``). Files in nested folders of
    a class folder belong to the class. ``ignored`` is a list of ``(relative path, reason)``
    sorted by path, one per file that is not in the manifest:

    * ``hidden``: any part of the path starts with a dot (``.DS_Store``, ``.git/...``);
    * ``not in a class folder``: a file at the top level of ``root``;
    * ``not an image extension``: a file in a class whose extension is not an image's;
    * ``broken symlink``: a symlink to nothing (nothing to read);
    * ``not a regular file``: a FIFO, socket or device (reading one could block forever).

    Symlinked folders are followed, so a class can be assembled from links. A folder reached
    a second time (a symlink loop, or two links to the same folder) is listed once only: the
    link is reported with the reason ``symlink loop ...`` or ``folder already listed ...``,
    so no image is counted twice (a duplicate could land in train *and* val). Real folders
    win over links and visible folders over hidden ones when choosing where a folder is
    listed. An unreadable folder is reported as ``unreadable folder (<error>)``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    files, folders, ignored = _walk(root)
    if not folders:
        raise DataError(f"{root}: no class sub-folders (expected {root}/<class>/<image files>)")
    per_class: dict[str, list[str]] = {}
    for rel in files:
        reason = _not_an_image(rel)
        if reason:
            ignored.append((rel, reason))
        else:
            per_class.setdefault(rel.split("/", 1)[0], []).append(rel)
    empty = [name for name in folders if name not in per_class]
    if empty:
        warnings.warn(f"{len(empty)} class folder(s) without images are not classes: {', '.join(empty[:10])}", stacklevel=2)
    rows = [(rel, name, idx) for idx, name in enumerate(sorted(per_class)) for rel in per_class[name]]
    df = pd.DataFrame(rows, columns=["path", "label", "index"])
    if df.empty:
        raise DataError(f"{root}: no image files found in {len(folders)} class folders")
    return df, sorted(ignored)


def _not_an_image(rel: str) -> str | None:
    """Why the regular file ``rel`` is not an image of a class, or None when it is one."""
    parts = rel.split("/")
    if any(part.startswith(".") for part in parts):
        return HIDDEN
    if len(parts) == 1:
        return NOT_IN_CLASS
    if os.path.splitext(parts[-1])[1].lower() not in IMAGE_EXTENSIONS:
        return NOT_AN_IMAGE
    return None


def _walk(root: Path) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Every entry under ``root``, symlinked folders followed, each real folder once.

    Returns ``(files, folders, ignored)``: relative POSIX paths of the regular files (sorted
    part by part, like sorted ``Path`` objects); the visible top-level folders listed (the
    class candidates); ``(path, reason)`` for links and special files not listed.

    Folders wait in a priority queue: real visible folders first, then visible symlinked
    folders, then hidden ones, so a folder reachable several ways is listed at its real,
    visible place and later ways to it are reported, never walked again (loops end).
    """
    files: list[str] = []
    folders: list[str] = []
    ignored: list[tuple[str, str]] = []
    visited: set[str] = set()
    queue: list[tuple[int, str]] = [(0, "")]
    while queue:
        _, rel = heapq.heappop(queue)
        path = root / rel if rel else root
        real = os.path.realpath(path)
        if real in visited:
            ignored.append((rel, _revisit_reason(path, real)))
            continue
        visited.add(real)
        if rel and "/" not in rel and not rel.startswith("."):
            folders.append(rel)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            ignored.append(((rel or ".") + "/", f"unreadable folder ({exc.strerror or type(exc).__name__})"))
            continue
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            hidden = any(part.startswith(".") for part in child.split("/"))
            kind = _kind(entry)
            if kind == "dir":
                heapq.heappush(queue, (2 if hidden else int(entry.is_symlink()), child))
            elif kind == "file":
                files.append(child)
            else:
                ignored.append((child, HIDDEN if hidden else kind))
    files.sort(key=lambda rel: rel.split("/"))
    return files, sorted(folders), ignored


def _kind(entry: os.DirEntry) -> str:
    """``dir``, ``file`` (both following symlinks) or the reason the entry is neither."""
    if entry.is_symlink() and not os.path.exists(entry.path):
        return BROKEN_LINK  # also a link loop between files: nothing to read either way
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError as exc:
        return f"unreadable ({exc.strerror or type(exc).__name__})"
    return NOT_A_FILE


def _revisit_reason(path: Path, real: str) -> str:
    """A folder whose real path was listed already: a loop if it encloses its own link."""
    parent = os.path.realpath(path.parent)
    return SYMLINK_LOOP if parent == real or parent.startswith(real.rstrip(os.sep) + os.sep) else ALREADY_LISTED


def stratified_split(
    manifest: pd.DataFrame, *, val_fraction: float = 0.15, seed: int = 0
) -> pd.DataFrame:
    """Add a ``split`` column: per class, ``round(val_fraction * n)`` images go to val.

    Deterministic for a seed. Every class keeps at least one training image; a class with a
    single image cannot be split and stays in train (with a warning naming it).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    split = np.array(["train"] * len(manifest), dtype=object)
    too_small = []
    for label, rows in manifest.groupby("label", sort=True).indices.items():
        n = len(rows)
        n_val = min(int(round(val_fraction * n)), n - 1)
        if n < 2:
            too_small.append(label)
            continue
        split[rng.permutation(rows)[:n_val]] = "val"
    if too_small:
        warnings.warn(
            f"{len(too_small)} class(es) with a single image kept in train only: "
            + ", ".join(map(str, too_small[:10]))
            + (" ..." if len(too_small) > 10 else ""),
            stacklevel=2,
        )
    out = manifest.copy()
    out["split"] = split
    return out


def parse_holdout(spec, classes: list[str], *, seed: int = 0) -> list[str]:
    """The classes to hold out (sorted names) for ``spec``, out of ``classes``.

    ``spec`` is one of: None or ``""`` (none held out: ``[]``); a fraction ``f`` in (0, 1)
    (float or a string like ``"0.2"``): ``max(1, round(f * C))`` classes; a count ``n >= 1``
    (int or a plain integer string like ``"2"``); class names (a list/tuple of str, or a
    comma list like ``"8,9"`` or ``"A,b"``; a single name whose text is a number needs a
    trailing comma, ``"9,"``; a non-numeric string without a comma is one name). A fraction
    or count picks the classes at random, seeded by ``seed``: the same seed and the same
    class names always pick the same classes, whatever order ``classes`` is given in.

    Refused with a one-line DataError: a spec of none of these shapes, unknown names,
    holding out every class, or leaving fewer than 2 known classes (metric learning needs
    at least two classes to train on).
    """
    names = sorted(set(map(str, classes)))
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return []
    what = _holdout_kind(spec)
    if isinstance(what, list):
        unknown = sorted(set(what) - set(names))
        if unknown:
            raise DataError(
                f"holdout_classes names unknown class(es): {_short_list(unknown)} (classes: {_short_list(names)})"
            )
        held = sorted(set(what))
    else:
        kind, value = what
        n = max(1, int(round(value * len(names)))) if kind == "fraction" else int(value)
        if n >= len(names):
            raise DataError(
                f"holdout_classes={_spec_text(spec)} would hold out {n} of the {len(names)} classes: "
                "at least 2 must stay known (for training)"
            )
        held = sorted(random.Random(f"{seed}-holdout").sample(names, n))
    known = len(names) - len(held)
    if known < 2:
        raise DataError(
            f"holdout_classes={_spec_text(spec)} holds out {len(held)} of the {len(names)} classes, leaving "
            f"{known} known: at least 2 must stay known (for training)"
        )
    return held


_COUNT = re.compile(r"[0-9]+")


def _holdout_kind(spec) -> list[str] | tuple[str, float]:
    """``spec`` as a list of names, ``("fraction", f)`` or ``("count", n)``; DataError otherwise."""
    expected = "a fraction in (0, 1) like 0.2, a count like 2, or class names like 8,9"
    if isinstance(spec, bool):
        raise DataError(f"holdout_classes={spec!r}: expected {expected}")
    if isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(s, str) and s for s in spec):
            raise DataError(f"holdout_classes={_spec_text(spec)}: expected a non-empty list of class names (strings)")
        return list(spec)
    if isinstance(spec, numbers.Integral):
        if spec < 1:
            raise DataError(f"holdout_classes={spec}: a count of classes must be >= 1 (give none to hold out nothing)")
        return ("count", int(spec))
    if isinstance(spec, numbers.Real):
        if not (math.isfinite(spec) and 0.0 < spec < 1.0):
            raise DataError(f"holdout_classes={spec}: a fraction of the classes must be in (0, 1)")
        return ("fraction", float(spec))
    if not isinstance(spec, str):
        raise DataError(f"holdout_classes={_spec_text(spec)}: expected {expected}")
    text = spec.strip()
    if "," in text:
        parts = [p.strip() for p in text.split(",")]
        parts = [p for p in parts if p]
        if not parts:
            raise DataError(f"holdout_classes={spec!r}: no class name given")
        return parts
    if _COUNT.fullmatch(text):
        return _holdout_kind(int(text))
    try:
        value = float(text)
    except ValueError:
        return [text]  # one class name
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise DataError(
            f"holdout_classes={spec!r}: a fraction of the classes must be in (0, 1) (a class named {text!r} is written {text + ','!r})"
        )
    return ("fraction", value)


def _spec_text(spec) -> str:
    text = repr(spec) if isinstance(spec, str) else str(spec)
    return text if len(text) <= 60 else text[:57] + "..."


def _short_list(items: list[str], limit: int = 10) -> str:
    return ", ".join(items[:limit]) + (" ..." if len(items) > limit else "")


def class_disjoint_split(
    manifest: pd.DataFrame, holdout: list[str], *, val_fraction: float = 0.15, seed: int = 0
) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Split ``manifest`` into train/val (known classes) and test (the ``holdout`` classes, whole).

    The known classes get exactly the train/val assignment :func:`stratified_split` gives
    them without any holdout (the split is computed over all classes, then the held-out
    rows move to ``test``), so holding classes out never reshuffles the others. Class
    indices are rewritten so that they index ``classes + holdout`` (known classes sorted,
    then the held-out ones sorted): known classes keep 0..C-1, held-out ones get C..C+H-1.

    Returns ``(manifest with split and index, classes, holdout)``. With no holdout this is
    :func:`stratified_split` and the indices are unchanged.
    """
    out = stratified_split(manifest, val_fraction=val_fraction, seed=seed)
    labels = sorted(out["label"].unique().tolist())
    holdout = sorted(holdout)
    if not holdout:
        return out, labels, []
    classes = [c for c in labels if c not in set(holdout)]
    order = {name: i for i, name in enumerate(classes + holdout)}
    held = out["label"].isin(holdout).to_numpy()
    out.loc[held, "split"] = "test"
    out["index"] = out["label"].map(order).astype(int)
    return out, classes, holdout
