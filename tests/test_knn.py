"""toolkit.knn.knn_predict gives exactly scikit-learn's KNeighborsClassifier predictions, on every backend.

Each test runs with the faiss screen (exact flat index) and the toolkit's torch screen: the
float64 refinement, the rounding-bound check and the exact fallback behind them are shared,
and the answers (tie rules included) must be scikit-learn's on both.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

import toolkit.knn as knn
from toolkit.knn import auto_backend, knn_accuracy, knn_neighbors, knn_predict, knn_vote

BACKENDS = ["faiss", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def sklearn_predict(train, labels, queries, k):
    clf = KNeighborsClassifier(n_neighbors=min(k, len(labels)))
    clf.fit(train, labels)
    return clf.predict(queries), clf


def random_set(n, q, dim, classes, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, dim)).astype(dtype),
        rng.integers(0, classes, n),
        rng.standard_normal((q, dim)).astype(dtype),
    )


def clustered_set(n, q, dim, classes, seed, spread=0.6):
    """Unit-norm embeddings around class centres, like a trained embedder's."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))
    y = rng.integers(0, classes, n)
    yq = rng.integers(0, classes, q)

    def draw(lab):
        x = centres[lab] + spread * rng.standard_normal((len(lab), dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(y), y, draw(yq), yq


def assert_same(train, labels, queries, k, *, backend, **kw):
    expected, clf = sklearn_predict(train, labels, queries, k)
    pred, votes = knn_predict(train, labels, queries, k=k, backend=backend, **kw)
    pred = pred.cpu().numpy()
    np.testing.assert_array_equal(pred, expected)
    # votes: how many of sklearn's own k neighbours carry the predicted label
    idx = clf.kneighbors(queries, return_distance=False)
    np.testing.assert_array_equal(votes.cpu().numpy(), (np.asarray(labels)[idx] == expected[:, None]).sum(1))
    return pred


@pytest.mark.parametrize(
    "n,q,dim,classes,k,seed",
    [
        (500, 120, 16, 5, 13, 0),
        (9001, 1300, 128, 40, 13, 1),  # several tiles and query blocks, partial last ones, N % 64 != 0
        (6000, 300, 8, 300, 13, 2),  # low dimension, many classes: many vote ties
        (3000, 200, 64, 10, 1, 3),
        (2500, 150, 32, 7, 40, 4),  # k larger than c's default tile
    ],
)
def test_random_sets_match_sklearn(n, q, dim, classes, k, seed, backend):
    assert_same(*random_set(n, q, dim, classes, seed), k, backend=backend)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustered_sets_match_sklearn(seed, backend):
    train, y, queries, _ = clustered_set(8000, 1200, 128, 62, seed)
    pred = assert_same(train, y, queries, 13, backend=backend)
    assert pred.dtype == y.dtype


def test_k_larger_than_a_class_vote_ties_go_to_the_smallest_label(backend):
    # 3 images per class and k = 13: every vote spans several classes, ties are common.
    rng = np.random.default_rng(7)
    classes = 40
    y = np.repeat(np.arange(classes), 3)
    centres = rng.standard_normal((classes, 24))
    train = (centres[y] + 0.9 * rng.standard_normal((len(y), 24))).astype(np.float32)
    queries = (centres[rng.integers(0, classes, 500)] + 0.9 * rng.standard_normal((500, 24))).astype(np.float32)
    expected, clf = sklearn_predict(train, y, queries, 13)
    idx = clf.kneighbors(queries, return_distance=False)
    counts = np.stack([(y[idx] == c).sum(1) for c in range(classes)], 1)
    ties = (counts == counts.max(1, keepdims=True)).sum(1) > 1
    assert ties.sum() > 50, "the set should exercise vote ties"
    assert_same(train, y, queries, 13, backend=backend)


def test_labels_need_not_be_contiguous_or_positive(backend):
    train, y, queries = random_set(4000, 300, 20, 9, 5)
    labels = y * 7 - 20  # values -20, -13, ..., 36
    assert_same(train, labels, queries, 13, backend=backend)


def test_k_at_least_the_train_size_and_tiny_sets(backend):
    train, y, queries = random_set(40, 30, 5, 3, 6)
    assert_same(train[:10], y[:10], queries, 13, backend=backend)  # k capped at N = 10, like the validator
    assert_same(train[:1], y[:1], queries, 13, backend=backend)
    assert_same(train[:30], y[:30], queries, 13, backend=backend)  # N < 2k + 8: the all-float64 path
    assert_same(train[:35], y[:35], queries, 13, backend=backend)  # N just above c = 34: screened
    assert_same(train[:40], y[:40], queries, 15, backend=backend)  # c = 38 of 40


def test_small_blocks_float64_and_tensor_inputs(backend):
    # faiss: blocks of 7 queries × 32 dims are below its BLAS threshold (a direct loop).
    train, y, queries = random_set(5000, 257, 32, 12, 8)
    assert_same(train, y, queries, 13, block=7, backend=backend)
    assert_same(train.astype(np.float64), y, queries.astype(np.float64), 13, backend=backend)
    expected, _ = sklearn_predict(train, y, queries, 13)
    pred, _ = knn_predict(torch.from_numpy(train), torch.from_numpy(y), torch.from_numpy(queries), backend=backend)
    np.testing.assert_array_equal(pred.numpy(), expected)


def test_faiss_search_paths_all_exact():
    # faiss computes L2 distances three ways: sgemm per (4096, 1024) block (nx·d >= 128,000),
    # a direct loop below that, and with fewer queries than threads and N >= 10,000, sgemm
    # split over the train set. One query per call, 200 per call and all at once:
    train, y, queries = random_set(12000, 600, 128, 10, 13)
    for block in (1, 200, None):
        assert_same(train, y, queries[:40] if block == 1 else queries, 13, block=block, backend="faiss")


def test_fallback_path_is_exact_too(monkeypatch, backend):
    # A huge rounding bound makes every row "unsure": all go through the float64 fallback.
    monkeypatch.setattr(knn, "_unit_roundoff", lambda: 1.0)
    monkeypatch.setattr(knn, "_FAISS_ROUNDOFF", 1.0)
    calls = []
    real = knn._exact_rows
    monkeypatch.setattr(knn, "_exact_rows", lambda t, q, k: calls.append(len(q)) or real(t, q, k))
    train, y, queries, _ = clustered_set(5000, 150, 64, 20, 9)
    assert_same(train, y, queries, 13, backend=backend)
    assert sum(calls) == 150


def test_near_ties_below_float32_resolution(backend):
    # 300 train points whose distances to the query differ by 1e-9 relative (float64
    # inputs): float32 cannot order them, so the screen keeps an arbitrary 34 of them. The
    # check must notice and redo the rows exactly; scikit-learn orders them in float64.
    rng = np.random.default_rng(14)
    dim, m = 24, 300
    queries = rng.standard_normal((20, dim))
    parts, labels = [], []
    for qv in queries:
        u = rng.standard_normal((m, dim))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        radii = 1.0 + 1e-9 * rng.permutation(m)  # all distinct, all within float32 rounding
        parts.append(qv + radii[:, None] * u)
        labels.append(rng.integers(0, 5, m))
    far = rng.standard_normal((2000, dim))  # the rest of the train set, all farther than 1
    train = np.concatenate(parts + [far])
    y = np.concatenate(labels + [rng.integers(0, 5, len(far))])
    perm = rng.permutation(len(train))
    train, y = train[perm], y[perm]
    ours = knn_neighbors(train, queries, k=13, backend=backend).numpy()
    clf = KNeighborsClassifier(n_neighbors=13).fit(train, y)
    np.testing.assert_array_equal(ours, clf.kneighbors(queries, return_distance=False))
    assert_same(train, y, queries, 13, backend=backend)


def test_large_common_offset_cancellation_is_caught(backend):
    # Vectors far from the origin: ||q||² + ||t||² - 2 q.t cancels catastrophically in
    # float32, so the screen is nearly noise; the bound must flag the rows, not trust it.
    rng = np.random.default_rng(15)
    offset = np.full(64, 300.0)
    train = (offset + rng.standard_normal((3000, 64))).astype(np.float32)
    queries = (offset + rng.standard_normal((100, 64))).astype(np.float32)
    y = rng.integers(0, 6, 3000)
    assert_same(train, y, queries, 13, backend=backend)


def test_screen_error_within_the_bound():
    # faiss's flat L2 values against exact float64 distances of the same float32 inputs,
    # for well-scaled and badly cancelling data, through both of faiss's formulas (5 queries:
    # the direct loop; 2,000 × 128-d: sgemm and norms; at 7-d both stay below faiss's BLAS
    # threshold of 128,000 query elements, so the loop). The first-order bound
    # (D + 6)·u·(|q| + max|t|)² must hold; the check uses twice (D + 9)·u·(...)².
    from toolkit import search

    rng = np.random.default_rng(16)
    for offset, dim in ((0.0, 128), (30.0, 128), (0.0, 7)):
        train = (offset + rng.standard_normal((3000, dim))).astype(np.float32)
        queries = (offset + rng.standard_normal((2000, dim))).astype(np.float32)
        index = search.build_index(train)
        t_max = np.linalg.norm(train.astype(np.float64), axis=1).max()
        q_norm = np.linalg.norm(queries.astype(np.float64), axis=1)
        bound = (dim + 6) * 2.0**-24 * (q_norm + t_max) ** 2
        for batch in (queries[:5], queries):
            dist, ids = search.search(index, batch, 50)
            exact = ((train[ids].astype(np.float64) - batch[:, None, :].astype(np.float64)) ** 2).sum(2)
            worst = (np.abs(dist - exact) / bound[: len(batch), None]).max()
            assert worst < 1.0, (offset, dim, len(batch), worst)


def test_equal_distances_prefer_the_smaller_train_index(backend):
    # Exact duplicates with different labels: the earlier copy is the nearer neighbour, for
    # us and for scikit-learn's brute-force search (used from 16 dimensions on). With k > 1,
    # scikit-learn's choice among points tied *at the k-th distance* depends on its heap's
    # layout, so only k = 1 is pinned down; on real embeddings exact ties do not happen.
    rng = np.random.default_rng(10)
    base = rng.integers(-2, 3, (300, 20)).astype(np.float32)  # small integers: exact arithmetic
    train = np.concatenate([base, base, base])  # three copies of every point
    y = np.concatenate([np.zeros(300, int), np.ones(300, int), np.full(300, 2)])
    queries = np.concatenate([base[:50], rng.integers(-2, 3, (150, 20)).astype(np.float32)])
    nbr = knn_neighbors(train, queries, k=1, backend=backend).numpy()[:, 0]
    assert (nbr < 300).all()  # always the first copy
    expected, clf = sklearn_predict(train, y, queries, 1)
    assert clf._fit_method == "brute" and (expected == 0).all()
    pred, _ = knn_predict(train, y, queries, k=1, backend=backend)
    np.testing.assert_array_equal(pred.numpy(), expected)


def test_duplicate_points_with_k_above_one(backend):
    # Every train point twice (same label): the copies are adjacent in the neighbour list,
    # the earlier one first, and the vote is scikit-learn's.
    rng = np.random.default_rng(17)
    base = rng.standard_normal((1500, 32)).astype(np.float32)
    train = np.concatenate([base, base])
    y = np.tile(rng.integers(0, 8, 1500), 2)
    queries = np.concatenate([base[:100], rng.standard_normal((200, 32)).astype(np.float32)])
    nbr = knn_neighbors(train, queries, k=12, backend=backend).numpy()
    np.testing.assert_array_equal(nbr[:, 0::2] + 1500, nbr[:, 1::2])  # each point, then its copy
    assert (nbr[:100, 0] == np.arange(100)).all()  # a query that is a train point finds it first
    np.testing.assert_array_equal(knn_predict(train, y, queries, k=12, backend=backend)[0].numpy(),
                                  sklearn_predict(train, y, queries, 12)[0])


def test_neighbours_in_distance_order(backend):
    train, _, queries = random_set(7000, 100, 16, 3, 11)
    ours = knn_neighbors(train, queries, k=13, backend=backend).numpy()
    clf = KNeighborsClassifier(n_neighbors=13).fit(train, np.zeros(len(train), int))
    np.testing.assert_array_equal(ours, clf.kneighbors(queries, return_distance=False))


def test_bad_inputs_and_empty_queries(backend):
    train, y, queries = random_set(50, 5, 4, 2, 12)
    with pytest.raises(ValueError, match="labels"):
        knn_predict(train, y[:-1], queries, backend=backend)
    with pytest.raises(ValueError, match="empty"):
        knn_predict(train[:0], y[:0], queries, backend=backend)
    with pytest.raises(ValueError, match="k must"):
        knn_predict(train, y, queries, k=0, backend=backend)
    with pytest.raises(ValueError, match="expected train"):
        knn_predict(train, y, queries[:, :3], backend=backend)
    with pytest.raises(ValueError, match="backend"):
        knn_predict(train, y, queries, backend="sklearn")  # knn_accuracy only
    pred, votes = knn_predict(train, y, queries[:0], backend=backend)
    assert pred.shape == (0,) and votes.shape == (0,)
    pred, share = knn_vote(torch.from_numpy(train), torch.from_numpy(y), torch.from_numpy(queries[:0]), k=13,
                           backend=backend)
    assert pred.shape == (0,) and share.shape == (0,)


@pytest.mark.parametrize("acc_backend", ["auto", "sklearn", "torch", "faiss"])
def test_knn_accuracy_backends_agree(acc_backend):
    train, y, queries, yq = clustered_set(3000, 400, 32, 12, 18)
    expected, _ = sklearn_predict(train, y, queries, 13)
    acc, pred = knn_accuracy(train, y, queries, yq, k=13, backend=acc_backend)
    np.testing.assert_array_equal(pred, expected)
    assert acc == pytest.approx(float((expected == yq).mean()))


def test_auto_backend_rule(monkeypatch):
    monkeypatch.setattr(knn, "faiss_on_gpu", lambda: False)
    assert auto_backend(10, 10, device="cuda") == "torch"  # the blockwise kNN runs on the GPU
    assert auto_backend(10**6, 10**5, device=torch.device("cuda", 0), sklearn=False) == "torch"
    monkeypatch.setattr(knn, "faiss_on_gpu", lambda: True)
    assert auto_backend(10, 10, device="cuda:0") == "faiss"
    # CPU: scikit-learn for small sets (knn_accuracy only), faiss in the middle, torch for
    # large train sets and for query counts faiss would search with its direct loop.
    assert auto_backend(5_000, 750) == "sklearn"
    assert auto_backend(10_000, 1_500) == "faiss"
    assert auto_backend(100_000, 15_000) == "faiss"
    assert auto_backend(knn.TORCH_KNN_MIN_TRAIN, 15_000) == "torch"
    import faiss

    if faiss.cvar.distance_compute_blas_threshold == 128_000:  # faiss >= 1.14.2: queries × dim
        assert auto_backend(100_000, 900, 128) == "torch"  # 900 × 128 < 128,000: faiss's direct loop
        assert auto_backend(100_000, 1_000, 128) == "faiss"
        assert auto_backend(100_000, 1_000, 64) == "torch"
        assert auto_backend(5_000, 750, sklearn=False) == "torch"  # knn_predict: no scikit-learn
    with pytest.raises(ValueError, match="backend"):
        knn_accuracy(np.zeros((3, 2)), [0, 1, 1], np.zeros((1, 2)), [0], backend="nope")
    with pytest.raises(ValueError, match="backend"):
        knn_neighbors(np.zeros((3, 2)), np.zeros((1, 2)), backend="sklearn")


def test_vote_passes_the_backend_through(monkeypatch):
    seen = []
    real = knn.knn_neighbors
    monkeypatch.setattr(knn, "knn_neighbors", lambda *a, **kw: seen.append(kw["backend"]) or real(*a, **kw))
    train, y, queries = random_set(500, 20, 8, 3, 19)
    for b in BACKENDS:
        knn_vote(torch.from_numpy(train), torch.from_numpy(y), torch.from_numpy(queries), k=5, backend=b)
    assert seen == BACKENDS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_match_sklearn(backend):
    train, y, queries, _ = clustered_set(6000, 700, 64, 30, 20)
    expected, _ = sklearn_predict(train, y, queries, 13)
    pred, _ = knn_predict(torch.from_numpy(train).cuda(), torch.from_numpy(y).cuda(), torch.from_numpy(queries).cuda(),
                          backend=backend)
    assert pred.is_cuda
    np.testing.assert_array_equal(pred.cpu().numpy(), expected)


@pytest.mark.parametrize("spread,blas,width", [(0.6, False, 34), (1e-4, False, 34), (1e-4, True, 150)])
def test_knn_from_a_centred_search_equals_sklearn(spread, blas, width, monkeypatch):
    # The sharded validator takes the kNN screen from the ranking search of the references
    # moved by their centre: the same neighbours as scikit-learn, also in a tight cluster
    # (unit rows within ~1e-4 of each other), exact duplicates (ties by index) included;
    # with faiss's direct loop (few queries) and its sgemm path, and a search deeper than
    # 100 (faiss's reservoir) of which the first 2k + 8 are the candidates.
    import faiss

    from toolkit import search

    if blas:
        monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 0)
    train, _, queries, _ = clustered_set(3000, 200, 16, 5, 21, spread=spread)
    train[5] = train[4]
    queries[0] = train[4]
    ref = search.ExactReference(train)
    moved = ref.moved(queries)
    d2, ids = ref.search(moved, width, moved=True)
    d2, ids = d2[:, :34], ids[:, :34]
    got = knn.knn_from_screen(train, queries, ids, d2[:, -1], k=13, query_sq=(moved.astype(np.float64) ** 2).sum(1),
                              train_norm_max=ref.norm_max).numpy()
    clf = KNeighborsClassifier(n_neighbors=13).fit(train.astype(np.float64), np.zeros(len(train), int))
    np.testing.assert_array_equal(got, clf.kneighbors(queries.astype(np.float64), return_distance=False))
    assert got[0, 0] == 4 and got[0, 1] == 5


def test_knn_from_a_screen_redoes_the_rows_it_cannot_trust():
    # A screen whose kept worst is no farther than the k-th candidate (nothing proves the
    # rows left out are farther), and one that came back short (-1 ids): both are redone
    # exactly against every train row, and the answer does not change.
    train, _, queries = random_set(2000, 50, 8, 2, 22)
    exact = knn_neighbors(train, queries, k=5, backend="torch").numpy()
    d2 = ((queries[:, None, :].astype(np.float64) - train[None].astype(np.float64)) ** 2).sum(2)
    order = np.argsort(d2, axis=1, kind="stable")
    cand = order[:, 10:30]  # the true nearest are not even among the candidates
    worst = np.take_along_axis(d2, cand, 1).min(1) * 0  # but the screen claims nothing
    qn = (queries.astype(np.float64) ** 2).sum(1)
    tmax = float(np.linalg.norm(train, axis=1).max())
    np.testing.assert_array_equal(knn.knn_from_screen(train, queries, cand, worst, k=5, query_sq=qn, train_norm_max=tmax).numpy(), exact)
    short = order[:, :20].copy()
    short[:, -3:] = -1
    got = knn.knn_from_screen(train, queries, short, np.take_along_axis(d2, order[:, 19:20], 1)[:, 0], k=5, query_sq=qn,
                              train_norm_max=tmax)
    np.testing.assert_array_equal(got.numpy(), exact)
    with pytest.raises(ValueError, match="more than k"):
        knn.knn_from_screen(train, queries, order[:, :5], worst, k=5, query_sq=qn, train_norm_max=tmax)
