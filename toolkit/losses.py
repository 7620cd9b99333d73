"""Triplet losses with online mining in O(B^2) memory, and gradient-exact cross-process mining.

Notation: B embeddings of dimension D, distance matrix `dist` (B, B), `dist[a, p]` the
anchor-positive distance, `dist[a, n]` the anchor-negative distance.

Strategies (every one averages over anchor-positive pairs (a, p), a != p, same label, whose
anchor has at least one negative; "all" averages over triplets instead):

- "semihard" (FaceNet / TF-Addons): n = the negative with the smallest d(a, n) strictly
  greater than d(a, p); when no such negative exists, the farthest negative of a.
- "hard": n = the closest negative of a (batch-hard, but one term per pair).
- "all": every valid triplet (a, p, n).

term = relu(d(a, p) - d(a, n) + margin). No B x B x B tensor is ever materialised.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

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
    B = emb.shape[0]
    dist_ = pairwise_distances(emb, squared=squared)  # (B, B)

    same = labels[:, None] == labels[None, :]  # (B, B)
    eye = torch.eye(B, dtype=torch.bool, device=emb.device)
    neg_mask = ~same  # (B, B)
    num_neg = neg_mask.sum(dim=1)  # (B,)
    # Anchors without any negative cannot form a triplet: ignore their pairs.
    pos_mask = same & ~eye & (num_neg > 0)[:, None]  # (B, B)
    num_pairs = int(pos_mask.sum())
    if num_pairs == 0:
        return _zero_loss(emb)

    if strategy == "all":
        return _all_triplets(dist_, pos_mask, neg_mask, margin, num_pairs)

    # Work on each anchor's positives only, padded to the largest count Kp (Kp = K - 1 for
    # P x K batches), so the per-pair tensors are (B, Kp) rather than (B, B).
    kp = int(pos_mask.sum(dim=1).max())
    pos_col = pos_mask.float().topk(kp, dim=1).indices  # (B, Kp) every positive, then padding
    pair_ok = pos_mask.gather(1, pos_col)  # (B, Kp) False on padding
    d_ap = dist_.gather(1, pos_col)  # (B, Kp), differentiable

    # Mining decisions are discrete: make them on detached values; the gradient flows
    # through the `dist_.gather` calls.
    d = dist_.detach()
    neg_d = d.masked_fill(~neg_mask, float("inf"))  # (B, B), non-negatives pushed to +inf
    if strategy == "hard":
        neg_col = neg_d.argmin(dim=1, keepdim=True)  # (B, 1) closest negative per anchor
    else:  # semihard
        # Row a of `sorted_d` lists a's negative distances ascending, then the +inf padding.
        sorted_d, order = neg_d.sort(dim=1)  # (B, B), (B, B)
        # For each (a, p): index of the first negative with d(a, n) > d(a, p) (strictly).
        first_harder = torch.searchsorted(sorted_d, d_ap.detach(), right=True)  # (B, Kp)
        # first_harder == num_neg[a] means no semi-hard negative: fall back to the farthest,
        # which sits at index num_neg[a] - 1 (>= 0 for every anchor kept in pos_mask).
        farthest = (num_neg - 1).clamp_min(0)[:, None]  # (B, 1)
        pick = torch.minimum(first_harder, farthest)  # (B, Kp) position in the sorted row
        neg_col = order.gather(1, pick)  # (B, Kp) column index of the chosen negative
    d_an = dist_.gather(1, neg_col)  # (B, Kp) or (B, 1), differentiable
    terms = F.relu(d_ap - d_an + margin)[pair_ok]  # (num_pairs,)
    loss = terms.mean()
    stats = {
        "loss": float(loss.detach()),
        "active_fraction": float((terms.detach() > 0).float().mean()),
        "num_pairs": num_pairs,
    }
    return loss, stats


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


def _world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
    rank, world_size = _world()
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
    _, world_size = _world()
    all_emb = gather_with_grad(embeddings)  # (W * B, D)
    all_labels = gather_labels(labels.to(embeddings.device))  # (W * B,)
    loss, stats = triplet_loss(
        all_emb, all_labels, margin=margin, strategy=strategy, squared=squared
    )
    return loss * world_size, stats
