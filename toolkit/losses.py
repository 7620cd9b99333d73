"""Triplet losses with online mining in O(B^2) time, and gradient-exact cross-process mining.

Notation: B embeddings of dimension D, distance matrix `dist` (B, B), `dist[a, p]` the
anchor-positive distance, `dist[a, n]` the anchor-negative distance.

Strategies (every one averages over anchor-positive pairs (a, p), a != p, same label, whose
anchor has at least one negative; "all" averages over triplets instead):

- "semihard" (FaceNet / TF-Addons): n = the negative with the smallest d(a, n) strictly
  greater than d(a, p); when no such negative exists, the farthest negative of a.
- "hard": n = the closest negative of a (batch-hard, but one term per pair).
- "all": every valid triplet (a, p, n).

term = relu(d(a, p) - d(a, n) + margin). No B x B x B tensor is ever materialised.

"semihard" and "hard" mine a block of anchors at a time (`_mine`, no gradient), then
differentiate only the chosen distances: for B > 512 through `pair_distances`, so memory
is O(block + B * K), not O(B^2), and no (B, B) tensor is kept for backward; small batches
use one dense (B, B) matrix, which is faster there. "all" weights a (B, B) matrix.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from toolkit.distributed import world

STRATEGIES = ("semihard", "hard", "all")

# "all" enumerates triplets for a chunk of anchors at a time: chunk * B * B elements.
_ALL_CHUNK_ELEMENTS = 1 << 22


def pairwise_distances(emb: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Euclidean (or squared Euclidean) distances between the rows of `emb` (B, D) -> (B, B).

    Uses ||a||^2 + ||b||^2 - 2 a.b (one matmul, no (B, B, D) difference tensor). Rounding can
    make that slightly negative, hence the clamp; the diagonal is set to exactly zero.
    """
    return row_distances(emb, slice(0, emb.shape[0]), squared)


def row_distances(emb: torch.Tensor, rows: slice, squared: bool = False) -> torch.Tensor:
    """Differentiable distances from the anchors ``emb[rows]`` to every row of `emb`: (b, B).

    The (b, B) block of :func:`pairwise_distances`; an anchor's distance to itself is exactly 0.
    """
    anchors = emb[rows]  # (b, D)
    sq_norm = emb.pow(2).sum(dim=1)  # (B,)
    sq = sq_norm[rows, None] + sq_norm[None, :] - 2.0 * (anchors @ emb.T)  # (b, B)
    sq = sq.clamp_min(0.0)
    own = torch.arange(rows.start, rows.start + anchors.shape[0], device=emb.device)
    self_mask = own[:, None] == torch.arange(emb.shape[0], device=emb.device)[None, :]  # (b, B)
    sq = sq.masked_fill(self_mask, 0.0)
    if squared:
        return sq
    # d sqrt(x)/dx is infinite at x = 0, and 0 (unused entry) * inf = NaN in backward.
    # Feed sqrt a harmless 1 where the distance is zero and zero those entries afterwards:
    # masked_fill blocks the gradient on both sides, so no NaN reaches `emb`.
    zero = sq == 0  # (b, B)
    return torch.sqrt(sq.masked_fill(zero, 1.0)).masked_fill(zero, 0.0)


def _zero_loss(emb: torch.Tensor) -> tuple[torch.Tensor, dict]:
    # Still connected to the graph, so backward() (and DDP's reducer) sees every parameter.
    loss = emb.sum() * 0.0
    return loss, {"loss": 0.0, "active_fraction": 0.0, "num_pairs": 0}


def triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 0.2,
    strategy: str = "semihard",
    squared: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Online-mined triplet loss on a batch.

    embeddings: (B, D) float; half precision is promoted to float32 and autocast is disabled
    inside, because the distance expansion cancels catastrophically in fp16/bf16.
    labels: (B,) integer class ids.

    Returns (loss, stats): `loss` is a scalar tensor; `stats` holds detached Python numbers:
    `loss`, `active_fraction` (fraction of the averaged terms — pairs, or triplets for "all" —
    with a positive loss) and `num_pairs` (anchor-positive pairs that have a negative).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"expected embeddings (B, D) and labels (B,), got {tuple(embeddings.shape)} "
            f"and {tuple(labels.shape)}"
        )
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        emb = embeddings
        if emb.dtype in (torch.float16, torch.bfloat16):
            emb = emb.float()
        return _triplet_loss(emb, labels.to(emb.device), margin, strategy, squared)


def _triplet_loss(emb, labels, margin, strategy, squared):
    terms = _anchor_terms(emb, labels, slice(0, emb.shape[0]), margin, strategy, squared)
    if terms.count == 0:
        return _zero_loss(emb)
    loss = terms.total / terms.count
    stats = {
        "loss": float(loss.detach()),
        "active_fraction": terms.active / terms.count,
        "num_pairs": terms.pairs,
    }
    return loss, stats


class _Terms(NamedTuple):
    """Un-normalised loss of some anchors: the loss is ``total / count`` over all anchors."""

    total: torch.Tensor  # scalar, differentiable: sum of relu(d_ap - d_an + margin)
    count: int  # averaged terms: pairs (semihard, hard) or triplets (all)
    active: int  # terms with a positive loss
    pairs: int  # anchor-positive pairs that have a negative


def _anchor_terms(emb, labels, rows: slice, margin, strategy, squared) -> _Terms:
    """The loss terms of the anchors ``rows``, positives and negatives taken from all of `emb`.

    emb (B, D) float32, labels (B,). Work and memory are O(b * B) for b = |rows| anchors:
    a rank mining only its own anchors of a gathered global batch pays 1 / W of the whole.
    """
    b, B = rows.stop - rows.start, emb.shape[0]
    if strategy == "all":
        return _all_triplet_terms(emb, labels, rows, margin, squared)
    # A small whole batch: one dense (B, B) matrix serves mining and the gradient (few,
    # BLAS-bound kernels). Otherwise mine block by block and differentiate only the chosen
    # pairs; always for a subset of anchors (b < B), where a dense (b, B) matrix's backward
    # costs a full (B, D) product: the pair path was 1.1-2.4x faster there (B = 128-16,384).
    whole = b == B and B * B <= _DENSE_MAX_ELEMENTS
    dense = row_distances(emb, rows, squared=squared) if whole else None
    anchor, positive, negative = _mine(  # (N,) each, indices into emb
        emb.detach(), labels, strategy, squared, dense=None if dense is None else dense.detach(), rows=rows
    )
    num_pairs = anchor.numel()
    if num_pairs == 0:
        return _Terms(emb.sum() * 0.0, 0, 0, 0)
    if dense is not None:
        local = anchor - rows.start
        d_ap, d_an = dense[local, positive], dense[local, negative]  # (N,) each
    else:  # one call for both sides: d_ap = d[:N], d_an = d[N:], exact values and gradients
        d = pair_distances(emb, torch.cat([anchor, anchor]), torch.cat([positive, negative]), squared)
        d_ap, d_an = d[:num_pairs], d[num_pairs:]
    terms = F.relu(d_ap - d_an + margin)  # (N,)
    return _Terms(terms.sum(), num_pairs, int((terms.detach() > 0).sum()), num_pairs)


def _all_triplet_terms(emb, labels, rows, margin, squared) -> _Terms:
    B = emb.shape[0]
    dist_ = row_distances(emb, rows, squared=squared)  # (b, B)
    own = torch.arange(rows.start, rows.stop, device=emb.device)
    same = labels[rows, None] == labels[None, :]  # (b, B)
    self_mask = own[:, None] == torch.arange(B, device=emb.device)[None, :]  # (b, B)
    neg_mask = ~same  # (b, B)
    # Anchors without any negative cannot form a triplet: ignore their pairs.
    pos_mask = same & ~self_mask & neg_mask.any(dim=1)[:, None]  # (b, B)
    num_pairs = int(pos_mask.sum())
    if num_pairs == 0:
        return _Terms(emb.sum() * 0.0, 0, 0, 0)
    return _all_triplets(dist_, pos_mask, neg_mask, margin, num_pairs)


# --------------------------------------------------------------------------------------
# Mining without a B x B x B (or even a full B x B) tensor
# --------------------------------------------------------------------------------------

# Anchors are mined a block of rows at a time; a block's largest temporary has about this
# many elements (block rows x B, or block rows x positives x B for the scan). On CPU, 2^19
# (2 MB) balances speed and memory (toolkit bench mining, B = 2048, with the peak RSS growth
# measured from a reset high-water mark: 2^20 took 38 ms and 45 MB, 2^19 53 ms and 26 MB;
# B = 4096: 142 vs 136 ms). GPUs get 32x larger blocks (2^24 elements), since there every
# block costs a dozen kernel launches.
_BLOCK_ELEMENTS = 1 << 19
_GPU_BLOCK_FACTOR = 32
# Batches with B * B up to this (B <= 512) use one dense, differentiable (B, B) distance
# matrix: measured faster than the pair path up to B = 320-640 on 2 cores (K = 4 and 16),
# slower from B = 1024 on (53 vs 29 ms at B = 1024, K = 4).
_DENSE_MAX_ELEMENTS = 1 << 18
# pair_distances works on this many (pair, dimension) elements at a time.
_PAIR_CHUNK_ELEMENTS = 1 << 18
# Semi-hard by scanning: one (rows, positives, B) comparison, linear in the positives per
# anchor (K - 1 in P x K batches). Above this many positives, a per-row sort is cheaper.
_SCAN_MAX_POSITIVES = 16


def _positive_table(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every anchor's positives, padded: (B, M - 1) column indices and (B, M - 1) validity.

    M is the largest class size. Row a lists the other members of a's class, then padding
    (`ok` False). O(B * M) work and memory, no B x B mask.
    """
    B = labels.shape[0]
    device = labels.device
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    M = int(counts.max())
    order = torch.argsort(inverse, stable=True)  # sample indices grouped by class
    starts = torch.cumsum(counts, 0) - counts  # (C,) first position of each class in `order`
    slot = torch.arange(M, device=device)  # (M,)
    member_ok = slot[None, :] < counts[:, None]  # (C, M)
    members = order[(starts[:, None] + slot[None, :]).clamp_max(B - 1)]  # (C, M)
    cols = members[inverse]  # (B, M): a's class, a itself included
    ok = member_ok[inverse] & (cols != torch.arange(B, device=device)[:, None])  # (B, M)
    # Move a itself and the padding to the end of each row and drop one column (a itself).
    keep = torch.argsort((~ok).to(torch.uint8), dim=1, stable=True)[:, : M - 1]  # (B, M - 1)
    return cols.gather(1, keep), ok.gather(1, keep)


def _row_positive_table(labels: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_positive_table` for the anchors ``rows`` only: (b, M) columns and validity.

    From the (b, B) same-label mask, O(b * B) with no sort: what a rank mining its own
    b = B / W anchors pays (M: the largest positive count among them).
    """
    own = torch.arange(rows.start, rows.stop, device=labels.device)
    same = labels[rows, None] == labels[None, :]  # (b, B)
    same[torch.arange(own.shape[0], device=labels.device), own] = False  # not oneself
    counts = same.sum(dim=1)  # (b,)
    M = int(counts.max()) if counts.numel() else 0
    if M == 0:
        empty = torch.zeros((own.shape[0], 0), dtype=torch.long, device=labels.device)
        return empty, empty.bool()
    r, c = same.nonzero(as_tuple=True)  # row-major: each row's positives in column order
    slot = torch.arange(r.shape[0], device=labels.device) - (torch.cumsum(counts, 0) - counts)[r]  # rank in its row
    cols = torch.zeros((own.shape[0], M), dtype=torch.long, device=labels.device)
    cols[r, slot] = c
    ok = torch.arange(M, device=labels.device)[None, :] < counts[:, None]  # (b, M)
    return cols, ok


def _block_distances(emb: torch.Tensor, sq_norm: torch.Tensor, rows: slice, squared: bool) -> torch.Tensor:
    """Distances from the anchors `rows` to every sample, (rows, B), ||a||^2+||b||^2-2ab form."""
    block = emb[rows]  # (c, D)
    sq = (sq_norm[rows, None] + sq_norm[None, :] - 2.0 * (block @ emb.T)).clamp_min_(0.0)  # (c, B)
    idx = torch.arange(rows.start, rows.start + block.shape[0], device=emb.device)
    sq[torch.arange(block.shape[0], device=emb.device), idx] = 0.0  # exact zero to oneself
    return sq if squared else sq.sqrt_()


@torch.no_grad()
def _mine(emb, labels, strategy, squared, dense=None, rows: slice | None = None):
    """(anchor, positive, negative) index lists, one triplet per anchor-positive pair.

    Anchors are ``rows`` (default: every row); positives and negatives come from all of
    `emb` (B, D). Decisions are discrete and made on detached distances, a block of anchors
    at a time (rows of ``dense`` (|rows|, B) when given, else computed per block); anchors
    without a negative are dropped (they form no triplet).
    """
    B = emb.shape[0]
    rows = slice(0, B) if rows is None else rows
    if rows.stop - rows.start < B:  # a share of the anchors (own-anchor mining): only their rows
        cols, ok = _row_positive_table(labels, rows)  # (b, M)
    else:
        cols, ok = _positive_table(labels)  # (B, M), M = largest class size - 1
    b, M = cols.shape
    if M == 0:  # every class is a singleton: no anchor-positive pair
        return cols.new_empty(0), cols.new_empty(0), cols.new_empty(0)
    sq_norm = torch.linalg.vector_norm(emb, dim=1).square_() if dense is None else None  # (B,), for _block_distances
    scan = strategy == "semihard" and M <= _SCAN_MAX_POSITIVES
    per_row = B * (M if scan else 1)
    budget = _BLOCK_ELEMENTS * (_GPU_BLOCK_FACTOR if emb.device.type == "cuda" else 1)
    block = max(1, budget // per_row)
    neg_cols = torch.empty_like(cols)  # (b, M)
    inf = float("inf")
    for start in range(0, b, block):
        local = slice(start, min(b, start + block))  # block rows among the anchors
        glob = slice(rows.start + local.start, rows.start + local.stop)  # the same rows of emb
        d = dense[local] if dense is not None else _block_distances(emb, sq_norm, glob, squared)  # (c, B)
        not_neg = labels[glob, None] == labels[None, :]  # (c, B)
        neg_d = d.masked_fill(not_neg, inf)  # (c, B): non-negatives pushed to +inf
        if strategy == "hard":  # the closest negative, for every pair of the anchor
            neg_cols[local] = neg_d.argmin(dim=1, keepdim=True)
            continue
        d_ap = d.gather(1, cols[local])  # (c, M)
        if scan:
            # The semi-hard negative of (a, p) is argmin over n of d(a, n) subject to
            # d(a, n) > d(a, p). With t = d(a, p), 1 / (t - d(a, n)) is negative exactly for
            # the strictly farther negatives, and smallest for the nearest of them; ties
            # (t - d = +0) give +inf and non-negatives (d = +inf) give -0.0, so neither is
            # ever picked while a semi-hard negative exists. Two passes, no mask, no sort.
            key = torch.sub(d_ap[:, :, None], neg_d[:, None, :]).reciprocal_()  # (c, M, B)
            value, col = key.min(dim=2)  # (c, M)
            found = value < 0
        else:
            # Sorted negatives per row; the first strictly farther than d(a, p), by bisection.
            sorted_d, order = neg_d.sort(dim=1)  # (c, B), (c, B)
            first = torch.searchsorted(sorted_d, d_ap.contiguous(), right=True)  # (c, M)
            num_neg = B - not_neg.sum(dim=1, keepdim=True)  # (c, 1)
            found = first < num_neg
            col = order.gather(1, first.clamp_max(B - 1))
        if not bool(found.all()):  # no negative strictly farther than the positive: the farthest one
            farthest = d.masked_fill(not_neg, -inf).argmax(dim=1, keepdim=True)  # (c, 1)
            col = torch.where(found, col, farthest)
        neg_cols[local] = col
    # an anchor has a negative unless its class is the whole batch (its positives + itself)
    has_neg = ok.sum(dim=1) + 1 < B  # (b,)
    keep = (ok & has_neg[:, None]).flatten().nonzero().squeeze(1)  # kept (anchor, slot)s, row-major, found once
    return keep // M + rows.start, cols.flatten()[keep], neg_cols.flatten()[keep]


class _PairDistance(torch.autograd.Function):
    """||e_i - e_j|| (or its square) for index lists i, j: (N,) from (B, D).

    Computed from the difference vectors a chunk at a time and differentiated by hand, so
    neither pass keeps an (N, D) tensor: memory is O(N + chunk * D) whatever N is. The
    gradient of the unsquared distance at d = 0 is taken as 0 (the subgradient at the kink).
    """

    @staticmethod
    def forward(ctx, emb, i, j, squared):
        out = torch.empty(i.shape[0], dtype=emb.dtype, device=emb.device)
        step = _pair_chunk(emb)
        for s in range(0, i.shape[0], step):
            out[s : s + step] = (emb.index_select(0, i[s : s + step]) - emb.index_select(0, j[s : s + step])).pow(2).sum(dim=1)
        if not squared:
            out = out.sqrt_()
        ctx.save_for_backward(emb, i, j, out)
        ctx.squared = squared
        return out

    @staticmethod
    def backward(ctx, grad_out):
        emb, i, j, out = ctx.saved_tensors
        # d(||x||^2)/dx = 2x;  d(||x||)/dx = x / ||x|| (0 where ||x|| = 0), x = e_i - e_j
        if ctx.squared:
            scale = 2.0 * grad_out
        else:
            scale = torch.where(out > 0, grad_out / out.masked_fill(out == 0, 1.0), 0.0)
        grad = torch.zeros_like(emb)
        step = _pair_chunk(emb)
        for s in range(0, i.shape[0], step):
            ii, jj = i[s : s + step], j[s : s + step]
            g = (emb.index_select(0, ii) - emb.index_select(0, jj)) * scale[s : s + step, None]  # (chunk, D)
            grad.index_add_(0, ii, g)
            grad.index_add_(0, jj, -g)
        return grad, None, None, None


def _pair_chunk(emb: torch.Tensor) -> int:
    return max(1, _PAIR_CHUNK_ELEMENTS // max(1, emb.shape[1]))


def pair_distances(emb: torch.Tensor, i: torch.Tensor, j: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Differentiable d(emb[i], emb[j]) for (N,) index lists i and j, in O(N) extra memory."""
    return _PairDistance.apply(emb, i, j, squared)


def _all_triplets(dist_, pos_mask, neg_mask, margin, num_pairs) -> _Terms:
    """Sum of relu(d_ap - d_an + margin) over all valid triplets, in O(b * B) memory.

    dist_, pos_mask, neg_mask: (b, B), the anchors' rows. relu is piecewise linear, so with
    active = (d_ap - d_an + margin > 0):
        sum_active (d_ap - d_an + margin)
          = sum_{a,p} w_pos[a,p] d_ap - sum_{a,n} w_neg[a,n] d_an + margin * n_active
    where w_pos[a,p] = #active n for (a,p) and w_neg[a,n] = #active p for (a,n). The weights
    are counted without grad, a chunk of anchors at a time; the loss is then a weighted sum
    of `dist_` with the exact value and gradient, and autograd keeps no B^3 tensor.
    """
    b, B = dist_.shape
    d = dist_.detach()
    w_pos = torch.zeros_like(d)  # (b, B)
    w_neg = torch.zeros_like(d)  # (b, B)
    n_triplets = 0
    n_active = 0
    chunk = max(1, _ALL_CHUNK_ELEMENTS // (B * B))
    for start in range(0, b, chunk):
        rows = slice(start, start + chunk)
        da = d[rows]  # (c, B)
        valid = pos_mask[rows][:, :, None] & neg_mask[rows][:, None, :]  # (c, B, B) [a, p, n]
        active = valid & (da[:, :, None] - da[:, None, :] + margin > 0)  # (c, B, B)
        w_pos[rows] = active.sum(dim=2).to(d.dtype)  # (c, B) over n
        w_neg[rows] = active.sum(dim=1).to(d.dtype)  # (c, B) over p
        n_triplets += int(valid.sum())
        n_active += int(active.sum())
    total = ((w_pos - w_neg) * dist_).sum() + margin * n_active
    return _Terms(total, n_triplets, n_active, num_pairs)


# --------------------------------------------------------------------------------------
# Cross-process mining
# --------------------------------------------------------------------------------------


def _check_equal_batch(local: torch.Tensor, world_size: int) -> None:
    # all_gather needs equal shapes; a mismatch would crash or hang inside the collective.
    # Every rank sees the same list of sizes, so every rank raises together (no hang).
    size = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    sizes = [torch.empty_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(
            f"cross-process triplet mining needs the same local batch size on every rank, "
            f"got {sizes}; drop the last incomplete batch or resample so ranks stay equal"
        )


def _all_gather_cat(local: torch.Tensor, keep_grad: bool) -> torch.Tensor:
    rank, world_size = world()
    if world_size == 1:
        return local
    _check_equal_batch(local, world_size)
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local.detach().contiguous())  # no autograd through the collective
    if keep_grad:
        parts[rank] = local  # own slice back in place, carrying this rank's graph
    return torch.cat(parts, dim=0)  # (W * B, ...)


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """All-gather (B, D) -> (W * B, D), rank-major; only this rank's slice has a gradient.

    The other slices are constants here: their gradients are computed by their own ranks,
    which is right when every rank computes the *same* loss on the whole gathered batch
    (``distributed_triplet_loss(..., anchors="all")``). Returns `local` unchanged without
    distributed / W == 1.
    """
    return _all_gather_cat(local, keep_grad=True)


class _GatherSumGrad(torch.autograd.Function):
    """All-gather (B, D) -> (W * B, D) whose backward sums every rank's gradient of the result.

    For ranks that each compute a *different* part L_r of the loss (their own anchors) on the
    gathered batch: dL/de_r = sum_s dL_s/dE[r's slice], so backward all-reduces the (W * B, D)
    gradient and returns this rank's slice. One all-reduce per step, of the same size as the
    forward's all-gather (gloo has no reduce-scatter).
    """

    @staticmethod
    def forward(ctx, local):
        rank, world_size = world()
        ctx.rank, ctx.b = rank, local.shape[0]
        parts = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum over ranks
        return grad[ctx.rank * ctx.b : (ctx.rank + 1) * ctx.b]


def gather_sum_grad(local: torch.Tensor) -> torch.Tensor:
    """All-gather (B, D) -> (W * B, D) with a gradient to every slice, summed over ranks.

    Every rank must call backward through the result (the backward is a collective).
    Returns `local` unchanged without distributed / W == 1.
    """
    _, world_size = world()
    if world_size == 1:
        return local
    _check_equal_batch(local, world_size)
    return _GatherSumGrad.apply(local)


def gather_labels(labels: torch.Tensor) -> torch.Tensor:
    """All-gather (B,) -> (W * B,) labels, in the same rank-major order as `gather_with_grad`."""
    return _all_gather_cat(labels, keep_grad=False)


ANCHORS = ("own", "all")


def distributed_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 0.2,
    strategy: str = "semihard",
    squared: bool = False,
    anchors: str = "own",
) -> tuple[torch.Tensor, dict]:
    """Triplet loss mined over the global batch of all ranks; gradient-exact under DDP.

    Returns (loss_for_backward, stats); stats["loss"] is the global-batch loss (the same
    number on every rank, for logging); loss_for_backward is what this rank backpropagates.

    anchors="own" (default): each rank mines only its own B anchors against the gathered
    W * B embeddings (positives and negatives from every rank), O(B * W * B) per rank instead
    of O((W * B)^2). Its terms are summed and divided by the *global* number of terms (one
    small all-reduce), so the ranks' parts add up to the loss L of the concatenated batch:
    L = sum_r L_r. Remote positives and negatives get gradients too: the gather's backward
    all-reduces dL_r/dE, so rank r's embeddings receive dL/de_r = sum_s dL_s/de_r.

    anchors="all": every rank mines the whole global batch and computes the same L; only its
    own slice is in its graph (the remote ones are constants), giving g_r = dL/de_r . de_r/dθ.
    Simpler, and W times the mining work (kept for comparison: ``toolkit bench mining``).

    Why x W, either way. Rank r's parameter gradient is g_r = dL/de_r . de_r/dθ, and by the
    chain rule sum_r g_r = dL/dθ, the gradient of one process on the concatenated batch. DDP
    (or an all_reduce-mean of grads) averages: (1/W) sum_r g_r. Scaling each rank's loss by W
    turns that average into the sum, i.e. exactly the single-process gradient.
    Requires equal local batch sizes (checked; raises ValueError otherwise).
    """
    if anchors not in ANCHORS:
        raise ValueError(f"unknown anchors {anchors!r}; expected one of {ANCHORS}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    rank, world_size = world()
    if anchors == "all" or world_size == 1:
        all_emb = gather_with_grad(embeddings)  # (W * B, D)
        all_labels = gather_labels(labels.to(embeddings.device))  # (W * B,)
        loss, stats = triplet_loss(all_emb, all_labels, margin=margin, strategy=strategy, squared=squared)
        return loss * world_size, stats
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        emb = embeddings.float() if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings
        all_emb = gather_sum_grad(emb)  # (W * B, D), every slice differentiable
        all_labels = gather_labels(labels.to(emb.device))  # (W * B,)
        b = emb.shape[0]
        return own_anchor_loss(all_emb, all_labels, slice(rank * b, (rank + 1) * b), margin=margin,
                               strategy=strategy, squared=squared)


def own_anchor_loss(all_emb, all_labels, own: slice, *, margin=0.2, strategy="semihard", squared=False):
    """This rank's part of the global loss: anchors ``own`` of the gathered batch (W * B, D).

    Returns (loss_for_backward, stats) as :func:`distributed_triplet_loss` does; makes one
    all-reduce of four numbers (the global sum, terms, active terms and pairs).
    """
    _, world_size = world()
    terms = _anchor_terms(all_emb, all_labels, own, margin, strategy, squared)
    # float64 keeps the counts exact up to 2^53
    sums = torch.tensor([float(terms.total.detach()), terms.count, terms.active, terms.pairs],
                        dtype=torch.float64, device=all_emb.device)
    if world_size > 1:
        dist.all_reduce(sums)
    total, count, active, pairs = sums.tolist()
    if count == 0:
        loss = all_emb.sum() * 0.0  # through the gather: every rank's backward meets the collective
        return loss, {"loss": 0.0, "active_fraction": 0.0, "num_pairs": 0}
    share = terms.total / count  # this rank's share L_r of the global loss L
    # The value is W * L on every rank (what is logged and checked for NaN, so every rank
    # decides alike); the gradient is that of W * L_r, this rank's part.
    rest = total / count - float(share.detach())  # L - L_r, a constant
    stats = {"loss": total / count, "active_fraction": active / count, "num_pairs": int(pairs)}
    return (share + rest) * world_size, stats
