"""Use a trained run on new data: predict image files, export a split's embeddings.

A *run* is what :func:`toolkit.artifacts.open_run` opens (an embedding or classifier run
folder, or its model file); scoring a split lives in :mod:`toolkit.evaluation`.

Images are prepared exactly as in training: the shard-time preprocessing
(:func:`toolkit.data.shards.load_and_preprocess` with the shards' ``preprocess`` params)
then :func:`toolkit.data.transforms.to_model_input`. kNN votes against the embedder's saved
reference index (the train split's embeddings, stored in ``best_embedder.pt``): majority of
the k = 13 nearest, ties to the smallest class index (as scikit-learn's
``KNeighborsClassifier``), confidence = the winner's vote share.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image

from toolkit.artifacts import Run, build_frozen_embedder, checked_preprocess, default_device, load_head, open_run
from toolkit.data.shards import load_and_preprocess, read_info
from toolkit.data.transforms import to_model_input
from toolkit.errors import DataError, one_line
from toolkit.progress import progress as progress_bar
from toolkit.evaluation import run_split
from toolkit.knn import knn_vote
from toolkit.search import nearest

__all__ = ["embed_files", "export", "export_paths", "predict", "preprocess_params", "read_files", "read_image"]


# --------------------------------------------------------------------------- predict


def preprocess_params(run: Run, shards: str | Path | None = None) -> dict:
    """The shard-time preprocessing (image_size, grayscale) images must get before the model."""
    if shards is not None:
        return checked_preprocess(read_info(shards).preprocess, shards)
    if run.head is not None and run.head.preprocess:
        return checked_preprocess(run.head.preprocess, run.head_path)
    try:
        trained_on = run.shards()
        return checked_preprocess(read_info(trained_on).preprocess, trained_on)
    except DataError as exc:
        raise DataError(
            f"cannot tell how to preprocess images: {exc}; pass shards=<the shard folder the embedder was trained on>"
        ) from None


def read_image(path: str, pre: dict) -> torch.Tensor:
    """An image file as the model's shards hold it: shard-time preprocessing ``pre``, (C, H, W) uint8."""
    img = load_and_preprocess(path, image_size=pre.get("image_size"), grayscale=pre.get("grayscale", True))
    arr = np.array(img)  # (H, W) or (H, W, 3) uint8, as decode_sample reads the shard PNG
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (C, H, W) uint8


def read_files(paths: Sequence[str], pre: dict) -> tuple[list[tuple[int, torch.Tensor]], list[tuple[int, str]]]:
    """Read and preprocess ``paths`` -> ([(i, uint8 (C, H, W))], [(i, reason)] for the unreadable ones)."""
    good, bad = [], []
    for i, p in enumerate(paths):
        try:
            if not os.path.isfile(p):
                bad.append((i, "no such file"))
                continue
            if os.path.getsize(p) == 0:
                bad.append((i, "not a readable image (empty file: 0 bytes)"))
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # skipped, not an OOM
                good.append((i, read_image(str(p), pre)))
        except Exception as exc:  # noqa: BLE001 - any decode failure is reported for this file only
            bad.append((i, f"not a readable image ({one_line(exc)})"))
    return good, bad


@torch.no_grad()
def embed_files(model, paths: Sequence[str], pre: dict, *, input_size: int, device, batch_size: int,
                 progress: bool = False, desc: str = "embed") -> tuple[list[int], np.ndarray, list[tuple[int, str]]]:
    """Embed image files in chunks -> (indices embedded, float32 (n, D), [(index, reason)] unreadable)."""
    done: list[int] = []
    chunks: list[np.ndarray] = []
    bad: list[tuple[int, str]] = []
    bar = progress_bar(total=len(paths), desc=desc, enabled=progress, unit="img")
    try:
        for s in range(0, len(paths), batch_size):
            good, failed = read_files(paths[s : s + batch_size], pre)
            bad += [(s + i, r) for i, r in failed]
            if good:
                # per image: originals kept at shard time (image_size None) may differ in size
                x = torch.cat([to_model_input(t[None].to(device), input_size=input_size) for _, t in good])  # (b, C, S, S)
                chunks.append(model(x).float().cpu().numpy())  # (b, D)
                done += [s + i for i, _ in good]
            bar.update(min(batch_size, len(paths) - s))
    finally:
        bar.close()
    dim = chunks[0].shape[1] if chunks else 0
    return done, (np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)), bad


def predict(
    run,
    images: Sequence[str | Path],
    method: Literal["knn", "head"] = "knn",
    *,
    k: int | None = None,
    shards: str | Path | None = None,
    unknown: bool = False,
    threshold: float | None = None,
    device=None,
    batch_size: int = 256,
) -> list[dict]:
    """Classify image files -> one dict per input, in order.

    ``{"path", "label", "confidence"}`` (kNN: vote share of the k = 13 nearest saved train
    embeddings; head: softmax probability), or ``{"path", "error"}`` for a missing or
    unreadable file -- the other files still get answers.

    ``unknown=True`` (opt-in) answers ``label: "unknown"`` for an image whose nearest saved
    train embedding is farther than the embedder's calibrated "unknown" distance (or
    ``threshold``); each answer then also carries ``distance`` (to that nearest embedding)
    and ``threshold``.
    """
    if method not in ("knn", "head"):
        raise DataError(f"method must be knn or head, got {method!r}")
    run = open_run(run)
    dev = default_device(device)
    if (method == "knn" or unknown) and not run.has_index:
        raise DataError(f"{run.embedder_path} holds no reference index for kNN or the unknown test; use method=head")
    if unknown and threshold is None:
        if run.embedder.unknown is None:
            raise DataError(f"{run.embedder_path} has no calibrated unknown distance (saved before it existed): pass threshold=")
        threshold = float(run.embedder.unknown["distance"])
    if threshold is not None and not (np.isfinite(threshold) and threshold >= 0):
        raise DataError(f"threshold must be a distance >= 0, got {threshold}")
    pre = preprocess_params(run, shards)
    model = build_frozen_embedder(run.embedder, dev)
    input_size = run.embedder.config["input_size"]
    head = load_head(run, dev)[0] if method == "head" else None
    if method == "knn" or unknown:
        ref, ref_y = run.embedder.reference()  # (N, D) saved train embeddings, (N,) labels
        ref = ref.to(dev)
        k = int(k or run.embedder.config.get("knn_k", 13))

    out: list[dict] = [{"path": str(p)} for p in images]
    done, emb, bad = embed_files(model, [str(p) for p in images], pre, input_size=input_size, device=dev,
                                 batch_size=batch_size)  # (n, D) float32 for the readable ones
    for i, reason in bad:
        out[i]["error"] = reason
    emb = torch.from_numpy(emb)
    with torch.no_grad():
        if head is not None:
            conf, pred = head(emb.to(dev)).exp().max(1)  # softmax probability of the top class
        else:
            pred, conf = knn_vote(ref, ref_y, emb.to(dev), k=k)  # vote share
    for i, p, c in zip(done, pred.tolist(), conf.tolist()):
        out[i].update(label=run.classes[p], confidence=float(c))
    if unknown and done:
        dist2, _ = nearest(ref, emb, 1)  # (n, 1) squared distance to the nearest train embedding
        for i, d2 in zip(done, dist2[:, 0].tolist()):
            d = float(np.sqrt(max(d2, 0.0)))
            out[i].update(distance=d, threshold=float(threshold))
            if d > threshold:
                out[i]["label"] = "unknown"
    return out


# --------------------------------------------------------------------------- export


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def export_paths(out: str | Path) -> dict[str, Path]:
    """Files :func:`export` writes for ``out``: the table (.csv, or .parquet) and three .npy.

    A ``.csv``/``.parquet`` suffix picks the table format; without one, parquet when pyarrow
    is installed, else CSV. The arrays sit next to it: ``<stem>.keys.npy``,
    ``<stem>.labels.npy``, ``<stem>.embeddings.npy``.
    """
    out = Path(out)
    if out.suffix not in (".csv", ".parquet"):
        out = out.with_name(out.name + (".parquet" if _has_pyarrow() else ".csv"))
    stem = out.with_suffix("")
    return {
        "table": out,
        "keys": stem.with_name(stem.name + ".keys.npy"),
        "labels": stem.with_name(stem.name + ".labels.npy"),
        "embeddings": stem.with_name(stem.name + ".embeddings.npy"),
    }


def export(
    run,
    shards: str | Path | None,
    out: str | Path,
    split: str = "val",
    *,
    device=None,
    batch_size: int = 512,
    num_workers: int = 0,
) -> int:
    """Write the embeddings of ``split`` with keys and labels; return the number of rows.

    Files: see :func:`export_paths`. The table has columns key, label (class index), class,
    path (original relative path, when the shard folder has manifest.csv), e000 ... e127.
    Rows are sorted by key; the .npy files hold the same rows in the same order.
    """
    import pandas as pd

    paths = export_paths(out)
    if paths["table"].suffix == ".parquet" and not _has_pyarrow():
        raise DataError("writing parquet needs pyarrow: pip install pyarrow (or export to a .csv file)")
    result = run_split(run, shards, split, "none", device=device, batch_size=batch_size, num_workers=num_workers)
    emb = result.embeddings.numpy().astype(np.float32)  # (N, D)
    labels = result.labels.numpy().astype(np.int64)  # (N,)
    table = pd.DataFrame({"key": result.keys, "label": labels, "class": [result.classes[i] for i in labels]})
    manifest = Path(result.shards) / "manifest.csv"
    if manifest.is_file():
        paths_by_key = pd.read_csv(manifest, usecols=["key", "path"]).set_index("key")["path"]
        table["path"] = table["key"].map(paths_by_key)
    width = max(3, len(str(emb.shape[1] - 1)))
    table = pd.concat([table, pd.DataFrame(emb, columns=[f"e{j:0{width}d}" for j in range(emb.shape[1])])], axis=1)

    paths["table"].parent.mkdir(parents=True, exist_ok=True)
    np.save(paths["keys"], np.asarray(result.keys, dtype=str))  # unicode array: loads without allow_pickle
    np.save(paths["labels"], labels)
    np.save(paths["embeddings"], emb)
    if paths["table"].suffix == ".parquet":
        table.to_parquet(paths["table"], index=False)
    else:
        table.to_csv(paths["table"], index=False)
    return len(table)
