"""toolkit.knn.knn_predict gives exactly scikit-learn's KNeighborsClassifier predictions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

import toolkit.knn as knn
from toolkit.knn import knn_neighbors, knn_predict


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


def assert_same(train, labels, queries, k, **kw):
    expected, clf = sklearn_predict(train, labels, queries, k)
    pred, votes = knn_predict(train, labels, queries, k=k, **kw)
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
def test_random_sets_match_sklearn(n, q, dim, classes, k, seed):
    assert_same(*random_set(n, q, dim, classes, seed), k)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustered_sets_match_sklearn(seed):
    train, y, queries, _ = clustered_set(8000, 1200, 128, 62, seed)
    pred = assert_same(train, y, queries, 13)
    assert pred.dtype == y.dtype


def test_k_larger_than_a_class_vote_ties_go_to_the_smallest_label():
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
    assert_same(train, y, queries, 13)


def test_labels_need_not_be_contiguous_or_positive():
    train, y, queries = random_set(4000, 300, 20, 9, 5)
    labels = y * 7 - 20  # values -20, -13, ..., 36
    assert_same(train, labels, queries, 13)


def test_k_at_least_the_train_size_and_tiny_sets():
    train, y, queries = random_set(10, 30, 5, 3, 6)
    assert_same(train, y, queries, 13)  # k capped at N = 10, like the validator
    assert_same(train[:1], y[:1], queries, 13)
    assert_same(train[:30], y[:30], queries, 13)  # N < 2k + 8: the all-float64 path


def test_small_blocks_float64_and_tensor_inputs():
    train, y, queries = random_set(5000, 257, 32, 12, 8)
    assert_same(train, y, queries, 13, block=7)
    assert_same(train.astype(np.float64), y, queries.astype(np.float64), 13)
    expected, _ = sklearn_predict(train, y, queries, 13)
    pred, _ = knn_predict(torch.from_numpy(train), torch.from_numpy(y), torch.from_numpy(queries))
    np.testing.assert_array_equal(pred.numpy(), expected)


def test_fallback_path_is_exact_too(monkeypatch):
    # A huge rounding bound makes every row "unsure": all go through the float64 fallback.
    monkeypatch.setattr(knn, "_unit_roundoff", lambda: 1.0)
    train, y, queries, _ = clustered_set(5000, 150, 64, 20, 9)
    assert_same(train, y, queries, 13)


def test_equal_distances_prefer_the_smaller_train_index():
    # Exact duplicates with different labels: the earlier copy is the nearer neighbour, for
    # us and for scikit-learn's brute-force search (used from 16 dimensions on). With k > 1,
    # scikit-learn's choice among points tied *at the k-th distance* depends on its heap's
    # layout, so only k = 1 is pinned down; on real embeddings exact ties do not happen.
    rng = np.random.default_rng(10)
    base = rng.integers(-2, 3, (300, 20)).astype(np.float32)  # small integers: exact arithmetic
    train = np.concatenate([base, base, base])  # three copies of every point
    y = np.concatenate([np.zeros(300, int), np.ones(300, int), np.full(300, 2)])
    queries = np.concatenate([base[:50], rng.integers(-2, 3, (150, 20)).astype(np.float32)])
    nbr = knn_neighbors(train, queries, k=1).numpy()[:, 0]
    assert (nbr < 300).all()  # always the first copy
    expected, clf = sklearn_predict(train, y, queries, 1)
    assert clf._fit_method == "brute" and (expected == 0).all()
    pred, _ = knn_predict(train, y, queries, k=1)
    np.testing.assert_array_equal(pred.numpy(), expected)


def test_neighbours_in_distance_order():
    train, _, queries = random_set(7000, 100, 16, 3, 11)
    ours = knn_neighbors(train, queries, k=13).numpy()
    clf = KNeighborsClassifier(n_neighbors=13).fit(train, np.zeros(len(train), int))
    np.testing.assert_array_equal(ours, clf.kneighbors(queries, return_distance=False))


def test_bad_inputs():
    train, y, queries = random_set(50, 5, 4, 2, 12)
    with pytest.raises(ValueError, match="labels"):
        knn_predict(train, y[:-1], queries)
    with pytest.raises(ValueError, match="empty"):
        knn_predict(train[:0], y[:0], queries)
    with pytest.raises(ValueError, match="k must"):
        knn_predict(train, y, queries, k=0)
    with pytest.raises(ValueError, match="expected train"):
        knn_predict(train, y, queries[:, :3])
    pred, votes = knn_predict(train, y, queries[:0])
    assert pred.shape == (0,) and votes.shape == (0,)
