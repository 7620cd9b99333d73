"""Triplet losses against a brute-force reference that loops over every (a, p, n) triplet:
values, gradients, stats, both mining paths of semi-hard, dtypes, autocast, empty batches,
and a batch large enough that any B x B x B intermediate would exhaust memory."""
import time

import pytest
import torch
import torch.nn.functional as F

import toolkit.losses as losses_mod
from toolkit.losses import pair_distances, pairwise_distances, triplet_loss

MARGIN = 0.2
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}


# ----------------------------------------------------------------------------------------
# Brute-force reference: the definitions, written as loops
# ----------------------------------------------------------------------------------------


def _direct_dist(emb, i, j, squared):
    """d(emb[i], emb[j]) from the difference vectors, not the ||a||^2+||b||^2-2ab expansion."""
    sq = (emb[i] - emb[j]).pow(2).sum(-1)
    return sq if squared else sq.sqrt()


def reference_triplet_loss(emb, labels, *, margin, strategy, squared):
    """Returns (loss, info). Selection loops over every (a, p, n); the loss is differentiable
    through the direct distances of the chosen triplets (i != j always, so sqrt is safe)."""
    B = emb.shape[0]
    with torch.no_grad():
        idx = torch.arange(B)
        D = _direct_dist(emb, idx[:, None], idx[None, :], squared).tolist()
    lab = labels.tolist()
    triplets, num_pairs, fallbacks = [], 0, 0
    for a in range(B):
        negs = [n for n in range(B) if lab[n] != lab[a]]
        if not negs:
            continue  # an anchor without negatives forms no triplet
        for p in range(B):
            if p == a or lab[p] != lab[a]:
                continue
            num_pairs += 1
            if strategy == "all":
                triplets += [(a, p, n) for n in negs]
            elif strategy == "hard":
                triplets.append((a, p, min(negs, key=lambda n: D[a][n])))
            else:  # semihard
                harder = [n for n in negs if D[a][n] > D[a][p]]
                if harder:
                    n = min(harder, key=lambda n: D[a][n])
                else:
                    n = max(negs, key=lambda n: D[a][n])
                    fallbacks += 1
                triplets.append((a, p, n))
    info = {"num_pairs": num_pairs, "fallbacks": fallbacks}
    if not triplets:
        info["active_fraction"] = 0.0
        return emb.sum() * 0, info
    a, p, n = torch.tensor(triplets).T
    terms = F.relu(_direct_dist(emb, a, p, squared) - _direct_dist(emb, a, n, squared) + margin)
    info["active_fraction"] = (terms > 0).double().mean().item()
    return terms.mean(), info


# ----------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------


def _unit(x):
    return F.normalize(x, dim=1)


def make_batch(layout, dtype, seed=0):
    """(embeddings, labels) with L2-normalised 128-d rows."""
    g = torch.Generator().manual_seed(seed)
    if layout == "pk":  # 8 classes x 4, random directions, shuffled
        labels = torch.arange(8).repeat_interleave(4)
        emb = _unit(torch.randn(32, 128, generator=g, dtype=torch.float64))
        labels = labels[torch.randperm(32, generator=g)]
    elif layout == "all_fallback":
        # Class c sits at +e_c and -e_c (plus a little noise): positives ~2 apart, every
        # negative ~sqrt(2) away, so no negative is ever farther than a positive.
        C = 16
        base = torch.eye(128, dtype=torch.float64)[:C]
        emb = torch.cat([base, -base]) + 0.02 * torch.randn(2 * C, 128, generator=g, dtype=torch.float64)
        emb = _unit(emb)
        labels = torch.arange(C).repeat(2)
    elif layout == "clustered":
        # Unequal classes (incl. a singleton anchor without positives) around noisy centres,
        # plus two outliers mirrored to the far side of their class: pairs inside a cluster
        # find a semi-hard negative, pairs with an outlier fall back to the farthest one.
        sizes = [1, 3, 5, 7, 9, 6]
        labels = torch.cat([torch.full((k,), c) for c, k in enumerate(sizes)])
        centers = _unit(torch.randn(len(sizes), 128, generator=g, dtype=torch.float64))
        emb = _unit(centers[labels] + 0.16 * torch.randn(len(labels), 128, generator=g, dtype=torch.float64))
        emb[[2, 10]] *= -1  # one sample of class 1 and one of class 3
        perm = torch.randperm(len(labels), generator=g)
        emb, labels = emb[perm], labels[perm]
    else:
        raise ValueError(layout)
    return emb.to(dtype), labels


def _compare(layout, dtype, strategy, squared):
    emb, labels = make_batch(layout, dtype)
    x = emb.clone().requires_grad_(True)
    loss, stats = triplet_loss(x, labels, margin=MARGIN, strategy=strategy, squared=squared)
    (grad,) = torch.autograd.grad(loss, x)

    xr = emb.clone().requires_grad_(True)
    ref, info = reference_triplet_loss(xr, labels, margin=MARGIN, strategy=strategy, squared=squared)
    (ref_grad,) = torch.autograd.grad(ref, xr)

    assert loss.dtype == dtype
    assert ref.item() > 0.01  # a non-trivial loss, so the comparison means something
    torch.testing.assert_close(loss, ref, atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=ATOL[dtype], rtol=0)
    assert grad.abs().sum() > 0
    assert stats["num_pairs"] == info["num_pairs"]
    assert stats["active_fraction"] == pytest.approx(info["active_fraction"])
    assert stats["loss"] == pytest.approx(ref.item(), abs=ATOL[dtype])
    return info


# ----------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("layout", ["pk", "all_fallback", "clustered"])
def test_semihard_matches_reference(layout, squared, dtype):
    info = _compare(layout, dtype, "semihard", squared)
    # Each layout must exercise the mining path it was built for.
    if layout == "all_fallback":
        assert info["fallbacks"] == info["num_pairs"] > 0
    else:
        assert 0 < info["fallbacks"] < info["num_pairs"]


@pytest.mark.parametrize("blocks", ["one_block", "small_blocks"])
@pytest.mark.parametrize("search", ["scan", "sort"])
@pytest.mark.parametrize("grad", ["dense", "pairs"])
@pytest.mark.parametrize("layout", ["pk", "all_fallback", "clustered"])
def test_semihard_mining_paths_agree_with_reference(layout, grad, search, blocks, monkeypatch):
    # Defaults: small batches differentiate one dense (B, B) matrix, large ones only the
    # chosen pairs; a class with more than _SCAN_MAX_POSITIVES positives switches from the
    # threshold scan to a per-row sort; anchors are mined a block of rows at a time. Every
    # combination must pick the same triplets, values and gradients as the reference.
    if grad == "pairs":
        monkeypatch.setattr(losses_mod, "_DENSE_MAX_ELEMENTS", 0)
    if search == "sort":
        monkeypatch.setattr(losses_mod, "_SCAN_MAX_POSITIVES", 0)
    if blocks == "small_blocks":
        monkeypatch.setattr(losses_mod, "_BLOCK_ELEMENTS", 100)  # a few rows per block
    _compare(layout, torch.float64, "semihard", squared=False)
    _compare(layout, torch.float32, "semihard", squared=True)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("layout", ["pk", "clustered"])
def test_hard_through_the_pair_path_matches_reference(layout, squared, monkeypatch):
    monkeypatch.setattr(losses_mod, "_DENSE_MAX_ELEMENTS", 0)
    monkeypatch.setattr(losses_mod, "_BLOCK_ELEMENTS", 100)
    _compare(layout, torch.float64, "hard", squared)


@pytest.mark.parametrize("squared", [False, True])
def test_pair_distances_gradient_is_exact_and_finite_at_zero(squared, monkeypatch):
    monkeypatch.setattr(losses_mod, "_PAIR_CHUNK_ELEMENTS", 12)  # several chunks of pairs
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    x[7] = x[2]  # a duplicate row: a zero distance
    i = torch.tensor([0, 1, 2, 3, 4, 5, 6, 8, 0, 3, 1])
    j = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0, 8, 3, 4])  # (3, 3) is a self pair
    nonzero = torch.tensor([k for k in range(len(i)) if {int(i[k]), int(j[k])} not in ({2, 7}, {3})])
    assert torch.autograd.gradcheck(lambda e: pair_distances(e, i[nonzero], j[nonzero], squared), (x.clone().requires_grad_(True),))
    xr = x.clone().requires_grad_(True)
    d = pair_distances(xr, i, j, squared)
    torch.testing.assert_close(d.detach(), _direct_dist(x, i, j, squared), atol=1e-12, rtol=0)
    d.sum().backward()
    assert torch.isfinite(xr.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("strategy", ["hard", "all"])
@pytest.mark.parametrize("layout", ["pk", "clustered"])
def test_hard_and_all_match_reference(layout, strategy, squared, dtype):
    _compare(layout, dtype, strategy, squared)


@pytest.mark.parametrize("grad", ["dense", "pairs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_semihard_needs_strictly_farther_negative(dtype, grad, monkeypatch):
    if grad == "pairs":
        monkeypatch.setattr(losses_mod, "_DENSE_MAX_ELEMENTS", 0)
    # Orthogonal unit vectors give exact ties: d = sqrt(2) for a-p, a-n1, p-n1, p-n2.
    # (a, p): n1 ties, so the semi-hard negative is n2 (d = 2)        -> relu(√2 - 2 + m) = 0
    # (p, a): both negatives tie, none is farther -> farthest (a tie)  -> relu(0 + m) = m
    e = torch.eye(4, dtype=dtype)
    emb = torch.stack([e[0], e[1], e[2], -e[0]])  # a, p, n1, n2
    labels = torch.tensor([0, 0, 1, 2])
    loss, _ = triplet_loss(emb, labels, margin=MARGIN)
    ref, _ = reference_triplet_loss(emb, labels, margin=MARGIN, strategy="semihard", squared=False)
    assert loss.item() == pytest.approx(MARGIN / 2, abs=1e-7)
    assert ref.item() == pytest.approx(MARGIN / 2, abs=1e-7)


def test_strategies_differ_on_the_same_batch():
    # Guards against one strategy silently routing to another.
    emb, labels = make_batch("clustered", torch.float64)
    losses = {s: triplet_loss(emb, labels, strategy=s)[0].item() for s in ["semihard", "hard", "all"]}
    assert len({round(v, 8) for v in losses.values()}) == 3
    assert losses["hard"] > losses["semihard"]


@pytest.mark.parametrize("strategy", ["semihard", "hard", "all"])
@pytest.mark.parametrize("labels", [torch.arange(10), torch.zeros(10, dtype=torch.long)], ids=["distinct", "one_class"])
def test_no_valid_pairs_gives_connected_zero(strategy, labels):
    # distinct labels: no positives; one class: no negatives. Either way: zero, and backward works.
    x = _unit(torch.randn(10, 16)).requires_grad_(True)
    loss, stats = triplet_loss(x, labels, strategy=strategy)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))
    assert stats == {"loss": 0.0, "active_fraction": 0.0, "num_pairs": 0}


def test_pairwise_distances_values_and_finite_grad_at_zero():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 8, generator=g, dtype=torch.float64)
    x[5] = x[3]  # a duplicate row: an off-diagonal zero distance as well
    x.requires_grad_(True)
    d = pairwise_distances(x)
    torch.testing.assert_close(d.detach(), torch.cdist(x.detach(), x.detach()), atol=1e-10, rtol=0)
    assert torch.equal(d.diagonal(), torch.zeros(12, dtype=torch.float64))
    torch.testing.assert_close(pairwise_distances(x, squared=True).detach(), d.detach() ** 2, atol=1e-10, rtol=0)
    d.sum().backward()  # every entry, zeros included, receives an upstream gradient
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("strategy", ["semihard", "hard", "all"])
def test_half_precision_and_autocast_compute_in_float32(strategy):
    emb, labels = make_batch("pk", torch.float32)
    expected, _ = triplet_loss(emb.bfloat16().float(), labels, strategy=strategy)
    loss, _ = triplet_loss(emb.bfloat16(), labels, strategy=strategy)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)

    # Autocast must not push the distance matmul into bf16 (it would be visibly off).
    plain, _ = triplet_loss(emb, labels, strategy=strategy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast, _ = triplet_loss(emb, labels, strategy=strategy)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, atol=1e-6, rtol=0)


def test_rejects_bad_arguments():
    emb, labels = make_batch("pk", torch.float32)
    with pytest.raises(ValueError, match="strategy"):
        triplet_loss(emb, labels, strategy="easy")
    with pytest.raises(ValueError, match="labels"):
        triplet_loss(emb, labels[:-1])


def test_semihard_scales_quadratically_not_cubically():
    # B = 4096: a B^3 float32 intermediate would be 275 GB and crash; O(B^2) runs in seconds.
    B = 4096
    g = torch.Generator().manual_seed(2)
    x = _unit(torch.randn(B, 128, generator=g)).requires_grad_(True)
    labels = torch.arange(B // 8).repeat_interleave(8)  # P x K = 512 x 8
    start = time.perf_counter()
    loss, stats = triplet_loss(x, labels, strategy="semihard")
    loss.backward()
    elapsed = time.perf_counter() - start
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(x.grad).all()
    assert stats["num_pairs"] == B * 7
    assert elapsed < 60, f"B={B} semi-hard took {elapsed:.1f}s"


@pytest.mark.parametrize("strategy", ["hard", "all"])
def test_hard_and_all_run_on_larger_batches(strategy):
    B = 2048 if strategy == "hard" else 256  # "all" is O(B^3) time (in O(B^2) memory)
    g = torch.Generator().manual_seed(3)
    x = _unit(torch.randn(B, 64, generator=g)).requires_grad_(True)
    labels = torch.arange(B // 8).repeat_interleave(8)
    loss, _ = triplet_loss(x, labels, strategy=strategy)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("classes", ["random", "large", "singletons"])
@pytest.mark.parametrize("strategy", ["semihard", "hard", "all"])
@pytest.mark.parametrize("shares", [2, 3, 8])
def test_anchor_shares_add_up_to_the_whole_batch_loss_and_gradient(strategy, shares, classes):
    """What W ranks mining only their own anchors compute (toolkit.losses, anchors="own"):
    the shares' sums over the global count are the whole batch's loss, and so are the
    gradients (remote positives and negatives included). Label layouts: 6 random classes;
    two classes of 24 (more positives per anchor than the scan takes: the sort search);
    singletons among small classes (anchors without positives)."""
    from toolkit.losses import _anchor_terms

    g = torch.Generator().manual_seed(3)
    emb = F.normalize(torch.randn(48, 8, generator=g), dim=1)
    labels = {"random": torch.randint(0, 6, (48,), generator=g),
              "large": torch.arange(2).repeat_interleave(24)[torch.randperm(48, generator=g)],
              "singletons": torch.cat([torch.arange(3).repeat_interleave(8), 10 + torch.arange(24)])[torch.randperm(48, generator=g)],
              }[classes]
    whole = emb.clone().requires_grad_(True)
    loss, stats = triplet_loss(whole, labels, margin=0.2, strategy=strategy)
    loss.backward()

    parted = emb.clone().requires_grad_(True)
    b = 48 // shares
    terms = [_anchor_terms(parted, labels, slice(r * b, (r + 1) * b), 0.2, strategy, False) for r in range(shares)]
    count = sum(t.count for t in terms)
    assert sum(t.pairs for t in terms) == stats["num_pairs"]
    assert len({t.pairs for t in terms}) > 1 or classes == "large"  # the shares hold different numbers of pairs
    total = sum(t.total for t in terms) / count
    total.backward()
    assert float(total) == pytest.approx(float(loss), rel=1e-6)
    torch.testing.assert_close(parted.grad, whole.grad, rtol=1e-5, atol=1e-7)
