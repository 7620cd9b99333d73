"""Write an image folder as WebDataset tar shards plus ``_info.json``.

Layout of the output folder (written to a temporary sibling, moved into place when complete)::

    OUT/train-000000.tar ...  OUT/val-000000.tar ...
    OUT/_info.json            classes, per-split counts, shard names/lengths/sha256, preprocessing
    OUT/manifest.csv          every listed image: path, label, index, split, key, status
    OUT/skipped.csv           unreadable images with the reason (also counted on screen)

Each sample: ``<key>.png`` (the preprocessed image), ``<key>.cls`` (class index) and
``<key>.json`` (original relative path, class name). Keys are ``s<8-digit manifest row>``:
dot-free (WebDataset splits on the first dot) and unable to escape the folder.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from toolkit.data.folder import DataError, list_image_folder, stratified_split

INFO_NAME = "_info.json"
FORMAT_VERSION = 1


def preprocess_image(img: Image.Image, *, image_size: int | None, grayscale: bool) -> Image.Image:
    """The one preprocessing used at shard time *and* at predict time.

    EXIF rotation is applied; palette/alpha/CMYK/16-bit modes are converted; the image is
    resized to ``image_size``×``image_size`` (bilinear, like the seed's Resize) unless
    ``image_size`` is None/0 (keep the original size).
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits instead of clipping (PIL's convert('L') clips).
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.max() > 255 else 255.0
        img = Image.fromarray((arr * (255.0 / hi)).round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white, the usual background of scanned characters.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    img = img.convert("L" if grayscale else "RGB")
    if image_size:
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return img


def load_and_preprocess(path: str | Path, *, image_size: int | None, grayscale: bool) -> Image.Image:
    with Image.open(path) as im:
        im.load()  # force decoding now so truncated files fail here
        return preprocess_image(im, image_size=image_size, grayscale=grayscale)


def _encode_one(args: tuple[str, int | None, bool]) -> tuple[bytes | None, str | None]:
    """Worker: read, preprocess, encode PNG. Returns (png_bytes, None) or (None, reason)."""
    path, image_size, grayscale = args
    try:
        if os.path.getsize(path) == 0:
            return None, "empty file (0 bytes)"
        with warnings.catch_warnings():
            # A DecompressionBombWarning becomes an error: we skip, we don't OOM.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = load_and_preprocess(path, image_size=image_size, grayscale=grayscale)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue(), None
    except Exception as exc:  # noqa: BLE001 - any decode failure is reported, not raised
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return None, reason[:300]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def write_shards(
    src: str | Path,
    out: str | Path,
    *,
    val_fraction: float = 0.15,
    seed: int = 0,
    image_size: int | None = 32,
    grayscale: bool = True,
    samples_per_shard: int = 1000,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Shard ``src`` (image folder) into ``out``. Returns the ``_info.json`` dict."""
    from toolkit.tracking import progress as progress_bar

    src, out = Path(src), Path(out)
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists: pass --overwrite to replace it")
    manifest, ignored = list_image_folder(src)
    manifest = stratified_split(manifest, val_fraction=val_fraction, seed=seed)
    manifest["key"] = [f"s{i:08d}" for i in range(len(manifest))]
    classes = sorted(manifest["label"].unique().tolist())

    # Decode + preprocess in worker processes, in manifest order (results are small PNGs).
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    jobs = [(str(src / p), image_size or None, grayscale) for p in manifest["path"]]
    encoded: list[tuple[bytes | None, str | None]] = []
    bar = progress_bar(total=len(jobs), desc=f"shard {src.name}", enabled=progress, unit="img")
    if workers == 1:
        for j in jobs:
            encoded.append(_encode_one(j))
            bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for res in pool.map(_encode_one, jobs, chunksize=max(1, min(64, len(jobs) // (4 * workers) or 1))):
                encoded.append(res)
                bar.update(1)
    bar.close()
    manifest["status"] = ["ok" if png is not None else "skipped" for png, _ in encoded]
    skipped = [
        (manifest.at[i, "path"], reason) for i, (png, reason) in enumerate(encoded) if png is None
    ]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        info = _write_split_shards(
            manifest, encoded, tmp, classes=classes, seed=seed, samples_per_shard=samples_per_shard
        )
        info.update(
            format_version=FORMAT_VERSION,
            source=str(src.resolve()),
            classes=classes,
            num_classes=len(classes),
            val_fraction=val_fraction,
            seed=seed,
            preprocess={"image_size": image_size or None, "grayscale": grayscale, "format": "png"},
            skipped=len(skipped),
            ignored_non_images=len(ignored),
        )
        manifest.to_csv(tmp / "manifest.csv", index=False)
        pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(tmp / "skipped.csv", index=False)
        if ignored:
            pd.DataFrame({"path": ignored}).to_csv(tmp / "ignored.csv", index=False)
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2))
        if out.exists():
            # Move the old output aside first so a crash never leaves neither.
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info["_skipped_list"] = skipped
    info["_ignored_list"] = ignored
    return info


def _write_split_shards(
    manifest: pd.DataFrame,
    encoded: list,
    folder: Path,
    *,
    classes: list[str],
    seed: int,
    samples_per_shard: int,
) -> dict:
    import webdataset as wds

    splits = {}
    for split in ("train", "val"):
        rows = [i for i in np.flatnonzero((manifest["split"] == split).to_numpy()) if encoded[i][0] is not None]
        # Shuffle once at write time so every shard mixes classes (P×K batching and
        # per-worker streams then see all classes, not a sorted class range).
        random.Random(f"{seed}-{split}").shuffle(rows)
        filenames, lengths, sums, counts = [], [], [], {c: 0 for c in classes}
        for n, chunk in enumerate(_chunks(rows, samples_per_shard)):
            name = f"{split}-{n:06d}.tar"
            # An int mtime: a float one makes tarfile add a PAX header to every member,
            # which costs ~30 % of read throughput on small images.
            with wds.TarWriter(str(folder / name), encoder=False, mtime=0) as sink:
                for i in chunk:
                    label = manifest.at[i, "label"]
                    counts[label] += 1
                    meta = {"path": manifest.at[i, "path"], "label": label}
                    sink.write(
                        {
                            "__key__": manifest.at[i, "key"],
                            "png": encoded[i][0],
                            "cls": str(int(manifest.at[i, "index"])).encode(),
                            "json": json.dumps(meta, ensure_ascii=False).encode(),
                        }
                    )
            filenames.append(name)
            lengths.append(len(chunk))
            sums.append(_sha256(folder / name))
        splits[split] = {
            "name": split,  # timm's reader_wds understands name/num_samples/filenames/shard_lengths
            "num_samples": len(rows),
            "filenames": filenames,
            "shard_lengths": lengths,
            "sha256": sums,
            "class_counts": counts,
        }
    return {"splits": splits}


def is_remote(folder: str | Path) -> bool:
    """Shards elsewhere: a URL (``http://host/shards``) or a template with ``{}`` for the
    file name (``pipe:aws s3 cp s3://bucket/shards/{} -``), read through WebDataset's gopen."""
    s = str(folder)
    return "{}" in s or "://" in s


def shard_url(folder: str | Path, name: str) -> str:
    """Where file ``name`` of a shard folder lives: local path, URL or filled-in template."""
    s = str(folder)
    if "{}" in s:
        return s.replace("{}", name)
    if "://" in s:
        return s.rstrip("/") + "/" + name
    return str(Path(s) / name)


def read_info(folder: str | Path) -> dict:
    """Load ``_info.json`` of a shard folder, with a one-line error when it is missing."""
    if is_remote(folder):
        import webdataset as wds

        url = shard_url(folder, INFO_NAME)
        try:
            with wds.gopen(url) as f:
                return json.loads(f.read())
        except Exception as exc:  # noqa: BLE001 - any transport error becomes one line
            raise DataError(f"cannot read {url}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"shard folder not found: {folder}")
    path = folder / INFO_NAME
    if not path.is_file():
        raise DataError(f"{folder}: no {INFO_NAME} (was it written by `toolkit shard`?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def verify_shards(folder: str | Path) -> list[str]:
    """Return the shard files whose sha256 differs from ``_info.json`` (empty list = all good)."""
    folder = Path(folder)
    info = read_info(folder)
    bad = []
    for split in info["splits"].values():
        for name, digest in zip(split["filenames"], split["sha256"]):
            p = folder / name
            if not p.is_file() or _sha256(p) != digest:
                bad.append(name)
    return bad
