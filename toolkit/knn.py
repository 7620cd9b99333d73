"""kNN classification: the one entry point for every nearest-neighbour vote in the toolkit.

:func:`knn_accuracy` scores embeddings (scikit-learn below ``TORCH_KNN_MIN_PAIRS`` train ×
query pairs, the blockwise torch kNN above and on GPU: same predictions); the validator,
``toolkit evaluate``, predict and the classifier stage all vote through :func:`knn_predict`.

Blockwise exact kNN classification in torch, with scikit-learn's answers.
:func:`knn_predict` returns what ``KNeighborsClassifier(n_neighbors=k)`` (Euclidean,
uniform weights) predicts on the same data, tie rules included:

* **Neighbour ties** (two train points at the same distance from a query): the smaller
  train index comes first. scikit-learn's brute-force search scans the train set in index
  order and its heap keeps an earlier point over a later one at an equal distance (exact
  for the nearest neighbour; among points tied *at the k-th distance* its pick depends on
  the heap's layout, and its tree searches visit points in tree order. Real embeddings have
  no exact ties, so this never shows on them).
* **Vote ties** (two classes with as many neighbours): the smallest label wins.
  scikit-learn takes ``classes_[argmax(counts)]`` (or ``scipy.stats.mode``), and both pick
  the first, i.e. smallest, of the sorted classes.

How, per block of queries (memory O(block × 4096), whatever N):

1. *Screen* in float32, tile by tile over the train set: ``||t||² − 2 q·t`` (one
   ``addmm``; the query's own ``||q||²`` does not change the order). Each query keeps its
   ``c = 2k + 8`` best values; in later tiles only values below its current c-th best can
   still enter, and those few are picked out with one comparison and merged now and then
   (a vectorised form of scikit-learn's per-query heap).
2. *Refine* the candidates in float64 (scikit-learn also computes its distances in float64,
   upcasting float32 inputs): exact squared distances, sorted by (distance, train index).
3. *Check*: the float32 screen can misorder points by at most a rounding bound ``err``
   (from the matmul precision in force). If the k-th refined distance is not clearly below
   the worst screened candidate (``d_k < d_c − err``), a point outside the candidates could
   belong in the top k: those few rows are redone in float64 against the whole train set.
4. *Vote*: per query, the class with most of the k neighbours, the smallest on a tie.

So the answer is exact (up to float64 rounding, where scikit-learn's own expansion could
order two points differently), while the O(N) work runs as a float32 matmul.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# Queries per block and train rows per screened tile: one reused (1024, 4096) float32 tile
# (16 MB). After the first tile, the few values that can still enter the k best are found
# by a per-run minimum and a comparison instead of a top-k over every tile; at N = 100k the
# matmul is then ~70 % of the time (a top-k per (block, N) row made it ~35 %, 2 cores).
# 2048/8192 columns and runs of 32/128 measured the same within noise.
DEFAULT_BLOCK = 1024
TRAIN_CHUNK = 4096
# Columns per run whose minimum is compared with the running threshold (see _screen).
SUB = 64
# Elements of the float64 temporaries (refine gather, exact fallback): ~8 MB. Kept small on
# purpose: glibc serves allocations above its mmap threshold (at most 32 MB) with fresh
# pages, and page faults then cost more than the arithmetic.
_REFINE_ELEMENTS = 1 << 20


def _as_tensor(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)


def _unit_roundoff() -> float:
    """Unit roundoff of float32 matmuls under the current ``float32_matmul_precision``."""
    precision = torch.get_float32_matmul_precision()
    return {"highest": 2.0**-24, "high": 2.0**-11, "medium": 2.0**-8}.get(precision, 2.0**-8)


def _vote(cls: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Majority class of each row of ``cls`` (b, k) class indices; smallest index on a tie.

    Counts by pairwise equality (b, k, k): O(b·k²), independent of the number of classes.
    Returns (winner class index (b,), its vote count (b,)).
    """
    counts = (cls[:, :, None] == cls[:, None, :]).sum(dim=2)  # (b, k): votes of each neighbour's class
    score = counts * (num_classes + 1) - cls  # most votes first, then the smallest class
    j = score.argmax(dim=1, keepdim=True)  # (b, 1)
    return cls.gather(1, j).squeeze(1), counts.gather(1, j).squeeze(1)


def _exact_rows(train: torch.Tensor, q64: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (r, k) of the k nearest train points of each query row, all in float64.

    Squared distances by differences (the same formula as the refine step, so equal points
    give bit-equal distances), then a stable sort: ties go to the smaller train index.
    """
    n, dim = train.shape
    rows_per = max(1, _REFINE_ELEMENTS // n)
    out = []
    for s in range(0, q64.shape[0], rows_per):
        q = q64[s : s + rows_per]  # (r, D)
        d = torch.empty(q.shape[0], n, dtype=torch.float64, device=q.device)  # (r, N)
        chunk = max(1, _REFINE_ELEMENTS // max(1, q.shape[0] * dim))
        for t in range(0, n, chunk):
            d[:, t : t + chunk] = (train[None, t : t + chunk, :].double() - q[:, None, :]).pow(2).sum(2)
        out.append(torch.sort(d, dim=1, stable=True).indices[:, :k])
    return torch.cat(out)


def _merge(best_v, best_i, pending, width, c):
    """Fold the waiting runs into each row's c best (values, indices).

    ``pending``: list of (rows (m,), slot (m,), first column (m,), values (m, SUB)) of
    flagged runs, ``slot`` being the run's place among its row's waiting runs (< width).
    """
    nb, sub = best_v.shape[0], SUB
    rows = torch.cat([p[0] for p in pending])
    slot = torch.cat([p[1] for p in pending])
    pad_v = torch.full((nb, width, sub), float("inf"), dtype=best_v.dtype, device=best_v.device)
    pad_c = torch.zeros((nb, width), dtype=best_i.dtype, device=best_i.device)
    pad_v[rows, slot] = torch.cat([p[3] for p in pending])
    pad_c[rows, slot] = torch.cat([p[2] for p in pending])
    best_v, j = torch.cat([best_v, pad_v.view(nb, -1)], 1).topk(c, dim=1, largest=False, sorted=False)
    # Column j < c: an old best; else run (j - c) // SUB, offset (j - c) % SUB.
    old = j < c
    jr = (j - c).clamp_min(0)
    new_i = pad_c.gather(1, jr // sub) + jr % sub
    best_i = torch.where(old, best_i.gather(1, j.clamp_max(c - 1)), new_i)
    return best_v, best_i


def _screen(train_aug, q_aug, c, buf):
    """The c smallest screened values ||t||² - 2 q.t of each query row, and their indices.

    ``train_aug`` (N', D+1) = [t, ||t||²], padded to a multiple of ``SUB`` rows whose
    screened value is +inf; ``q_aug`` (b, D+1) = [-2 q, 1]: one matmul gives the screened
    values. Every train point left out has a screened value >= the largest value returned.

    After the first tile (a plain top-k), each tile's rows are cut into runs of ``SUB``
    columns; only runs whose minimum is below the row's current c-th best can hold a newcomer
    and are kept. They are merged (one top-k over the kept runs) after 2, 4, 8 ... tiles:
    with the threshold from j tiles, the next j tiles bring about c newcomers per row, so the
    waiting runs stay few and the merges cost little.
    """
    n = train_aug.shape[0]
    nb = q_aug.shape[0]
    first = min(n, max(TRAIN_CHUNK, -(-c // SUB) * SUB))
    if first <= buf.shape[1]:
        tile = torch.mm(q_aug, train_aug[:first].T, out=buf[:nb, :first])
    else:  # k so large that c > TRAIN_CHUNK
        tile = q_aug @ train_aug[:first].T
    best_v, best_i = tile.topk(c, dim=1, largest=False, sorted=False)  # (nb, c)
    thr = best_v.max(dim=1, keepdim=True).values  # (nb, 1): the c-th best so far
    pending = []
    filled = torch.zeros(nb, dtype=torch.long, device=q_aug.device)  # waiting runs per row
    seen, merge_at = 1, 2  # tiles screened; merge once this many are
    starts = list(range(first, n, TRAIN_CHUNK))
    for j, t in enumerate(starts):
        chunk = train_aug[t : t + TRAIN_CHUNK]
        tile = buf[:nb, : chunk.shape[0]]
        torch.mm(q_aug, chunk.T, out=tile)
        runs = tile.view(nb, -1, SUB)  # (nb, S, SUB)
        flagged = (runs.amin(dim=2) < thr).nonzero()  # (m, 2) row-major: (row, run) that may hold a newcomer
        if flagged.shape[0]:
            r, run = flagged[:, 0], flagged[:, 1]
            counts = torch.bincount(r, minlength=nb)
            slot = torch.arange(r.shape[0], device=r.device) - (counts.cumsum(0) - counts)[r] + filled[r]
            filled += counts
            pending.append((r, slot, run * SUB + t, runs[r, run]))
        seen += 1
        if pending and (seen >= merge_at or j == len(starts) - 1):
            best_v, best_i = _merge(best_v, best_i, pending, int(filled.max()), c)
            thr = best_v.max(dim=1, keepdim=True).values
            pending, merge_at = [], 2 * seen
            filled.zero_()
    return best_v, best_i


@torch.no_grad()
def knn_neighbors(train_emb, query_emb, *, k: int = 13, block: int | None = None) -> torch.Tensor:
    """Indices (Q, k) of each query's k nearest train rows (Euclidean), nearest first.

    Ties in distance are broken by the smaller train index, as scikit-learn does. ``k`` is
    capped at the train size. Inputs: numpy arrays or tensors (B, D); the work runs on the
    train tensor's device.
    """
    train = _as_tensor(train_emb)
    device = train.device
    query = _as_tensor(query_emb).to(device)
    if train.dim() != 2 or query.dim() != 2 or train.shape[1] != query.shape[1]:
        raise ValueError(f"expected train (N, D) and queries (Q, D), got {tuple(train.shape)} and {tuple(query.shape)}")
    n, dim = train.shape
    if n == 0:
        raise ValueError("knn: the train set is empty")
    if k < 1:
        raise ValueError(f"knn: k must be >= 1, got {k}")
    if block is not None and int(block) < 1:
        raise ValueError(f"knn: block must be >= 1, got {block}")
    k = min(int(k), n)
    if query.shape[0] == 0:
        return torch.zeros(0, k, dtype=torch.long, device=device)
    if not train.is_floating_point():
        train = train.float()
    query64 = query.double()
    c = min(n, 2 * k + 8)
    if c == n:  # a tiny train set: every point is a candidate, do it all in float64
        return _exact_rows(train, query64, k)

    train32 = train.float()
    tn32 = train32.pow(2).sum(1)  # (N,)
    pad = -n % SUB  # rows [0, ..., 0, +inf]: screened value +inf, never picked
    train_aug = torch.cat([train32, tn32[:, None]], dim=1)  # (N, D+1) = [t, ||t||²]
    if pad:
        filler = torch.zeros(pad, dim + 1, device=device)
        filler[:, -1] = float("inf")
        train_aug = torch.cat([train_aug, filler])
    train_aug = train_aug.contiguous()
    query_aug = torch.cat([-2.0 * query.float(), torch.ones(query.shape[0], 1, device=device)], dim=1)  # [-2q, 1]
    b = int(block) if block else DEFAULT_BLOCK
    buf = torch.empty(min(b, query.shape[0]), TRAIN_CHUNK, dtype=torch.float32, device=device)
    # Rounding bound on a screened ||t||² - 2 q.t: (D + 9) roundings of terms up to
    # (|q| + max|t|)², doubled for safety; the float64 -> float32 input rounding is inside it.
    u = _unit_roundoff()
    t_max = float(tn32.max().sqrt()) * (1 + 1e-5)
    out = torch.empty(query.shape[0], k, dtype=torch.long, device=device)
    rb = max(1, _REFINE_ELEMENTS // (c * dim))  # refine rows at a time: float64 temporaries of ~8 MB
    for s in range(0, query.shape[0], b):
        cand_d32, cand = _screen(train_aug, query_aug[s : s + b].contiguous(), c, buf)  # (b, c)
        cand, _ = cand.sort(dim=1)  # candidates by train index, so a stable sort keeps index order
        worst32 = cand_d32.max(dim=1).values  # every non-candidate screened >= this
        nb = cand.shape[0]
        for r in range(0, nb, rb):
            e = min(nb, r + rb)
            q64, cr = query64[s + r : s + e], cand[r:e]
            d64 = (train[cr].double() - q64[:, None, :]).pow_(2).sum(2)  # (rb, c) exact squared distances
            order = torch.sort(d64, dim=1, stable=True).indices[:, :k]  # (distance, index) order
            nbr = cr.gather(1, order)  # (rb, k)
            kth = d64.gather(1, order[:, -1:]).squeeze(1)  # (rb,)
            qn = q64.pow(2).sum(1)  # (rb,)
            err = 2.0 * (dim + 9) * u * (qn.sqrt() + t_max).pow(2)
            unsure = ~(kth < worst32[r:e].double() + qn - err)  # a non-candidate might be as near
            if bool(unsure.any()):
                rows = unsure.nonzero().squeeze(1)
                nbr[rows] = _exact_rows(train, q64[rows], k)
            out[s + r : s + e] = nbr
    return out


@torch.no_grad()
def knn_predict(
    train_emb, train_labels, query_emb, *, k: int = 13, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """kNN classification equal to scikit-learn's ``KNeighborsClassifier(n_neighbors=k)``.

    Args:
        train_emb: (N, D) reference embeddings (numpy or tensor; float32 or float64).
        train_labels: (N,) integer labels.
        query_emb: (Q, D) embeddings to classify.
        k: neighbours that vote (capped at N, like the validator does).
        block: queries per block (default ``DEFAULT_BLOCK``); memory O(block × TRAIN_CHUNK).

    Returns:
        ``(pred, votes)``: ``pred`` (Q,) predicted labels (values of ``train_labels``),
        ``votes`` (Q,) how many of the k neighbours voted for it; ``votes / k`` is the
        confidence. Both are tensors on the train embeddings' device.
    """
    train = _as_tensor(train_emb)
    labels = _as_tensor(train_labels).to(train.device)
    if labels.shape != train.shape[:1]:
        raise ValueError(f"knn: expected {train.shape[0]} labels, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"knn: labels must be integers, got {labels.dtype}")
    nbr = knn_neighbors(train, query_emb, k=k, block=block)  # (Q, k)
    classes, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    cls, votes = _vote(inverse[nbr], len(classes))
    return classes[cls], votes


def knn_vote(ref: torch.Tensor, ref_labels: torch.Tensor, queries: torch.Tensor, *, k: int,
              block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """kNN prediction with its confidence: (pred (Q,), share of the k votes the winner got (Q,)), on the CPU.

    ``ref`` (N, D) on any device, ``ref_labels`` (N,), ``queries`` (Q, D); k is capped at N.
    """
    k = min(k, ref.shape[0])
    pred, votes = knn_predict(ref.float(), ref_labels.long().to(ref.device), queries.float().to(ref.device), k=k, block=block)
    return pred.cpu(), (votes.float() / k).cpu()


def knn_accuracy_torch(train_emb, train_labels, val_emb, val_labels, *, k: int = 13, block: int | None = None):
    """:func:`knn_accuracy` with the torch backend (:func:`knn_predict`): (accuracy, predictions)."""
    pred, _ = knn_predict(train_emb, train_labels, val_emb, k=k, block=block)
    truth = _as_tensor(val_labels).to(pred.device)
    acc = float((pred == truth).double().mean()) if len(truth) else math.nan
    return acc, pred.cpu().numpy()


# train × query pairs above which the toolkit's blockwise torch kNN beats scikit-learn on
# CPU (toolkit bench knn, 2 cores: 0.68× at 10k × 1.5k, 0.89× at 30k × 4.5k, 1.34× at
# 100k × 15k; so from about 50k × 7.5k). Both give the same predictions.
TORCH_KNN_MIN_PAIRS = 4 * 10**8


def knn_accuracy(train_emb, train_labels, val_emb, val_labels, *, k: int = 13,
                 backend: str = "auto") -> tuple[float, np.ndarray]:
    """kNN classifier (Euclidean, uniform votes, scikit-learn's answers). Returns (accuracy, predictions).

    ``backend``: "sklearn" (``KNeighborsClassifier``), "torch" (:func:`knn_predict`,
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
        return knn_accuracy_torch(train_emb, train_labels, val_emb, val_labels, k=k)
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=min(k, len(train_labels)))
    clf.fit(np.asarray(train_emb), np.asarray(train_labels))
    pred = clf.predict(np.asarray(val_emb))
    return float((pred == np.asarray(val_labels)).mean()), pred


__all__ = ["TORCH_KNN_MIN_PAIRS", "knn_accuracy", "knn_accuracy_torch", "knn_neighbors", "knn_predict", "knn_vote"]
