"""kNN classification: the one entry point for every nearest-neighbour vote in the toolkit.

:func:`knn_accuracy` scores embeddings, and the validator, ``toolkit evaluate``, predict and
the classifier stage vote through :func:`knn_predict` / :func:`knn_vote`. Every backend
gives what ``KNeighborsClassifier(n_neighbors=k)`` (Euclidean, uniform weights) predicts on
the same data, tie rules included:

* ``"faiss"``: faiss's exact flat index (:mod:`toolkit.search`) screens the candidates;
* ``"torch"``: the toolkit's own blockwise screen (a float32 ``addmm`` per tile), on the
  train tensor's device;
* ``"sklearn"`` (:func:`knn_accuracy` only): ``KNeighborsClassifier`` itself;
* ``"auto"``: the fastest of them as measured by ``toolkit bench knn`` (:func:`auto_backend`):
  on CPU scikit-learn below ``SKLEARN_KNN_MAX_PAIRS`` train × query pairs (about 8k × 1.2k),
  faiss above, the torch screen from ``TORCH_KNN_MIN_TRAIN`` (200k) train rows on, where it is
  faster than faiss, and when faiss would search the queries with its slow direct loop (fewer
  than about 1,000 queries at 128-d); on CUDA tensors torch, or faiss when it has GPU support.

Tie rules (scikit-learn's):

* **Neighbour ties** (two train points at the same distance from a query): the smaller
  train index comes first. scikit-learn's brute-force search scans the train set in index
  order and its heap keeps an earlier point over a later one at an equal distance (exact
  for the nearest neighbour; among points tied *at the k-th distance* its pick depends on
  the heap's layout, and its tree searches visit points in tree order. Real embeddings have
  no exact ties, so this never shows on them).
* **Vote ties** (two classes with as many neighbours): the smallest label wins.
  scikit-learn takes ``classes_[argmax(counts)]`` (or ``scipy.stats.mode``), and both pick
  the first, i.e. smallest, of the sorted classes.

How, per block of queries (the faiss and torch backends differ in step 1 only):

1. *Screen* in float32: each query keeps the ``c = 2k + 8`` train points with the smallest
   screened value, and every point left out screened at least as high as the worst kept.

   * faiss (``IndexFlatL2``): ``||q||² + ||t||² − 2 q·t`` (sgemm, blocks of 4096 queries
     × 1024 train rows; below ``distance_compute_blas_threshold`` = 128,000 query × dim
     elements per call, a direct ``Σ (q − t)²`` loop instead; both clamp at 0), kept in a
     heap per query (a reservoir from 100 candidates on).
   * torch: ``||t||² − 2 q·t`` (one ``addmm`` per tile of 4096 train rows; the query's
     ``||q||²`` does not change the order). In later tiles only values below a query's
     current c-th best can still enter, and those few are picked out with one comparison
     and merged now and then (a vectorised form of scikit-learn's per-query heap).
2. *Refine* the candidates in float64 (scikit-learn also computes its distances in float64,
   upcasting float32 inputs): exact squared distances, sorted by (distance, train index).
3. *Check*: a screened value is off the true squared distance ``d`` by at most ``err``
   (below). Every left-out point has ``d >= worst − err``, ``worst`` being the largest kept
   screened value, plus ``||q||²`` for torch's screen, which leaves it out. If the k-th
   refined distance is not clearly below that (``d_k < worst − err``), a point outside the
   candidates could belong in the top k: those few rows are redone in float64 against the
   whole train set.
4. *Vote*: per query, the class with most of the k neighbours, the smallest on a tie.

The rounding bound: with ``Q = ||q||``, ``T = max ||t||`` and ``u`` the unit roundoff of the
float32 products (2⁻²⁴; torch: of the ``float32_matmul_precision`` in force, faiss's CPU
sgemm and its GPU cuBLAS calls (reduced precision disallowed) are plain float32), the two
norms and the dot product are each within ``D·u`` of their size, the two additions add
``u`` each and the float64 → float32 rounding of the inputs ``2u``, all at most
``(Q + T)²``; the direct loop's ``Σ (q − t)²`` is within ``(D + 3)·u·d``. So
``|screened − d| <= (D + 6)·u·(Q + T)²`` to first order; the check uses twice
``(D + 9)·u·(Q + T)²``, plus ``(D + 9)·2⁻¹²⁶`` for underflow.

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
# Queries per faiss search call (faiss backend): faiss recomputes the train norms once per
# call and blocks its own work by 4096 queries; memory O(FAISS_BLOCK × c) for the results.
FAISS_BLOCK = 1 << 16


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



def _round_bound(qn: torch.Tensor, t_max: float, dim: int, u: float) -> torch.Tensor:
    """Bound (float64, per query) on |screened value - true squared distance| (module docstring)."""
    return 2.0 * (dim + 9) * u * (qn.sqrt() + t_max).pow(2) + (dim + 9) * 2.0**-126


def _torch_blocks(train, query, c, block):
    """Torch screen, per block of queries: (start, candidates (b, c), worst (b,) float64).

    ``worst`` is in squared-distance units *without* ``||q||²`` (added by the caller).
    """
    n, dim = train.shape
    device = train.device
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
    buf = torch.empty(min(block, query.shape[0]), TRAIN_CHUNK, dtype=torch.float32, device=device)
    for s in range(0, query.shape[0], block):
        cand_d32, cand = _screen(train_aug, query_aug[s : s + block].contiguous(), c, buf)  # (b, c)
        yield s, cand, cand_d32.max(dim=1).values.double()


def faiss_on_gpu() -> bool:
    """Whether faiss was built with GPU support (``faiss-gpu``) and sees a GPU."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _faiss_blocks(train, query, c, block):
    """faiss screen (exact flat index), per block of queries: (start, candidates (b, c), worst (b,) float64).

    ``worst`` includes ``||q||²`` (faiss's values are full squared distances). The index is
    a GPU copy when ``train`` is on CUDA and faiss has GPU support, otherwise on the CPU.
    """
    from toolkit import search

    device = train.device
    gpu = device.type == "cuda" and faiss_on_gpu()
    if gpu:
        index = search.build_index(train, device=device)
        find = lambda q: search.search(index, q, c)  # noqa: E731
    else:  # searched in place: no index copy of the train rows
        rows = search.as_float32(train)
        find = lambda q: search.exact_search(rows, q, c)  # noqa: E731
    q32 = search.as_float32(query)  # CPU array; faiss copies a GPU index's queries itself
    for s in range(0, q32.shape[0], block):
        dist, ids = find(q32[s : s + block])
        dist = torch.from_numpy(dist).to(device)
        ids = torch.from_numpy(ids).to(device)
        worst = dist.max(dim=1).values.double()
        missing = (ids < 0).any(dim=1)  # fewer than c results (NaN inputs): redo exactly
        if bool(missing.any()):
            worst[missing] = -math.inf
            ids = ids.clamp_min(0)
        yield s, ids, worst


# Unit roundoff of faiss's float32 distances: plain float32 on the CPU (OpenBLAS sgemm, SIMD
# loops) and on the GPU (cuBLAS with reduced-precision reductions disallowed; no TF32).
_FAISS_ROUNDOFF = 2.0**-24
# Largest k a faiss GPU index searches (its k-selection kernels stop at 2048).
_FAISS_GPU_MAX_K = 2048


def _neighbour_backend(backend: str, device: torch.device, n: int, q: int, dim: int, c: int) -> str:
    """"faiss" or "torch" for :func:`knn_neighbors` (``backend`` as given: auto, faiss, torch)."""
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"knn backend must be auto, faiss or torch, got {backend!r}")
    if backend == "auto":
        backend = auto_backend(n, q, dim, device=device, sklearn=False)
    if backend == "faiss" and device.type == "cuda" and faiss_on_gpu() and c > _FAISS_GPU_MAX_K:
        backend = "torch"  # k too large for faiss's GPU search
    return backend


@torch.no_grad()
def knn_neighbors(train_emb, query_emb, *, k: int = 13, block: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Indices (Q, k) of each query's k nearest train rows (Euclidean), nearest first.

    Ties in distance are broken by the smaller train index, as scikit-learn does. ``k`` is
    capped at the train size. Inputs: numpy arrays or tensors (B, D); the refinement runs on
    the train tensor's device. ``backend``: "faiss", "torch" or "auto" (see the module
    docstring); the answer is the same. ``block``: queries per block (default
    ``DEFAULT_BLOCK`` for torch, ``FAISS_BLOCK`` for faiss).
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
    c = min(n, 2 * k + 8)
    backend = _neighbour_backend(backend, device, n, query.shape[0], dim, c)
    if query.shape[0] == 0:
        return torch.zeros(0, k, dtype=torch.long, device=device)
    if not train.is_floating_point():
        train = train.float()
    query64 = query.double()
    if c == n:  # a tiny train set: every point is a candidate, do it all in float64
        return _exact_rows(train, query64, k)

    qn_all = query64.pow(2).sum(1)  # (Q,)
    t_max = float(torch.linalg.vector_norm(train.float(), dim=1).max()) * (1 + 1e-5)  # no (N, D) temporary
    if backend == "faiss":
        if not block:  # even blocks: a short last one could fall below faiss's BLAS threshold
            block = -(-query.shape[0] // -(-query.shape[0] // FAISS_BLOCK))
        blocks = _faiss_blocks(train, query, c, int(block))
        u, add_qn = _FAISS_ROUNDOFF, None  # faiss's values include ||q||²
    else:
        blocks = _torch_blocks(train, query, c, int(block) if block else DEFAULT_BLOCK)
        u, add_qn = _unit_roundoff(), qn_all
    return _refine(train, query64, blocks, k, lambda a, b: _round_bound(qn_all[a:b], t_max, dim, u), add_qn=add_qn)


def _refine(train: torch.Tensor, query64: torch.Tensor, blocks, k: int, bound, *, add_qn=None) -> torch.Tensor:
    """Steps 2 and 3 of the module docstring: the exact k nearest of each query from screened
    ``blocks`` (start, candidates (b, c), worst (b,) float64); ``bound(a, b)``: the rounding
    bound of queries a..b; ``add_qn``: (Q,) ``||q||²`` to add to ``worst`` (torch's screen)."""
    dim = train.shape[1]
    out = torch.empty(query64.shape[0], k, dtype=torch.long, device=train.device)
    for s, cand, worst in blocks:
        cand, _ = cand.sort(dim=1)  # candidates by train index, so a stable sort keeps index order
        nb, c = cand.shape
        if add_qn is not None:
            worst = worst + add_qn[s : s + nb]
        rb = max(1, _REFINE_ELEMENTS // (c * dim))  # refine rows at a time: float64 temporaries of ~8 MB
        for r in range(0, nb, rb):
            e = min(nb, r + rb)
            q64, cr = query64[s + r : s + e], cand[r:e]
            d64 = torch.sub(train[cr], q64[:, None, :]).pow_(2).sum(2)  # (rb, c) exact squared distances, in float64
            order = torch.sort(d64, dim=1, stable=True).indices[:, :k]  # (distance, index) order
            nbr = cr.gather(1, order)  # (rb, k)
            kth = d64.gather(1, order[:, -1:]).squeeze(1)  # (rb,)
            unsure = ~(kth < worst[r:e] - bound(s + r, s + e))  # a non-candidate might be as near
            if bool(unsure.any()):
                rows = unsure.nonzero().squeeze(1)
                nbr[rows] = _exact_rows(train, q64[rows], k)
            out[s + r : s + e] = nbr
    return out


@torch.no_grad()
def knn_from_screen(train_emb, query_emb, candidates, worst, *, k: int, query_sq, train_norm_max: float) -> torch.Tensor:
    """:func:`knn_neighbors`' answer from a faiss screen already made, e.g. the exact search
    that ranks the same references for the retrieval metrics: steps 2 and 3 only.

    ``candidates`` (Q, c) train rows with the c smallest screened squared distances of each
    query (c > k; -1 where the search found fewer), ``worst`` (Q,) the largest of them (every
    other row screened at least that far). The screen may have compared the rows moved by a
    centre (what :class:`toolkit.search.ExactReference` searches): ``query_sq`` (Q,) are then
    the squared norms of the moved queries and ``train_norm_max`` the largest norm of the moved
    rows, which is what bounds its float32 rounding; the refinement uses ``train_emb`` and
    ``query_emb`` themselves. Same indices as :func:`knn_neighbors` (distance, then index).
    """
    train = _as_tensor(train_emb)
    if not train.is_floating_point():
        train = train.float()
    device = train.device
    query64 = _as_tensor(query_emb).to(device).double()
    cand = _as_tensor(candidates).to(device).long()
    worst = _as_tensor(worst).to(device).double().clone()
    n, dim = train.shape
    qs = _as_tensor(query_sq).to(device).double()
    if query64.dim() != 2 or query64.shape[1] != dim:
        raise ValueError(f"knn: expected ({dim}-d) queries (Q, {dim}), got shape {tuple(query64.shape)}")
    q = query64.shape[0]
    if cand.dim() != 2 or cand.shape[0] != q or worst.shape != (q,) or qs.shape != (q,) or not 1 <= k <= n:
        raise ValueError(f"knn: expected (Q, c) candidates, (Q,) worst and (Q,) query_sq for Q = {q} queries and 1 <= k <= {n}, "
                         f"got {tuple(cand.shape)}, {tuple(worst.shape)}, {tuple(qs.shape)}, k={k}")
    if q == 0:
        return torch.zeros(0, k, dtype=torch.long, device=device)
    if cand.shape[1] >= n:  # every row a candidate: do it all in float64, as knn_neighbors does
        return _exact_rows(train, query64, k)
    if cand.shape[1] <= k:
        raise ValueError(f"knn: the screen kept {cand.shape[1]} candidates per query, need more than k = {k}")
    missing = (cand < 0).any(dim=1)  # fewer than c results (NaN inputs): redo exactly
    if bool(missing.any()):
        worst[missing] = -math.inf
        cand = cand.clamp_min(0)
    bound = lambda a, b: _round_bound(qs[a:b], float(train_norm_max) * (1 + 1e-5), dim, _FAISS_ROUNDOFF)  # noqa: E731
    return _refine(train, query64, [(0, cand, worst)], k, bound)


@torch.no_grad()
def knn_predict(
    train_emb, train_labels, query_emb, *, k: int = 13, block: int | None = None, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """kNN classification equal to scikit-learn's ``KNeighborsClassifier(n_neighbors=k)``.

    Args:
        train_emb: (N, D) reference embeddings (numpy or tensor; float32 or float64).
        train_labels: (N,) integer labels.
        query_emb: (Q, D) embeddings to classify.
        k: neighbours that vote (capped at N, like the validator does).
        block: queries per block (default ``DEFAULT_BLOCK`` for torch, ``FAISS_BLOCK`` for faiss).
        backend: "faiss", "torch" or "auto" (:func:`auto_backend`); same predictions.

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
    nbr = knn_neighbors(train, query_emb, k=k, block=block, backend=backend)  # (Q, k)
    classes, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    cls, votes = _vote(inverse[nbr], len(classes))
    return classes[cls], votes


def knn_vote(ref: torch.Tensor, ref_labels: torch.Tensor, queries: torch.Tensor, *, k: int,
              block: int | None = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """kNN prediction with its confidence: (pred (Q,), share of the k votes the winner got (Q,)), on the CPU.

    ``ref`` (N, D) on any device, ``ref_labels`` (N,), ``queries`` (Q, D); k is capped at N.
    ``backend``: as for :func:`knn_predict`.
    """
    k = min(k, ref.shape[0])
    pred, votes = knn_predict(ref.float(), ref_labels.long().to(ref.device), queries.float().to(ref.device), k=k,
                              block=block, backend=backend)
    return pred.cpu(), (votes.float() / k).cpu()


def knn_accuracy_torch(train_emb, train_labels, val_emb, val_labels, *, k: int = 13, block: int | None = None,
                       backend: str = "torch"):
    """:func:`knn_accuracy` through :func:`knn_predict` (``backend`` torch or faiss): (accuracy, predictions)."""
    pred, _ = knn_predict(train_emb, train_labels, val_emb, k=k, block=block, backend=backend)
    truth = _as_tensor(val_labels).to(pred.device)
    acc = float((pred == truth).double().mean()) if len(truth) else math.nan
    return acc, pred.cpu().numpy()


# What backend="auto" runs on CPU, from toolkit bench knn (128-d unit vectors, 15 % as many
# queries up to 15,000, k = 13, 2 cores, best of 2-9 alternated runs; seconds):
#
#   train N × queries   sklearn   faiss   torch
#   5k × 750              0.033   0.066   0.051   (faiss: its direct loop, see below)
#   7k × 1.05k            0.057   0.062   0.081
#   8k × 1.2k             0.075   0.071   0.098
#   10k × 1.5k            0.109   0.100   0.139
#   12k × 1.8k            0.158   0.132   0.198
#   20k × 3k              0.399   0.305   0.400
#   50k × 7.5k            2.30    1.39    1.69
#   100k × 15k            9.66    4.95    5.08
#   200k × 15k              -    10.5     9.7
#   300k × 15k              -    15.0    12.7
#   400k × 15k              -    19.6    15.6
#   1M × 15k             88.0    47.5    35.3    (1M × 3k: faiss 10.4, torch 8.3)
#
# scikit-learn wins below about 8k × 1.2k pairs; faiss's cost per pair is about constant
# (3.2-3.6 ns) while the torch screen's falls with N (more of its tiles meet a tight
# threshold), so torch wins again from about 200k train rows (1.08× at 200k, 1.26× at 400k,
# 1.26-1.35× at 1M). And faiss searches a call of fewer than distance_compute_blas_threshold query ×
# dimension elements (128,000 since faiss 1.14.2: 1,000 queries at 128-d; 20 queries before)
# with a direct loop, ~6× slower per pair than its sgemm: 100k × 900 took 2.67 s (torch
# 0.44 s, scikit-learn 0.56 s; 100k × 1,000: faiss 0.44 s).
SKLEARN_KNN_MAX_PAIRS = 10**7  # train × query pairs below which scikit-learn is fastest
TORCH_KNN_MIN_TRAIN = 200_000  # train rows from which the torch screen beats faiss's


def _faiss_blas(n_queries: int, dim: int) -> bool:
    """Whether faiss screens ``n_queries`` queries of ``dim`` per call with sgemm (not its direct loop)."""
    try:
        import faiss
    except ImportError:
        return False
    threshold = int(faiss.cvar.distance_compute_blas_threshold)
    version = tuple(int(p) for p in faiss.__version__.split(".")[:3] if p.isdigit())
    return (n_queries * dim if version >= (1, 14, 2) else n_queries) >= threshold


def auto_backend(n_train: int, n_queries: int, dim: int = 128, *, device=None, sklearn: bool = True) -> str:
    """The backend ``backend="auto"`` runs for ``n_train`` × ``n_queries`` embeddings of ``dim`` on ``device``.

    CUDA tensors: "torch" (the blockwise kNN runs on the GPU), or "faiss" when faiss has GPU
    support (not measured here: no faiss-gpu on the development machine). CPU, from the
    measurements above: "sklearn" below ``SKLEARN_KNN_MAX_PAIRS`` train × query pairs (when
    allowed: :func:`knn_accuracy`; :func:`knn_predict` passes ``sklearn=False``), "torch"
    from ``TORCH_KNN_MIN_TRAIN`` train rows on or when faiss would search the queries with
    its direct loop, "faiss" otherwise.
    """
    if device is not None and torch.device(device).type == "cuda":
        return "faiss" if faiss_on_gpu() else "torch"
    if sklearn and n_train * n_queries < SKLEARN_KNN_MAX_PAIRS:
        return "sklearn"
    if n_train >= TORCH_KNN_MIN_TRAIN or not _faiss_blas(min(n_queries, FAISS_BLOCK), dim):
        return "torch"
    return "faiss"


def knn_accuracy(train_emb, train_labels, val_emb, val_labels, *, k: int = 13,
                 backend: str = "auto") -> tuple[float, np.ndarray]:
    """kNN classifier (Euclidean, uniform votes, scikit-learn's answers). Returns (accuracy, predictions).

    ``backend``: "sklearn" (``KNeighborsClassifier``), "faiss" or "torch" (:func:`knn_predict`,
    same predictions, tie rules included) or "auto": the fastest for the size and device
    (:func:`auto_backend`).
    """
    if backend not in ("auto", "sklearn", "torch", "faiss"):
        raise ValueError(f"knn backend must be auto, sklearn, torch or faiss, got {backend!r}")
    if backend == "auto":
        device = train_emb.device if isinstance(train_emb, torch.Tensor) else None
        dim = int(np.shape(train_emb)[1]) if np.ndim(train_emb) == 2 else 1
        backend = auto_backend(len(train_labels), len(val_labels), dim, device=device)
    if backend in ("torch", "faiss"):
        return knn_accuracy_torch(train_emb, train_labels, val_emb, val_labels, k=k, backend=backend)
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=min(k, len(train_labels)))
    clf.fit(np.asarray(train_emb), np.asarray(train_labels))
    pred = clf.predict(np.asarray(val_emb))
    return float((pred == np.asarray(val_labels)).mean()), pred


__all__ = ["FAISS_BLOCK", "SKLEARN_KNN_MAX_PAIRS", "TORCH_KNN_MIN_TRAIN", "auto_backend", "faiss_on_gpu", "knn_accuracy",
           "knn_accuracy_torch", "knn_from_screen", "knn_neighbors", "knn_predict", "knn_vote"]
