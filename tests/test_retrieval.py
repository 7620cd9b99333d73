"""toolkit.retrieval: ranking metrics equal pytorch-metric-learning's and a brute force, pair
metrics equal scikit-learn's, the histogram path agrees with the exact one, the unknown distance."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.metrics import roc_auc_score, roc_curve

import toolkit.retrieval as retrieval
from toolkit.knn import knn_vote
from toolkit.retrieval import calibrate_unknown, open_set_recognition, query_gallery

PML_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n, classes, dim=16, spread=0.5, seed=0, singletons=0, centres=None):
    """Unit embeddings around class centres; ``singletons`` extra classes with one item each."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes + singletons, dim)) if centres is None else centres
    y = np.r_[rng.integers(0, classes, n - singletons), np.arange(classes, classes + singletons)]
    rng.shuffle(y)
    return unit(centres[y] + spread * rng.standard_normal((len(y), dim))), y.astype(np.int64)


def pml(query, qy, ref=None, ry=None, *, k=None):
    calc = AccuracyCalculator(include=PML_METRICS, device=torch.device("cpu"), k=k)
    if ref is None:
        return calc.get_accuracy(torch.from_numpy(query), torch.from_numpy(qy), torch.from_numpy(query),
                                 torch.from_numpy(qy), ref_includes_query=True)
    return calc.get_accuracy(torch.from_numpy(query), torch.from_numpy(qy), torch.from_numpy(ref), torch.from_numpy(ry))


def assert_matches_pml(got, expected):
    assert got["precision_at_1"] == pytest.approx(expected["precision_at_1"], abs=1e-6)
    assert got["recall_at_1"] == pytest.approx(expected["precision_at_1"], abs=1e-6)
    assert got["r_precision"] == pytest.approx(expected["r_precision"], abs=1e-6)
    assert got["map_at_r"] == pytest.approx(expected["mean_average_precision_at_r"], abs=1e-6)


# ----------------------------------------------------------------------------- vs PML


@pytest.mark.parametrize("r_cap,pml_k", [(retrieval.R_CAP, None), (4, 4)])
def test_leave_one_out_matches_pml(r_cap, pml_k):
    emb, y = clustered(400, 25, seed=1, singletons=3)
    res = query_gallery(emb, y, emb, y, query_in_gallery=np.arange(len(y)), r_cap=r_cap, verification=False)
    assert_matches_pml(res.metrics, pml(emb, y, k=pml_k))
    assert res.metrics["queries_without_match"] == 3  # the one-image classes, as PML's lone queries
    assert np.isnan(res.ap[~res.has_match]).all() and not np.isnan(res.ap[res.has_match]).any()
    assert (res.topk != np.arange(len(y))[:, None]).all()  # nobody retrieves itself
    if pml_k:
        assert res.metrics["queries_over_r_cap"] == int((np.bincount(y)[y] - 1 > r_cap).sum()) > 0


@pytest.mark.parametrize("r_cap,pml_k", [(retrieval.R_CAP, None), (5, 5)])
def test_separate_query_and_gallery_match_pml(r_cap, pml_k):
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((31, 16))
    gal, gy = clustered(500, 30, seed=3, centres=centres)
    q, qy = clustered(300, 31, seed=4, centres=centres)  # class 30 is absent from the gallery
    res = query_gallery(q, qy, gal, gy, r_cap=r_cap)
    assert_matches_pml(res.metrics, pml(q, qy, gal, gy, k=pml_k))
    assert res.metrics["queries_without_match"] == int((qy == 30).sum()) > 0
    assert res.metrics["num_queries"] == 300 and res.metrics["num_gallery"] == 500
    assert res.metrics["verification_pairs"] == 300 * 500


# ----------------------------------------------------------------------------- vs brute force


def brute_force(q, qy, g, gy, qig, ks, r_cap):
    d = np.sqrt(np.maximum(((q[:, None, :].astype(np.float64) - g[None, :, :]) ** 2).sum(2), 0))
    rows = np.flatnonzero(qig >= 0)
    d[rows, qig[rows]] = np.inf
    order = np.argsort(d, axis=1, kind="stable")
    n_avail = (np.isfinite(d)).sum(1)
    r = np.array([(gy == qy[i]).sum() - (qig[i] >= 0) for i in range(len(qy))])
    hm = r > 0
    out = {}
    for k in ks:
        rec, prec = [], []
        for i in np.flatnonzero(hm):
            top = order[i, : min(k, n_avail[i])]
            rec.append((gy[top] == qy[i]).any())
            prec.append((gy[top] == qy[i]).sum() / k)
        out[f"recall_at_{k}"], out[f"precision_at_{k}"] = np.mean(rec), np.mean(prec)
    ap = np.full(len(qy), np.nan)
    for i in np.flatnonzero(hm):
        rel = gy[order[i, : min(r[i], r_cap)]] == qy[i]
        ap[i] = (np.cumsum(rel) / np.arange(1, len(rel) + 1) * rel).sum() / r[i]
    return out, ap, order, np.take_along_axis(d, order, 1), hm


@pytest.mark.parametrize("mode", ["separate", "leave_one_out", "mixed"])
def test_ranking_matches_brute_force(mode, monkeypatch):
    if mode == "mixed":  # many small blocks of queries
        monkeypatch.setattr(retrieval, "BLOCK_ELEMENTS", 700)
    rng = np.random.default_rng(5)
    gal, gy = clustered(260, 20, seed=6, singletons=2)
    qig = np.full(150, -1)
    if mode == "separate":
        q, qy = clustered(150, 22, seed=7, centres=rng.standard_normal((22, 16)))
    else:  # queries are gallery items; "mixed": a third of them are fresh copies not in the gallery
        qig = rng.choice(len(gy), 150, replace=False)
        q, qy = gal[qig].copy(), gy[qig].copy()
        if mode == "mixed":
            fresh = np.arange(0, 150, 3)
            q[fresh] = unit(q[fresh] + 0.05 * rng.standard_normal((len(fresh), 16)))
            qig[fresh] = -1
    ks = (1, 3, 10)
    res = query_gallery(q, qy, gal, gy, query_in_gallery=None if mode == "separate" else qig, ks=ks, kmax_extra=2)
    exp, ap, order, dist, hm = brute_force(q, qy, gal, gy, qig, ks, retrieval.R_CAP)
    for name, value in exp.items():
        assert res.metrics[name] == pytest.approx(value, abs=1e-12), name
    np.testing.assert_array_equal(res.has_match, hm)
    np.testing.assert_allclose(res.ap, ap, atol=1e-12)
    assert res.metrics["map_at_r"] == pytest.approx(np.nanmean(ap), abs=1e-12)
    kmax = res.topk.shape[1]
    r = np.bincount(gy, minlength=qy.max() + 1)[qy] - (qig >= 0)
    assert kmax == max(max(ks), int(r.max())) + 2
    np.testing.assert_array_equal(res.topk, order[:, :kmax])
    np.testing.assert_allclose(res.topk_dist, dist[:, :kmax], atol=1e-5)
    rows = np.flatnonzero(qig >= 0)
    assert not (res.topk[rows] == qig[rows, None]).any()


def test_small_gallery_pads_and_precision_divides_by_k():
    gal = unit(np.eye(4, 8) + 0.01)
    gy = np.array([0, 0, 1, 1])
    res = query_gallery(gal, gy, gal, gy, query_in_gallery=np.arange(4), ks=(1, 5))
    assert res.topk.shape == (4, 5)
    assert (res.topk[:, 3:] == -1).all() and np.isinf(res.topk_dist[:, 3:]).all()
    assert res.metrics["recall_at_5"] == 1.0
    assert res.metrics["precision_at_5"] == pytest.approx(1 / 5)  # one match among 5 asked for
    assert res.metrics["verification_pairs"] == 12


def test_edge_cases():
    emb, y = clustered(30, 3, seed=8)
    empty = np.zeros((0, 16), np.float32)
    for res in (query_gallery(empty, np.zeros(0, int), emb, y), query_gallery(emb, y, empty, np.zeros(0, int))):
        m = res.metrics
        assert math.isnan(m["recall_at_1"]) and math.isnan(m["map_at_r"]) and math.isnan(m["roc_auc"])
        assert math.isnan(m["fnmr_at_fmr_0.01"]) and m["verification_pairs"] == 0
        assert res.topk.shape == (len(res.has_match), 10) and not res.has_match.any()
    assert query_gallery(emb, y, empty, np.zeros(0, int)).metrics["queries_without_match"] == 30
    # every class has one image: nobody has a match in leave-one-out; no genuine pair either
    one = unit(np.eye(5, 16) + 0.1)
    res = query_gallery(torch.from_numpy(one), torch.arange(5), one, np.arange(5), query_in_gallery=np.arange(5))
    m = res.metrics
    assert m["queries_without_match"] == 5 and math.isnan(m["precision_at_1"]) and math.isnan(m["r_precision"])
    assert math.isnan(m["roc_auc"]) and math.isnan(m["fnmr_at_fmr_0.01"]) and m["verification_pairs"] == 20
    assert not math.isnan(m["threshold_at_fmr_0.01"])  # impostors alone set a threshold
    # verification=False: no pair keys
    m = query_gallery(emb, y, emb, y, verification=False).metrics
    assert not any(k.startswith(("fnmr", "threshold", "roc", "verification")) for k in m)
    with pytest.raises(ValueError, match="another label"):
        query_gallery(emb, y, emb, (y + 1) % 3, query_in_gallery=np.arange(30))
    with pytest.raises(ValueError, match="fmr"):
        query_gallery(emb, y, emb, y, fmrs=(0.0,))


# ----------------------------------------------------------------------------- pair metrics


def pair_scores(q, qy, g, gy, qig):
    d = np.sqrt(np.maximum(((q[:, None, :].astype(np.float64) - g[None, :, :]) ** 2).sum(2), 0))
    keep = np.ones(d.shape, bool)
    rows = np.flatnonzero(qig >= 0)
    keep[rows, qig[rows]] = False
    return d[keep], (qy[:, None] == gy[None, :])[keep]


def sklearn_at_fmr(dist, genuine, f):
    fpr, tpr, thr = roc_curve(genuine, -dist, drop_intermediate=False)
    i = np.flatnonzero(fpr <= f)[-1]
    return -thr[i], 1 - tpr[i]


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_pair_metrics_match_sklearn(leave_one_out, monkeypatch):
    if leave_one_out:  # blocks of 2 query rows: the self pairs fall in every block
        monkeypatch.setattr(retrieval, "BLOCK_ELEMENTS", 800)
    gal, gy = clustered(400, 12, seed=9, spread=0.8)
    if leave_one_out:
        q, qy, qig = gal, gy, np.arange(len(gy))
    else:
        q, qy = clustered(250, 12, seed=10, spread=0.8, centres=np.random.default_rng(9).standard_normal((12, 16)))
        qig = np.full(len(qy), -1)
    res = query_gallery(q, qy, gal, gy, query_in_gallery=qig if leave_one_out else None, fmrs=(1e-2, 1e-3, 0.05))
    dist, genuine = pair_scores(q, qy, gal, gy, qig)
    m = res.metrics
    assert m["verification_pairs"] == len(dist)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(genuine, -dist), abs=1e-6)
    for f in (1e-2, 1e-3, 0.05):
        t, fnmr = sklearn_at_fmr(dist, genuine, f)
        assert m[f"threshold_at_fmr_{f:g}"] == pytest.approx(t, abs=1e-6)
        assert m[f"fnmr_at_fmr_{f:g}"] == pytest.approx(fnmr, abs=1e-6)
        assert (dist[~genuine] <= m[f"threshold_at_fmr_{f:g}"]).mean() <= f  # the FMR it promises
    assert "fnmr_at_fmr_0.001" in m and "threshold_at_fmr_0.05" in m


def test_histogram_path_agrees_with_exact():
    gal, gy = clustered(300, 10, seed=11, spread=0.9)
    qig = np.arange(len(gy))
    exact = query_gallery(gal, gy, gal, gy, query_in_gallery=qig).metrics
    hist = query_gallery(gal, gy, gal, gy, query_in_gallery=qig, exact_pair_limit=1000).metrics
    w = retrieval.HIST_RANGE / retrieval.HIST_BINS
    dist, genuine = pair_scores(gal, gy, gal, gy, qig)
    imp, gen = np.sort(dist[~genuine]), dist[genuine]
    assert hist["verification_pairs"] == exact["verification_pairs"] == len(dist)
    for f in retrieval.FMRS:
        name = f"{f:g}"
        u = imp[int((np.arange(1, len(imp) + 1) / len(imp) <= f).sum())]  # the first impostor to reject
        assert exact[f"threshold_at_fmr_{name}"] < u
        assert u - w - 1e-9 <= hist[f"threshold_at_fmr_{name}"] <= u + 1e-9  # the lower edge of u's bin
        in_bin = ((gen >= u - w) & (gen <= u)).sum() / len(gen)
        assert abs(hist[f"fnmr_at_fmr_{name}"] - exact[f"fnmr_at_fmr_{name}"]) <= in_bin + 1e-12
    assert hist["roc_auc"] == pytest.approx(exact["roc_auc"], abs=1e-5)
    # the streaming memory bound: blocks of rows, not the whole pair list
    assert retrieval.BLOCK_ELEMENTS < retrieval.EXACT_PAIR_LIMIT


# ----------------------------------------------------------------------------- unknown distance


def brute_unknown(ref, ry, val, vy, fmr):
    d = np.sqrt(np.maximum(((val[:, None, :].astype(np.float64) - ref[None, :, :]) ** 2).sum(2), 0))
    same = vy[:, None] == ry[None, :]
    d_own = np.where(same, d, np.inf).min(1)
    d_other = np.where(~same, d, np.inf).min(1)
    n = len(vy)
    m = max(i for i in range(n + 1) if i / n <= fmr)
    u = np.sort(d_other)[m]
    obs = np.r_[d_own, d_other]
    t = obs[np.isfinite(obs) & (obs < u)].max()
    return t, (np.minimum(d_own, d_other) <= t).mean(), (d_other <= t).mean()


@pytest.mark.parametrize("fmr", [0.01, 0.1])
def test_calibrate_unknown_matches_brute_force(fmr, monkeypatch):
    searches = []
    exact = retrieval.search.ExactReference.search
    monkeypatch.setattr(retrieval.search.ExactReference, "search", lambda ref, q, k: searches.append((len(ref), k)) or exact(ref, q, k))
    rng = np.random.default_rng(12)
    centres = rng.standard_normal((8, 16))
    ref, ry = clustered(600, 8, seed=13, spread=0.15, centres=centres)  # ~75 a class: top-32 all own class
    val, vy = clustered(200, 8, seed=14, spread=0.3, centres=centres)
    # a few val queries sit on another class's centre: their own class is beyond the first 32
    val[:2] = unit(centres[(vy[:2] + 1) % 8] + 0.01 * rng.standard_normal((2, 16)))
    got = calibrate_unknown(torch.from_numpy(ref), torch.from_numpy(ry), val, vy, fmr=fmr)
    t, known, unknown = brute_unknown(ref, ry, val, vy, fmr)
    assert got["distance"] == pytest.approx(t, abs=1e-5)
    assert got["known_accept_rate"] == pytest.approx(known, abs=1e-9)
    assert got["unknown_accept_rate"] == pytest.approx(unknown, abs=1e-9) and unknown <= fmr
    assert got["fmr"] == fmr and got["num_queries"] == 200
    assert got["known_accept_rate"] > 0.9  # tight clusters: nearly every known query is accepted
    # the first search (32 neighbours) left rows open: another class farther (wider search)
    # and the own class farther (the class's own index): both second passes ran
    assert searches[0] == (600, 32) and searches[1][1] > 32 and any(n < 600 for n, _ in searches[2:])


def test_calibrate_unknown_hand_made_and_refusals():
    # references at 0 and 10 on a line; val of class 0 at 1..10 (d_other = 9..0)
    ref = np.array([[0.0], [10.0]], np.float32)
    val = np.arange(1, 11, dtype=np.float32)[:, None] - 0.5
    vy = np.zeros(10, int)
    got = calibrate_unknown(ref, np.array([0, 1]), val, vy, fmr=0.2)  # 2 of 10 may fall within t
    # d_other = 9.5, 8.5, ..., 0.5: the third smallest (2.5) must be rejected; the largest
    # observed distance below it (d_own or d_other) is 1.5
    assert got["distance"] == pytest.approx(1.5)
    assert got["unknown_accept_rate"] == pytest.approx(0.2)
    assert got["known_accept_rate"] == pytest.approx(0.4)  # nearest within 1.5: 0.5, 1.5 (own), 1.5, 0.5 (other)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fmr"):
            calibrate_unknown(ref, np.array([0, 1]), val, vy, fmr=bad)
    with pytest.raises(ValueError, match="2 classes"):
        calibrate_unknown(ref, np.array([0, 0]), val, vy)


# ----------------------------------------------------------------------------- open set


def test_open_set_far_unknowns_all_rejected():
    rng = np.random.default_rng(15)
    centres = np.zeros((6, 16))
    centres[:, :8] = rng.standard_normal((6, 8))
    ref, ry = clustered(300, 6, seed=16, spread=0.1, centres=centres)
    known, ky = clustered(120, 6, seed=17, spread=0.1, centres=centres)
    far = np.zeros((50, 16))
    far[:, 8:] = rng.standard_normal((50, 8))  # an orthogonal subspace: distance ~ sqrt(2)
    unknown = unit(far)
    threshold = calibrate_unknown(ref, ry, known, ky, fmr=0.01)["distance"]
    got = open_set_recognition(ref, ry, known, ky, unknown, threshold=threshold, k=13)
    pred, _ = knn_vote(torch.from_numpy(ref), torch.from_numpy(ry), torch.from_numpy(known), k=13)
    d_known = np.sqrt(((known[:, None, :].astype(np.float64) - ref[None]) ** 2).sum(2)).min(1)
    accepted = d_known <= threshold
    right = (pred.numpy() == ky) & accepted
    assert got["unknown_rejected"] == 1.0 and got["open_set_auroc"] == 1.0
    assert got["known_rejected"] == pytest.approx(1 - accepted.mean())
    assert got["known_accuracy"] == pytest.approx(right.mean())
    assert got["open_set_accuracy"] == pytest.approx((right.sum() + 50) / 170)
    assert got["num_known"] == 120 and got["num_unknown"] == 50


def test_open_set_near_unknowns_mostly_accepted():
    rng = np.random.default_rng(18)
    centres = rng.standard_normal((6, 16))
    ref, ry = clustered(300, 6, seed=19, spread=0.2, centres=centres)
    known, ky = clustered(100, 6, seed=20, spread=0.2, centres=centres)
    unknown, _ = clustered(80, 6, seed=21, spread=0.2, centres=centres)  # "new" classes that look like known ones
    got = open_set_recognition(ref, ry, known, ky, unknown, threshold=0.6, k=13)
    d_unknown = np.sqrt(((unknown[:, None, :].astype(np.float64) - ref[None]) ** 2).sum(2)).min(1)
    assert got["unknown_rejected"] == pytest.approx((d_unknown > 0.6).mean())
    assert got["unknown_rejected"] < 0.2 and 0.3 < got["open_set_auroc"] < 0.7
    # no unknown queries: the unknown shares are nan, nothing crashes
    alone = open_set_recognition(ref, ry, known, ky, np.zeros((0, 16), np.float32), threshold=0.6)
    assert math.isnan(alone["unknown_rejected"]) and math.isnan(alone["open_set_auroc"])
    assert alone["open_set_accuracy"] == pytest.approx(alone["known_accuracy"])


def test_duplicates_leave_one_out_matches_pml():
    """Exact duplicates tie with the query itself; when it is not among its k + 1 nearest the
    last neighbour is dropped instead (PML's rule), and the metrics still agree."""
    emb, y = clustered(120, 8, seed=22)
    emb, y = np.r_[emb, emb[:40], emb[:40]], np.r_[y, y[:40], y[:40]]
    res = query_gallery(emb, y, emb, y, query_in_gallery=np.arange(len(y)), r_cap=3, verification=False)
    assert_matches_pml(res.metrics, pml(emb, y, k=3))
    res = query_gallery(emb, y, emb, y, query_in_gallery=np.arange(len(y)), verification=False)
    assert_matches_pml(res.metrics, pml(emb, y))
