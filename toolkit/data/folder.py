"""Image folder -> pandas manifest -> stratified train/val split.

The manifest is the single source of truth for what goes into the shards: one row per
file, with its relative path, class name, class index (classes sorted by name) and split.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)


class DataError(ValueError):
    """Bad input data (missing folder, no classes, ...). The message is one clear line."""


def list_image_folder(root: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """List ``root/<class>/<file>`` into a manifest.

    Returns ``(manifest, ignored)``: the manifest has columns ``path`` (relative, POSIX),
    ``label`` (class name), ``index`` (class index, classes sorted); ``ignored`` lists the
    relative paths of files without an image extension (reported, never silently dropped).
    Nested sub-folders inside a class folder are included (their files belong to the class).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no class sub-folders (expected {root}/<class>/<image files>)")
    per_class: dict[str, list[str]] = {}
    ignored: list[str] = []
    for name in folders:
        for f in sorted((root / name).rglob("*")):
            if not f.is_file() or any(part.startswith(".") for part in f.relative_to(root).parts):
                continue
            rel = f.relative_to(root).as_posix()
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                per_class.setdefault(name, []).append(rel)
            else:
                ignored.append(rel)
    # Class indices count only folders that hold images, so index i always names classes[i].
    empty = [name for name in folders if name not in per_class]
    if empty:
        warnings.warn(f"{len(empty)} class folder(s) without images are not classes: {', '.join(empty[:10])}", stacklevel=2)
    rows = [(rel, name, idx) for idx, name in enumerate(sorted(per_class)) for rel in per_class[name]]
    df = pd.DataFrame(rows, columns=["path", "label", "index"])
    if df.empty:
        raise DataError(f"{root}: no image files found in {len(folders)} class folders")
    return df, ignored


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
