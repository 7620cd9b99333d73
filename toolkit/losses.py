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
    sq_norm = emb.pow(2).sum(dim=1)  # (B,)
    sq = sq_norm[:, None] + sq_norm[None, :] - 2.0 * (emb @ emb.T)  # (B, B)
    sq = sq.clamp_min(0.0)
    eye = torch.eye(emb.shape[0], dtype=torch.bool, device=emb.device)
    sq = sq.masked_fill(eye, 0.0)
    if squared:
        return sq
    # d sqrt(x)/dx is infinite at x = 0, and 0 (unused entry) * inf = NaN in backward.
    # Feed sqrt a harmless 1 where the distance is zero and zero those entries afterwards:
    # masked_fill blocks the gradient on both sides, so no NaN reaches `emb`.
    zero = sq == 0  # (B, B)
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
    if strategy == "all":
        return _all_triplet_loss(emb, labels, margin, squared)
    B = emb.shape[0]
    # Small batches: one dense (B, B) matrix serves mining and the gradient (few, BLAS-bound
    # kernels). Large ones: mine block by block and differentiate only the chosen pairs.
    dense = pairwise_distances(emb, squared=squared) if B * B <= _DENSE_MAX_ELEMENTS else None
    mined = _mine(emb.detach(), labels, strategy, squared, dense=None if dense is None else dense.detach())
    anchor, positive, negative = mined  # (N,) each
    num_pairs = anchor.numel()
    if num_pairs == 0:
        return _zero_loss(emb)
    if dense is not None:
        d_ap, d_an = dense[anchor, positive], dense[anchor, negative]  # (N,) each
    else:  # one call for both sides: d_ap = d[:N], d_an = d[N:], exact values and gradients
        d = pair_distances(emb, torch.cat([anchor, anchor]), torch.cat([positive, negative]), squared)
        d_ap, d_an = d[:num_pairs], d[num_pairs:]
    terms = F.relu(d_ap - d_an + margin)  # (N,)
    loss = terms.mean()
    stats = {
        "loss": float(loss.detach()),
        "active_fraction": float((terms.detach() > 0).float().mean()),
        "num_pairs": num_pairs,
    }
    return loss, stats


def _all_triplet_loss(emb, labels, margin, squared):
    B = emb.shape[0]
    dist_ = pairwise_distances(emb, squared=squared)  # (B, B)
    same = labels[:, None] == labels[None, :]  # (B, B)
    eye = torch.eye(B, dtype=torch.bool, device=emb.device)
    neg_mask = ~same  # (B, B)
    # Anchors without any negative cannot form a triplet: ignore their pairs.
    pos_mask = same & ~eye & neg_mask.any(dim=1)[:, None]  # (B, B)
    num_pairs = int(pos_mask.sum())
    if num_pairs == 0:
        return _zero_loss(emb)
    return _all_triplets(dist_, pos_mask, neg_mask, margin, num_pairs)


# --------------------------------------------------------------------------------------
# Mining without a B x B x B (or even a full B x B) tensor
# --------------------------------------------------------------------------------------

# Anchors are mined a block of rows at a time; a block's largest temporary has about this
# many elements (block rows x B, or block rows x positives x B for the scan). On CPU, 2^20
# (4 MB) balances speed and memory (toolkit bench mining, B = 2048: 68 ms with 2^21,
# 78 ms with 2^20, 104 ms with 2^19; peak 31, 11, 2 MB). GPUs get 16x larger blocks, since
# there every block costs a dozen kernel launches.
_BLOCK_ELEMENTS = 1 << 20
_GPU_BLOCK_FACTOR = 16
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


def _block_distances(emb: torch.Tensor, sq_norm: torch.Tensor, rows: slice, squared: bool) -> torch.Tensor:
    """Distances from the anchors `rows` to every sample, (rows, B), ||a||^2+||b||^2-2ab form."""
    block = emb[rows]  # (c, D)
    sq = (sq_norm[rows, None] + sq_norm[None, :] - 2.0 * (block @ emb.T)).clamp_min_(0.0)  # (c, B)
    idx = torch.arange(rows.start, rows.start + block.shape[0], device=emb.device)
    sq[torch.arange(block.shape[0], device=emb.device), idx] = 0.0  # exact zero to oneself
    return sq if squared else sq.sqrt_()


@torch.no_grad()
def _mine(emb, labels, strategy, squared, dense=None):
    """(anchor, positive, negative) index lists, one triplet per anchor-positive pair.

    Decisions are discrete and made on detached distances, a block of anchors at a time
    (rows of ``dense`` (B, B) when given, else computed per block); anchors without a
    negative are dropped (they form no triplet).
    """
    B = emb.shape[0]
    cols, ok = _positive_table(labels)  # (B, M), M = largest class size - 1
    M = cols.shape[1]
    if M == 0:  # every class is a singleton: no anchor-positive pair
        return cols.new_empty(0), cols.new_empty(0), cols.new_empty(0)
    sq_norm = emb.pow(2).sum(dim=1) if dense is None else None  # (B,), for _block_distances
    scan = strategy == "semihard" and M <= _SCAN_MAX_POSITIVES
    per_row = B * (M if scan else 1)
    budget = _BLOCK_ELEMENTS * (_GPU_BLOCK_FACTOR if emb.device.type == "cuda" else 1)
    block = max(1, budget // per_row)
    neg_cols = torch.empty_like(cols)  # (B, M)
    has_neg = torch.empty(B, dtype=torch.bool, device=emb.device)
    inf = float("inf")
    for start in range(0, B, block):
        rows = slice(start, min(B, start + block))
        d = dense[rows] if dense is not None else _block_distances(emb, sq_norm, rows, squared)  # (c, B)
        is_neg = labels[rows, None] != labels[None, :]  # (c, B)
        has_neg[rows] = is_neg.any(dim=1)
        neg_d = d.masked_fill(~is_neg, inf)  # (c, B): non-negatives pushed to +inf
        if strategy == "hard":  # the closest negative, for every pair of the anchor
            neg_cols[rows] = neg_d.argmin(dim=1, keepdim=True)
            continue
        d_ap = d.gather(1, cols[rows])  # (c, M)
        # Fallback when no negative is strictly farther than the positive: the farthest one.
        farthest = d.masked_fill(~is_neg, -inf).argmax(dim=1, keepdim=True)  # (c, 1)
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
            num_neg = is_neg.sum(dim=1, keepdim=True)  # (c, 1)
            found = first < num_neg
            col = order.gather(1, first.clamp_max(B - 1))
        neg_cols[rows] = torch.where(found, col, farthest)
    keep = ok & has_neg[:, None]  # (B, M)
    anchor = torch.arange(B, device=emb.device)[:, None].expand_as(cols)[keep]
    return anchor, cols[keep], neg_cols[keep]


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
            out[s : s + step] = (emb[i[s : s + step]] - emb[j[s : s + step]]).pow(2).sum(dim=1)
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
            g = (emb[ii] - emb[jj]) * scale[s : s + step, None]  # (chunk, D)
            grad.index_add_(0, ii, g)
            grad.index_add_(0, jj, -g)
        return grad, None, None, None


def _pair_chunk(emb: torch.Tensor) -> int:
    return max(1, _PAIR_CHUNK_ELEMENTS // max(1, emb.shape[1]))


def pair_distances(emb: torch.Tensor, i: torch.Tensor, j: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Differentiable d(emb[i], emb[j]) for (N,) index lists i and j, in O(N) extra memory."""
    return _PairDistance.apply(emb, i, j, squared)


def _all_triplets(dist_, pos_mask, neg_mask, margin, num_pairs):
    """Mean of relu(d_ap - d_an + margin) over all valid triplets, in O(B^2) memory.

    relu is piecewise linear, so with active = (d_ap - d_an + margin > 0):
        sum_active (d_ap - d_an + margin)
          = sum_{a,p} w_pos[a,p] d_ap - sum_{a,n} w_neg[a,n] d_an + margin * n_active
    where w_pos[a,p] = #active n for (a,p) and w_neg[a,n] = #active p for (a,n). The weights
    are counted without grad, a chunk of anchors at a time; the loss is then a weighted sum
    of `dist_` (B, B) with the exact value and gradient, and autograd keeps no B^3 tensor.
    """
    B = dist_.shape[0]
    d = dist_.detach()
    w_pos = torch.zeros_like(d)  # (B, B)
    w_neg = torch.zeros_like(d)  # (B, B)
    n_triplets = 0
    n_active = 0
    chunk = max(1, _ALL_CHUNK_ELEMENTS // (B * B))
    for start in range(0, B, chunk):
        rows = slice(start, start + chunk)
        da = d[rows]  # (c, B)
        valid = pos_mask[rows][:, :, None] & neg_mask[rows][:, None, :]  # (c, B, B) [a, p, n]
        active = valid & (da[:, :, None] - da[:, None, :] + margin > 0)  # (c, B, B)
        w_pos[rows] = active.sum(dim=2).to(d.dtype)  # (c, B) over n
        w_neg[rows] = active.sum(dim=1).to(d.dtype)  # (c, B) over p
        n_triplets += int(valid.sum())
        n_active += int(active.sum())
    loss = (((w_pos - w_neg) * dist_).sum() + margin * n_active) / n_triplets
    stats = {
        "loss": float(loss.detach()),
        "active_fraction": n_active / n_triplets,
        "num_pairs": num_pairs,
    }
    return loss, stats


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

    The other slices are constants here: their gradients are computed by their own ranks
    (see `distributed_triplet_loss`). Returns `local` unchanged without distributed / W == 1.
    """
    return _all_gather_cat(local, keep_grad=True)


def gather_labels(labels: torch.Tensor) -> torch.Tensor:
    """All-gather (B,) -> (W * B,) labels, in the same rank-major order as `gather_with_grad`."""
    return _all_gather_cat(labels, keep_grad=False)


def distributed_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 0.2,
    strategy: str = "semihard",
    squared: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Triplet loss mined over the global batch of all ranks; gradient-exact under DDP.

    Returns (loss_for_backward, stats); stats["loss"] is the global-batch loss (the same
    number on every rank, for logging); loss_for_backward = world_size * global loss.

    Why x W. Let L(e_1, ..., e_W) be the loss on the concatenated batch, e_r = f(x_r; theta)
    rank r's embeddings. Every rank computes the same L, but only its own slice e_r is in
    its graph, so backward on rank r yields g_r = dL/de_r . de_r/dtheta. By the chain rule,
    sum_r g_r = dL/dtheta, the gradient of one process on the concatenated batch. DDP (or a
    manual all_reduce-mean of grads) averages: (1/W) sum_r g_r. Scaling each rank's loss by
    W turns that average into the sum, i.e. exactly the single-process gradient.
    Requires equal local batch sizes (checked; raises ValueError otherwise).
    """
    _, world_size = world()
    all_emb = gather_with_grad(embeddings)  # (W * B, D)
    all_labels = gather_labels(labels.to(embeddings.device))  # (W * B,)
    loss, stats = triplet_loss(
        all_emb, all_labels, margin=margin, strategy=strategy, squared=squared
    )
    return loss * world_size, stats
