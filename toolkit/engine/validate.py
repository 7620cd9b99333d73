"""Rank-zero validation: every rank embeds its share, rank 0 assembles and scores.

All ranks stream the split in *eval* mode (each sample exactly once across ranks and
workers, with its key), embed with the bare model in eval mode (no DDP, no collectives per
batch, so unequal batch counts are fine), then one ``gather_object`` brings everything to
rank 0, which checks for duplicates and computes kNN accuracy (k = 13), precision@1 and
MAP@R on the validation split against the training split.
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from toolkit.data.stream import ShardStream, make_loader
from toolkit.data.transforms import to_model_input


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
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((keys, emb, labels), parts, dst=0)
        if dist.get_rank() != 0:
            return None
    else:
        parts = [(keys, emb, labels)]
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


# train × query pairs above which the toolkit's blockwise torch kNN beats scikit-learn on
# CPU (toolkit bench knn, 2 cores: 0.68× at 10k × 1.5k, 0.89× at 30k × 4.5k, 1.34× at
# 100k × 15k; so from about 50k × 7.5k). Both give the same predictions.
TORCH_KNN_MIN_PAIRS = 4 * 10**8


def knn_accuracy(train_emb, train_labels, val_emb, val_labels, *, k: int = 13,
                 backend: str = "auto") -> tuple[float, np.ndarray]:
    """kNN classifier (Euclidean, uniform votes, scikit-learn's answers). Returns (accuracy, predictions).

    ``backend``: "sklearn" (``KNeighborsClassifier``), "torch" (:func:`toolkit.knn.knn_predict`,
    same predictions, tie rules included) or "auto": torch on CUDA tensors or from
    ``TORCH_KNN_MIN_PAIRS`` train × query pairs on, where it is the faster of the two.
    """
    if backend not in ("auto", "sklearn", "torch"):
        raise ValueError(f"knn backend must be auto, sklearn or torch, got {backend!r}")
    if backend == "auto":
        on_gpu = isinstance(train_emb, torch.Tensor) and train_emb.is_cuda
        big = len(train_labels) * len(val_labels) >= TORCH_KNN_MIN_PAIRS
        backend = "torch" if on_gpu or big else "sklearn"
    if backend == "torch":
        from toolkit.knn import knn_accuracy_torch

        return knn_accuracy_torch(train_emb, train_labels, val_emb, val_labels, k=k)
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=min(k, len(train_labels)))
    clf.fit(np.asarray(train_emb), np.asarray(train_labels))
    pred = clf.predict(np.asarray(val_emb))
    return float((pred == np.asarray(val_labels)).mean()), pred


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
