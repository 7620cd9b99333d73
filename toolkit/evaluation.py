"""Scoring embeddings: embed a split across ranks, assemble it, kNN and retrieval metrics.

Used by the validator (rank 0 during training), ``toolkit evaluate`` / ``export`` and the
classifier report, so all three score the same way.

* :func:`embed_split`: every rank streams its share of a split in *eval* mode (each sample
  exactly once across ranks and workers, with its key) and embeds it with the bare model in
  eval mode (no DDP, no collectives per batch, so unequal batch counts are fine).
* :func:`gather_to_main`: one ``gather_object`` brings every share to rank 0, which checks
  for duplicates and sorts by key; :func:`warn_missing` says what could not be read.
* :func:`evaluate_embeddings`: kNN accuracy (k = 13, :func:`toolkit.knn.knn_accuracy`),
  precision@1 and MAP@R of val queries against the train split.
* :func:`run_split` / :func:`evaluate`: the same for a saved run, with the head too.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from toolkit import distributed
from toolkit.artifacts import Run, build_frozen_embedder, check_classes, default_device, load_head, open_run
from toolkit.data.shards import read_info
from toolkit.data.stream import ShardStream, make_loader
from toolkit.data.transforms import to_model_input
from toolkit.errors import DataError
from toolkit.knn import knn_accuracy, knn_vote

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
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """This rank's share of ``split``: (keys, embeddings (N, D) float32 CPU, labels (N,))."""
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
    return (
        keys,
        torch.cat(embs) if embs else torch.zeros(0, dim),
        torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
    )


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


def retrieval_metrics(train_emb, train_labels, val_emb, val_labels, *, block: int = 1024) -> dict[str, float]:
    """precision@1 and MAP@R of val queries against the train set (Musgrave et al., 2020).

    R = number of train samples sharing the query's class; MAP@R averages, over the first R
    retrieved items, the precision at each correct one, divided by R. Blockwise: memory is
    O(block × N_train).
    """
    # float64: early in training embeddings sit very close together, and float32 distances
    # then tie at 0 and make the ranking arbitrary (scikit-learn's kNN does not have that issue).
    ref = torch.as_tensor(train_emb, dtype=torch.float64)
    ref_y = torch.as_tensor(train_labels)
    q_all = torch.as_tensor(val_emb, dtype=torch.float64)
    q_y_all = torch.as_tensor(val_labels)
    counts = torch.bincount(ref_y, minlength=int(max(ref_y.max(), q_y_all.max())) + 1)
    r_max = int(counts.max())
    p1, mapr = [], []
    for s in range(0, len(q_all), block):
        q, qy = q_all[s : s + block], q_y_all[s : s + block]
        d = torch.cdist(q, ref)  # (b, N)
        idx = d.topk(min(r_max, ref.shape[0]), dim=1, largest=False).indices  # (b, R_max) nearest first
        hit = (ref_y[idx] == qy[:, None]).float()  # (b, R_max)
        r = counts[qy].clamp(min=1)  # (b,)
        within = (torch.arange(hit.shape[1])[None, :] < r[:, None]).float()
        hit = hit * within
        prec_at_i = hit.cumsum(1) / torch.arange(1, hit.shape[1] + 1)[None, :]
        mapr.append((prec_at_i * hit).sum(1) / r)
        p1.append(hit[:, 0])
    return {"precision_at_1": float(torch.cat(p1).mean()), "map_at_r": float(torch.cat(mapr).mean())}


def evaluate_embeddings(train, val, *, k: int = 13) -> dict[str, float]:
    """All validation metrics from assembled (keys, emb, labels) of train and val."""
    acc, _ = knn_accuracy(train[1], train[2], val[1], val[2], k=k)
    return {"knn_accuracy": acc, **retrieval_metrics(train[1], train[2], val[1], val[2])}


@dataclass
class SplitResult:
    """Everything computed on one split; what evaluate, export and the report summarise."""

    shards: str
    split: str
    classes: list[str]
    keys: list[str]
    embeddings: torch.Tensor  # (N, D) float32, unit rows
    labels: torch.Tensor  # (N,) long
    k: int
    knn_reference: str | None = None  # where the kNN votes come from
    knn_pred: torch.Tensor | None = None  # (N,) long
    knn_share: torch.Tensor | None = None  # (N,) vote share of the winner
    head_logp: torch.Tensor | None = None  # (N, C) log-probabilities

    @property
    def head_pred(self) -> torch.Tensor | None:
        return None if self.head_logp is None else self.head_logp.argmax(1)


def _resolve_method(run: Run, method: str | None) -> str:
    if method is None:
        return "both" if run.head is not None else "knn"
    if method not in ("knn", "head", "both", "none"):
        raise DataError(f"method must be knn, head or both, got {method!r}")
    return method


def run_split(
    run,
    shards: str | Path | None = None,
    split: str = "val",
    method: str | None = None,
    *,
    k: int | None = None,
    reference: Literal["auto", "index", "train"] = "auto",
    device=None,
    batch_size: int = 512,
    num_workers: int = 0,
) -> SplitResult:
    """Embed ``split`` of ``shards`` (default: the embedder's) and score it with kNN and/or the head.

    ``method=None`` means both when the run has a head, else kNN; ``"none"`` only embeds.
    ``reference``: kNN votes against the saved index (``"index"``), the train split of
    ``shards`` re-embedded (``"train"``), or the index when there is one (``"auto"``).
    """
    run = open_run(run)
    method = _resolve_method(run, method)
    shards = str(shards) if shards else run.shards()  # default: the folder it was trained on, if local
    info = read_info(shards)
    check_classes(info.classes, run.classes, shards=shards)
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
    result = SplitResult(shards=shards, split=split, classes=run.classes, keys=keys, embeddings=emb, labels=labels, k=k)
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
    return result


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, float | None]:
    """{class name: accuracy on its samples} (None for a class absent from the split)."""
    out: dict[str, float | None] = {}
    for i, name in enumerate(classes):
        mask = labels == i
        out[name] = float((pred[mask] == i).float().mean()) if mask.any() else None
    return out


def split_metrics(result: SplitResult) -> dict:
    """Plain-number metrics of a :class:`SplitResult` (JSON-ready)."""
    m: dict = {"shards": result.shards, "split": result.split, "num_samples": len(result.keys), "num_classes": len(result.classes)}
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
    return m


def evaluate(run, shards: str | Path | None = None, split: str = "val", method: str | None = None, **options) -> dict:
    """Accuracy of kNN and/or the head on ``split`` of ``shards`` -> metrics dict.

    Takes :func:`run_split`'s arguments (``k``, ``reference``, ``device``, ``batch_size``,
    ``num_workers`` as keywords).
    Keys: shards, split, num_samples, num_classes; knn_k, knn_reference, knn_accuracy,
    knn_per_class (with kNN); head_accuracy, head_loss (NLL), head_per_class (with a head).
    Raises DataError naming the difference when the shards' classes are not the model's.
    """
    return split_metrics(run_split(run, shards, split, method, **options))
