"""Scoring embeddings: embed a split across ranks, assemble it, kNN and retrieval metrics.

Used by the validator (rank 0 during training), ``toolkit evaluate`` / ``export`` and the
classifier report, so all three score the same way.

* :func:`embed_split`: every rank streams its share of a split in *eval* mode (each sample
  exactly once across ranks and workers, with its key) and embeds it with the bare model in
  eval mode (no DDP, no collectives per batch, so unequal batch counts are fine).
* :func:`gather_to_main`: one ``gather_object`` brings every share to rank 0, which checks
  for duplicates and sorts by key; :func:`warn_missing` says what could not be read.
* :func:`evaluate_embeddings`: kNN accuracy (k = 13, :func:`toolkit.knn.knn_accuracy`) and
  the ranking metrics of val queries against the train split (:mod:`toolkit.retrieval`).
* :func:`split_retrieval`: open-set retrieval inside one split, query vs gallery (the roles
  ``toolkit shard`` recorded; by default every image is both, leave-one-out): Recall@k,
  precision@k, MAP@R, R-precision and the verification metrics of all pairs.
* :func:`run_split` / :func:`evaluate`: all of it for a saved run. Closed-set kNN and head
  accuracy where the split's classes are the model's; retrieval on any split of any shard
  folder, whatever its classes; on a ``test`` split of held-out classes, open-set
  recognition too (known val images against unseen test images, with the embedder's
  calibrated "unknown" distance).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from toolkit import distributed, search
from toolkit.artifacts import Run, build_frozen_embedder, check_classes, default_device, load_head, open_run
from toolkit.data.shards import read_info
from toolkit.data.stream import ShardStream, make_loader
from toolkit.data.transforms import to_model_input
from toolkit.errors import DataError
from toolkit.knn import knn_accuracy, knn_vote
from toolkit.retrieval import RetrievalResult, calibrate_unknown, open_set_recognition, query_gallery

@torch.no_grad()
def embed_split(
    model: torch.nn.Module,
    *,
    shards: str,
    split: str,
    rank: int,
    world_size: int,
    device: torch.device,
    input_size: int,
    batch_size: int = 512,
    num_workers: int = 2,
    autocast=None,
    channels_last: bool = False,
    sort_by_key: bool = False,
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """This rank's share of ``split``: (keys, embeddings (N, D) float32 CPU, labels (N,)).

    ``sort_by_key``: rows in key order (what the validator merges by), assembled batch by batch
    into the result, each batch freed as it is placed: no second copy of the share at the end.
    Otherwise in stream order."""
    was_training = model.training
    model.eval()
    stream = ShardStream(shards, split=split, mode="eval", rank=rank, world_size=world_size, batch_size=batch_size)
    keys: list[str] = []
    embs, labels = [], []
    for k, images, y in make_loader(stream, num_workers=num_workers):
        x = to_model_input(images.to(device, non_blocking=True), input_size=input_size, channels_last=channels_last)
        with autocast() if autocast is not None else nullcontext():
            e = model(x)
        keys.extend(k)
        embs.append(e.float().cpu())
        labels.append(y)
    model.train(was_training)
    dim = embs[0].shape[1] if embs else 0
    if not sort_by_key or not embs:
        return (
            keys,
            torch.cat(embs) if embs else torch.zeros(0, dim),
            torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
        )
    order = sorted(range(len(keys)), key=keys.__getitem__)
    where = np.empty(len(keys), dtype=np.int64)
    where[order] = np.arange(len(keys))  # stream row -> its row in key order
    out, out_labels = torch.empty(len(keys), dim), torch.empty(len(keys), dtype=labels[0].dtype)
    offset = 0
    for _ in range(len(embs)):
        e, y = embs.pop(0), labels.pop(0)  # each batch is freed once it is placed
        dest = torch.from_numpy(where[offset : offset + len(e)])
        out[dest], out_labels[dest] = e, y
        offset += len(e)
    return [keys[i] for i in order], out, out_labels


def gather_to_main(keys: list[str], emb: torch.Tensor, labels: torch.Tensor):
    """Collect every rank's share on rank 0, sorted by key. Other ranks get ``None``.

    Raises if a key arrives twice: the loader promises each sample exactly once.
    """
    parts = distributed.gather_object_to_main((keys, emb, labels))
    if parts is None:
        return None
    all_keys = [k for p in parts for k in p[0]]
    all_emb = torch.cat([p[1] for p in parts if len(p[0])])
    all_lab = torch.cat([p[2] for p in parts if len(p[0])])
    if len(set(all_keys)) != len(all_keys):
        raise RuntimeError(f"validation saw {len(all_keys) - len(set(all_keys))} duplicate samples")
    order = np.argsort(np.asarray(all_keys))
    idx = torch.from_numpy(order)
    return [all_keys[i] for i in order], all_emb[idx], all_lab[idx]


def warn_missing(part, *, expected: int, split: str, print_fn=print) -> int:
    """Say how many samples of ``split`` validation did not see (unreadable, bad label, short
    shard: the loader's warnings name them); returns that number. ``part``: gather_to_main's result."""
    missing = expected - len(part[0])
    if missing > 0:
        print_fn(f"warning: validation read {len(part[0])} of the {expected} {split} samples: {missing} skipped (see the warnings above)")
    return missing


def evaluate_embeddings(train, val, *, k: int = 13) -> dict[str, float]:
    """All validation metrics from assembled (keys, emb, labels) of train and val.

    ``knn_accuracy`` (k nearest train embeddings vote) and the ranking metrics of the val
    queries against the train gallery (precision@1, MAP@R, R-precision, Recall@k, ...);
    the pair metrics are left to the open-set split (val × train pairs grow as N²).
    """
    acc, _ = knn_accuracy(train[1], train[2], val[1], val[2], k=k)
    ranking = query_gallery(val[1], val[2], train[1], train[2], verification=False).metrics
    return {"knn_accuracy": acc, **{name: v for name, v in ranking.items() if not name.startswith("num_")}}


def split_roles(info, split: str, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(is_query, is_gallery) bool arrays for ``keys`` of ``split``, as ``toolkit shard`` recorded them."""
    return info.split(split, folder="shards").roles(keys)


def split_retrieval(emb: torch.Tensor, labels: torch.Tensor, is_query, is_gallery, *, verification: bool = True) -> RetrievalResult:
    """Open-set retrieval inside one split: its queries against its gallery, each query's own
    gallery entry left out (leave-one-out when an image is both)."""
    is_query, is_gallery = np.asarray(is_query, dtype=bool), np.asarray(is_gallery, dtype=bool)
    q_idx, g_idx = np.flatnonzero(is_query), np.flatnonzero(is_gallery)
    position = np.full(len(is_gallery), -1, dtype=np.int64)
    position[g_idx] = np.arange(len(g_idx))  # sample -> its gallery position (-1: not in the gallery)
    qi, gi = torch.from_numpy(q_idx), torch.from_numpy(g_idx)
    return query_gallery(emb[qi], labels[qi], emb[gi], labels[gi], query_in_gallery=position[q_idx], verification=verification)


@dataclass
class SplitResult:
    """Everything computed on one split; what evaluate, export and the report summarise."""

    shards: str
    split: str
    classes: list[str]  # the model's classes (closed-set predictions index these)
    keys: list[str]
    embeddings: torch.Tensor  # (N, D) float32, unit rows
    labels: torch.Tensor  # (N,) long, indices into label_names
    k: int
    label_names: list[str] = field(default_factory=list)  # the shards' classes, held-out ones included
    closed_set: bool = True  # the split's classes are the model's: kNN and head accuracy mean something
    knn_reference: str | None = None  # where the kNN votes come from
    knn_pred: torch.Tensor | None = None  # (N,) long
    knn_share: torch.Tensor | None = None  # (N,) vote share of the winner
    head_logp: torch.Tensor | None = None  # (N, C) log-probabilities
    is_query: np.ndarray | None = None  # (N,) bool: roles in the open-set retrieval
    is_gallery: np.ndarray | None = None
    retrieval: RetrievalResult | None = None  # queries vs gallery inside the split
    open_set: dict | None = None  # known (val) vs unseen (this split) recognition with the "unknown" distance
    notes: list[str] = field(default_factory=list)

    @property
    def head_pred(self) -> torch.Tensor | None:
        return None if self.head_logp is None else self.head_logp.argmax(1)


def _resolve_method(run: Run, method: str | None, *, closed_set: bool) -> str:
    if method is None:
        return ("both" if run.head is not None else "knn") if closed_set else "none"
    if method not in ("knn", "head", "both", "none"):
        raise DataError(f"method must be knn, head or both, got {method!r}")
    return method


def _is_closed_set(info, split: str, run: Run) -> bool:
    """True when every class of ``split`` is one of the model's, at the model's index."""
    if list(info.classes) != run.classes:
        return False
    counts = info.split(split, folder="shards").class_counts
    held_out = set(info.holdout_classes)
    return not (counts and any(counts.get(c) for c in held_out)) and not (split == "test" and held_out)


def run_split(
    run,
    shards: str | Path | None = None,
    split: str = "val",
    method: str | None = None,
    *,
    k: int | None = None,
    reference: Literal["auto", "index", "train"] = "auto",
    retrieval: bool = True,
    threshold: float | None = None,
    device=None,
    batch_size: int = 512,
    num_workers: int = 0,
) -> SplitResult:
    """Embed ``split`` of ``shards`` (default: the embedder's) and score it.

    * Closed set (kNN and/or head accuracy) when the split's classes are the model's:
      ``method=None`` means both when the run has a head, else kNN; on other classes (a
      held-out ``test`` split, another data set) ``None`` means no closed-set scoring, and
      asking for ``knn``/``head`` is a one-line error naming the classes that differ.
      ``"none"`` only embeds. ``reference``: kNN votes against the saved index (``"index"``),
      the train split of ``shards`` re-embedded (``"train"``), or the index when there is one
      (``"auto"``).
    * Open-set retrieval (``retrieval=True``): the split's queries against its gallery
      (:func:`split_retrieval`), whatever its classes.
    * Open-set recognition, on a split of held-out classes when the shards also have the
      model's val split: kNN with the "unknown" distance (``threshold``, default the one
      calibrated with the embedder) on known val images and the unseen ones.
    """
    run = open_run(run)
    shards = str(shards) if shards else run.shards()  # default: the folder it was trained on, if local
    info = read_info(shards)
    info.split(split, folder=shards)
    closed = _is_closed_set(info, split, run)
    method = _resolve_method(run, method, closed_set=closed)
    if method != "none" and not closed:
        check_classes(info.classes, run.classes, shards=shards)  # names what differs
        raise DataError(f"{shards}: split {split!r} holds classes the model was not trained on (held out): "
                        "closed-set kNN/head accuracy needs the model's classes; its retrieval metrics need no method")
    dev = default_device(device)
    model = build_frozen_embedder(run.embedder, dev)
    input_size = run.embedder.config["input_size"]

    def embed(which: str):
        # eval-mode streaming, each sample once, sorted by key below
        keys, emb, labels = embed_split(
            model, shards=shards, split=which, rank=0, world_size=1, device=dev,
            input_size=input_size, batch_size=batch_size, num_workers=num_workers,
        )
        order = np.argsort(np.asarray(keys))
        idx = torch.from_numpy(order)
        return [keys[i] for i in order], emb[idx], labels[idx]

    keys, emb, labels = embed(split)  # (N,), (N, D), (N,)
    k = int(k or run.embedder.config.get("knn_k", 13))
    result = SplitResult(shards=shards, split=split, classes=run.classes, keys=keys, embeddings=emb, labels=labels, k=k,
                         label_names=list(info.all_classes), closed_set=closed)
    if method in ("knn", "both"):
        if reference == "index" and not run.has_index:
            raise DataError(f"{run.embedder_path} holds no reference index: use reference=train")
        if reference == "train" or not run.has_index:
            _, ref, ref_y = embed("train")
            result.knn_reference = f"train split of {shards} ({len(ref_y)} images, re-embedded)"
        else:
            ref, ref_y = run.embedder.reference()
            result.knn_reference = f"saved index of {run.embedder_path.name} ({len(ref_y)} train embeddings)"
        result.knn_pred, result.knn_share = knn_vote(ref.to(dev), ref_y, emb.to(dev), k=k)
    if method in ("head", "both"):
        head, _ = load_head(run, dev)
        with torch.no_grad():
            chunks = [head(emb[s : s + 4096].to(dev)).cpu() for s in range(0, len(emb), 4096)]  # (b, C) each
        result.head_logp = torch.cat(chunks) if chunks else torch.zeros(0, len(run.classes))
    if retrieval and len(keys):
        result.is_query, result.is_gallery = split_roles(info, split, keys)
        result.retrieval = split_retrieval(emb, labels, result.is_query, result.is_gallery)
    if retrieval and not closed and len(keys):
        result.open_set = _open_set(run, info, shards, split, embed, emb, labels, threshold=threshold, k=k, notes=result.notes)
    return result


def _open_set(run: Run, info, shards: str, split: str, embed, emb, labels, *, threshold, k: int, notes: list) -> dict | None:
    """Known (val) vs unseen (``split``'s images of classes outside the model's) recognition."""
    if "val" not in info.splits or list(info.classes) != run.classes or not run.has_index:
        notes.append("open-set recognition needs the model's val split in the same shards and the embedder's reference index")
        return None
    if threshold is None:
        saved = run.embedder.unknown
        if saved is None:
            notes.append(f"open-set recognition skipped: {run.embedder_path.name} has no calibrated unknown distance "
                         "(pass threshold=)")
            return None
        threshold = float(saved["distance"])
    unseen = labels >= len(run.classes)  # held-out classes sit after the model's in the label list
    _, val_emb, val_y = embed("val")
    ref, ref_y = run.embedder.reference()
    out = open_set_recognition(ref, ref_y, val_emb, val_y, emb[unseen], threshold=float(threshold), k=k)
    return {"threshold": float(threshold), **out}


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, float | None]:
    """{class name: accuracy on its samples} (None for a class absent from the split)."""
    out: dict[str, float | None] = {}
    for i, name in enumerate(classes):
        mask = labels == i
        out[name] = float((pred[mask] == i).float().mean()) if mask.any() else None
    return out


def split_metrics(result: SplitResult) -> dict:
    """Plain-number metrics of a :class:`SplitResult` (JSON-ready)."""
    present = sorted({result.label_names[i] for i in result.labels.unique().tolist()}) if result.label_names else []
    m: dict = {"shards": result.shards, "split": result.split, "num_samples": len(result.keys),
               "num_classes": len(present) if not result.closed_set else len(result.classes),
               "closed_set": result.closed_set}
    if not result.closed_set:
        m["classes"] = present
    y = result.labels
    if result.knn_pred is not None:
        m["knn_k"] = result.k
        m["knn_reference"] = result.knn_reference
        m["knn_accuracy"] = float((result.knn_pred == y).float().mean())
        m["knn_per_class"] = per_class_accuracy(result.knn_pred, y, result.classes)
    if result.head_logp is not None:
        m["head_accuracy"] = float((result.head_pred == y).float().mean())
        m["head_loss"] = float(F.nll_loss(result.head_logp, y)) if len(y) else float("nan")
        m["head_per_class"] = per_class_accuracy(result.head_pred, y, result.classes)
    if result.retrieval is not None:
        m["retrieval"] = dict(result.retrieval.metrics)
    if result.open_set is not None:
        m["open_set"] = dict(result.open_set)
    if result.notes:
        m["notes"] = list(result.notes)
    return m


def evaluate(run, shards: str | Path | None = None, split: str = "val", method: str | None = None, **options) -> dict:
    """Metrics of ``split`` of ``shards`` for a saved run -> JSON-ready dict.

    Takes :func:`run_split`'s arguments (``k``, ``reference``, ``retrieval``, ``threshold``,
    ``device``, ``batch_size``, ``num_workers`` as keywords).
    Keys: shards, split, num_samples, num_classes, closed_set; knn_k, knn_reference,
    knn_accuracy, knn_per_class (closed set, kNN); head_accuracy, head_loss (NLL),
    head_per_class (closed set, with a head); ``retrieval`` (query vs gallery metrics, any
    classes); ``open_set`` (held-out classes: known vs unseen recognition).
    """
    return split_metrics(run_split(run, shards, split, method, **options))


def raw_pixel_embeddings(shards: str, split: str, *, batch_size: int = 512, num_workers: int = 0):
    """The baseline every embedder must beat: each image's pixels as one L2-normalised vector.

    Returns (keys sorted, (N, C·H·W) float32 unit rows, labels), images as the model sees
    them before the network (``to_model_input`` at their stored size).
    """
    stream = ShardStream(shards, split=split, mode="eval", batch_size=batch_size)
    keys, rows, labels = [], [], []
    for k, images, y in make_loader(stream, num_workers=num_workers):
        x = to_model_input(images, input_size=images.shape[-1]).flatten(1)  # (b, C·H·W)
        keys.extend(k)
        rows.append(F.normalize(x, dim=1))
        labels.append(y)
    order = torch.from_numpy(np.argsort(np.asarray(keys)))
    return [keys[i] for i in order], torch.cat(rows)[order], torch.cat(labels)[order]


def images_by_key(shards: str, split: str, keys, *, batch_size: int = 512) -> dict[str, torch.Tensor]:
    """The stored images (C, H, W) uint8 of ``keys`` in ``split`` (a pass over the split; for plots)."""
    wanted, found = set(keys), {}
    for k, images, _ in make_loader(ShardStream(shards, split=split, mode="eval", batch_size=batch_size), num_workers=0):
        for key, img in zip(k, images):
            if key in wanted:
                found[key] = img.clone()
    return found


def calibrated_unknown(train, val, *, fmr: float) -> dict:
    """The "unknown" distance saved with an embedder: calibrated on the val queries against the
    train references (assembled (keys, emb, labels) each) at the false-match rate ``fmr``."""
    return {**calibrate_unknown(train[1], train[2], val[1], val[2], fmr=fmr), "calibrated_on": "val queries vs train references"}


# ----------------------------------------------------------------------------- sharded validation


# Merged candidates rank 0 holds at once (queries per block x W x (k + depth)): ~12 MB. 4x more
# (bench validate, 200k x 30k, 2 processes) was 0.53x the gathered wall time instead of 0.64x,
# but the busiest rank then grew as much as the gathered one (505 vs 508 MB; 343 MB with this).
CANDIDATES = 1 << 20
# faiss's distance_compute_blas_threshold (its default): see toolkit.knn
BLAS_QUERY_ELEMENTS = 128_000


def _sorted_share(part):
    """A rank's (keys as UTF-8 bytes, emb, labels), sorted by key (the order :func:`gather_to_main`
    assembles: byte order of UTF-8 is code-point order). A share already in key order (what
    :func:`embed_split` returns) is not copied."""
    keys, emb, labels = part
    encoded = np.array([k.encode() for k in keys], dtype="S") if len(keys) else np.zeros(0, dtype="S1")
    if len(encoded) < 2 or bool((encoded[:-1] < encoded[1:]).all()):
        return encoded, emb, labels
    order = np.argsort(encoded, kind="stable")
    idx = torch.from_numpy(order.astype(np.int64))
    return encoded[order], emb[idx], labels[idx]


def _share_candidates(train_emb: torch.Tensor, reference, queries: torch.Tensor, *, k: int, depth: int, unknown: bool,
                      query_labels: np.ndarray, train_labels: np.ndarray) -> dict:
    """What one rank's references contribute: per query its k nearest (exact, float64
    distances), its ``depth`` nearest as the faiss search ranks them (float32 squared
    distances) and, with ``unknown``, the nearest same-class and other-class distances.
    ``reference``: ``train_emb`` as a :class:`toolkit.search.ExactReference` around the
    whole split's centre, made once per validation (not per block of queries).

    One search serves all three: it goes as deep as the ranking depth, the kNN screen's
    2k + 8 candidates (:func:`toolkit.knn.knn_from_screen` refines them to the exact k
    nearest) and, with ``unknown``, one more than the depth, which is at least any class's
    size up to ``R_CAP``: every query's nearest own-class and other-class references are then
    in it (:func:`toolkit.retrieval.nearest_own_and_other` searches again for larger classes)."""
    from toolkit.knn import knn_from_screen
    from toolkit.retrieval import nearest_own_and_other

    n, q = len(train_emb), len(queries)
    if len(reference) != n:
        raise ValueError(f"validation: the search holds {len(reference)} references, the share {n}")
    out = {"knn_d": np.full((q, 0), np.inf), "knn_i": np.zeros((q, 0), dtype=np.int64),
           "rank_d": np.full((q, 0), np.inf, dtype=np.float32), "rank_i": np.zeros((q, 0), dtype=np.int64)}
    found = None
    if n and q:
        screen = min(n, 2 * k + 8)  # the kNN screen's candidates (toolkit.knn)
        moved = reference.moved(queries)  # (Q, D) float32, as the search compares them
        found = reference.search(moved, max(screen, min(depth + int(unknown), n)), moved=True)
        d2, ids = found
        idx = knn_from_screen(train_emb, queries, torch.from_numpy(ids[:, :screen]), torch.from_numpy(d2[:, screen - 1]),
                              k=min(k, n), query_sq=torch.from_numpy(np.einsum("ij,ij->i", moved, moved, dtype=np.float64)),
                              train_norm_max=reference.norm_max)  # (Q, k') local rows, exact
        # float64 by differences, the distance the kNN module refines and sorts with; in
        # blocks of queries, so the (block, k', D) temporary stays small
        d = np.empty(idx.shape)
        step = max(1, (1 << 20) // (idx.shape[1] * train_emb.shape[1]))
        for s in range(0, q, step):
            rows = idx[s : s + step]
            d[s : s + step] = (train_emb[rows].double() - queries[s : s + step].double()[:, None, :]).pow(2).sum(2).numpy()
        out["knn_d"], out["knn_i"] = d, idx.numpy()
        width = min(depth, n)  # what the merge keeps of every share
        out["rank_d"], out["rank_i"] = np.ascontiguousarray(d2[:, :width]), np.ascontiguousarray(ids[:, :width])
    if unknown:
        out["own"], out["other"] = nearest_own_and_other(reference, train_labels, queries.numpy(), query_labels, found=found)
    return out


def _merge_nearest(dist: list[np.ndarray], ids: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``width`` nearest over every share: by distance, then global position."""
    d, i = np.concatenate(dist, axis=1), np.concatenate(ids, axis=1)
    order = np.lexsort((i, d), axis=1)[:, :width]  # last key first: distance, then index
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def sharded_val_metrics(train_local, val_local, *, k: int = 13, unknown_fmr: float | None = None):
    """The validator's val/ metrics with the train references left on the ranks that embedded them.

    Same numbers as :func:`evaluate_embeddings` on the assembled splits (and, with
    ``unknown_fmr``, :func:`calibrated_unknown`), without sending the train embeddings anywhere:

    1. every rank receives every train key and label (not the embeddings), so every rank knows
       each sample's position in the key-sorted train split and the class sizes R;
    2. the val queries are all-gathered (every rank holds all of them);
    3. each rank searches its own references: each query's k nearest (exact, float64, as
       :func:`toolkit.knn.knn_neighbors` finds them, from the ranking search's screen), its ranking depth max(max k, min(R_CAP,
       max R)) as :func:`toolkit.search.nearest` ranks them, and (``unknown_fmr``) its nearest
       same- and other-class distances;
    4. only those candidates travel to rank 0, which merges them by (distance, position) and
       scores kNN accuracy, the ranking metrics and the "unknown" distance.

    Per rank: N / W references and Q queries, Q × (k + depth) candidates out; rank 0 receives
    W × Q × (k + depth). Returns ``(metrics, unknown, counts)`` on rank 0 (``unknown`` None
    without ``unknown_fmr``; ``counts``: samples seen per split), ``None`` elsewhere. Every
    rank must call it (it holds collectives).
    """
    from toolkit.knn import _vote
    from toolkit.retrieval import _same_class_counts, calibrate_from_distances, query_gallery, ranking_depth

    keys_t, emb_t, lab_t = _sorted_share(train_local)
    # keys (UTF-8 bytes in one array: a few bytes each, not a Python string each), labels and
    # the float64 sum of the embeddings (the searches' centre: the mean of all); a rank that
    # read no train sample sends no sum: its empty share may have no width
    shares = distributed.all_gather_object((keys_t, lab_t, emb_t.sum(0, dtype=torch.float64).numpy() if len(keys_t) else None))
    sums = [s for _, _, s in shares if s is not None]
    centre = sum(sums) / max(1, sum(len(ks) for ks, _, _ in shares)) if sums else None
    all_keys = np.concatenate([ks for ks, _, _ in shares if len(ks)]) if any(len(ks) for ks, _, _ in shares) else np.zeros(0, "S1")
    all_labels = torch.cat([lab for ks, lab, _ in shares if len(ks)]).numpy() if len(all_keys) else np.zeros(0, dtype=np.int64)
    distinct = len(np.unique(all_keys))
    if distinct != len(all_keys):
        raise RuntimeError(f"validation saw {len(all_keys) - distinct} duplicate samples")
    order = np.argsort(all_keys, kind="stable")
    position = np.empty(len(all_keys), dtype=np.int64)
    position[order] = np.arange(len(all_keys))  # concatenated index -> position in key order
    rank, world = distributed.world()
    start = sum(len(ks) for ks, _, _ in shares[:rank])
    my_position = position[start : start + len(keys_t)]  # this rank's rows -> global positions
    train_labels = all_labels[order]  # (N,) in key order
    del shares, all_keys, all_labels, order, position  # only the positions and labels are needed from here

    val_parts = distributed.all_gather_object(val_local)
    val_keys = [key for p in val_parts for key in p[0]]
    dim = len(centre) if centre is not None else 0
    val_emb = torch.cat([p[1] for p in val_parts if len(p[0])]) if val_keys else torch.zeros(0, dim)
    val_lab = torch.cat([p[2] for p in val_parts if len(p[0])]) if val_keys else torch.zeros(0, dtype=torch.long)
    if not len(keys_t):
        emb_t = torch.zeros(0, val_emb.shape[1])
    vorder = torch.from_numpy(np.argsort(np.asarray(val_keys, dtype=object)).astype(np.int64))
    val_emb, val_lab = val_emb[vorder], val_lab[vorder]
    ql = val_lab.numpy()
    depth = ranking_depth(_same_class_counts(ql, train_labels))

    if not len(train_labels):
        raise DataError("validation: the train split gave no embeddings")
    if unknown_fmr is not None and len(np.unique(train_labels)) < 2:
        raise DataError(f"unknown threshold: the reference needs at least 2 classes, got {len(np.unique(train_labels))}")
    # queries in blocks, so rank 0 holds at most CANDIDATES merged candidates at a time
    block = max(1, CANDIDATES // (world * (k + depth)))
    # faiss computes distances by sgemm from BLAS_QUERY_ELEMENTS query x dim elements per call,
    # by a direct loop below: blocks at least that large round like one search of every query
    if len(ql) * val_emb.shape[1] >= BLAS_QUERY_ELEMENTS:
        block = max(block, -(-BLAS_QUERY_ELEMENTS // max(1, val_emb.shape[1])))
    knn_w, rank_w = min(k, len(train_labels)), min(depth, len(train_labels))
    label_set, label_pos = np.unique(train_labels, return_inverse=True)  # votes count class positions
    reference = search.ExactReference(emb_t, centre=centre)  # the share moved by the split's centre, once
    correct, sums, weights, counts_m, own, other = 0, {}, {}, {}, [], []
    for s in range(0, len(ql), block):
        rows = slice(s, s + block)
        found = _share_candidates(emb_t, reference, val_emb[rows], k=k, depth=depth, unknown=unknown_fmr is not None,
                                  query_labels=ql[rows], train_labels=lab_t.numpy())
        for name in ("knn_i", "rank_i"):
            found[name] = my_position[found[name]] if found[name].size else found[name]
        parts = distributed.gather_object_to_main(found)
        if parts is None:
            continue
        _, knn_i = _merge_nearest([p["knn_d"] for p in parts], [p["knn_i"] for p in parts], knn_w)
        pred, _ = _vote(torch.from_numpy(label_pos[knn_i]), len(label_set))  # smallest label wins a tie
        correct += int((label_set[pred.numpy()] == ql[rows]).sum())
        rank_d, rank_i = _merge_nearest([p["rank_d"] for p in parts], [p["rank_i"] for p in parts], rank_w)
        result = query_gallery(val_emb[rows], ql[rows], None, train_labels, verification=False, neighbours=(rank_d, rank_i))
        matched = int(result.has_match.sum())  # the rates are means over the queries with a match
        for name, v in result.metrics.items():
            if name.startswith("num_"):
                continue
            if name in ("queries_without_match", "queries_over_r_cap"):
                counts_m[name] = counts_m.get(name, 0) + int(v)
            elif matched:
                sums[name] = sums.get(name, 0.0) + v * matched
                weights[name] = weights.get(name, 0) + matched
        if unknown_fmr is not None:
            own.append(np.min(np.stack([p["own"] for p in parts]), axis=0))
            other.append(np.min(np.stack([p["other"] for p in parts]), axis=0))
    if not distributed.world()[0] == 0:
        return None
    metrics = {"knn_accuracy": correct / len(ql) if len(ql) else math.nan}
    names = [n for n in query_gallery(np.zeros((0, val_emb.shape[1])), [], None, [], verification=False,
                                      neighbours=(np.zeros((0, 0)), np.zeros((0, 0), dtype=np.int64))).metrics
             if not n.startswith("num_")]
    for name in names:
        if name in ("queries_without_match", "queries_over_r_cap"):
            metrics[name] = counts_m.get(name, 0)
        else:
            metrics[name] = sums[name] / weights[name] if weights.get(name) else math.nan
    counts = {"train": len(train_labels), "val": len(ql)}
    unknown = None
    if unknown_fmr is not None and len(ql):  # no val query: nothing to calibrate on (metrics are nan)
        d_own = np.concatenate(own) if own else np.zeros(0)
        d_other = np.concatenate(other) if other else np.zeros(0)
        unknown = {**calibrate_from_distances(d_own, d_other, fmr=unknown_fmr), "calibrated_on": "val queries vs train references"}
    return metrics, unknown, counts
