"""Validation metrics (toolkit/evaluation.py, toolkit/knn.py) against independent reference implementations.

kNN accuracy must be scikit-learn's KNeighborsClassifier; precision@1 and MAP@R (Musgrave
et al., 2020) are checked against a deliberately naive float64 loop written here; the
single-process path of ``gather_to_main`` must sort by key and refuse duplicates.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from toolkit.evaluation import evaluate_embeddings, gather_to_main
from toolkit.knn import knn_accuracy
from toolkit.retrieval import query_gallery


def retrieval_metrics(ref, ref_y, queries, q_y) -> dict:
    """precision@1 and MAP@R of ``queries`` against ``ref`` as the validator computes them."""
    m = query_gallery(queries, q_y, ref, ref_y, verification=False).metrics
    return {"precision_at_1": m["precision_at_1"], "map_at_r": m["map_at_r"]}


def blobs(n_per_class: int, num_classes: int, dim: int, *, spread: float, seed: int, centres_seed: int = 0):
    """Unit vectors around one random centre per class (shuffled), labels as int64.

    The centres depend on ``centres_seed`` only, so train and val sets drawn with different
    ``seed`` share their classes."""
    centres = np.random.default_rng(centres_seed).normal(size=(num_classes, dim))
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), n_per_class)
    x = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(len(labels))
    return x[perm].astype(np.float32), labels[perm].astype(np.int64)


def brute_force_retrieval(ref, ref_y, queries, q_y):
    """precision@1 and MAP@R, one query at a time, in float64, straight from the definition.

    R = number of reference items of the query's class; over the R nearest references,
    MAP@R = (1/R) * sum_i P(i) * rel(i), P(i) = precision over the first i items.
    """
    ref = np.asarray(ref, dtype=np.float64)
    queries = np.asarray(queries, dtype=np.float64)
    p1, maps = [], []
    for q, y in zip(queries, q_y):
        dist = np.sqrt(((ref - q) ** 2).sum(axis=1))
        order = np.argsort(dist, kind="stable")
        rel = (np.asarray(ref_y)[order] == y).astype(np.float64)
        r = int((np.asarray(ref_y) == y).sum())
        p1.append(rel[0])
        hits, total = 0, 0.0
        for i in range(r):
            if rel[i]:
                hits += 1
                total += hits / (i + 1)
        maps.append(total / r)
    return float(np.mean(p1)), float(np.mean(maps))


def assert_no_ties(ref, queries, min_gap=1e-5):
    d = np.sqrt(((np.asarray(queries, np.float64)[:, None] - np.asarray(ref, np.float64)[None]) ** 2).sum(-1))
    gaps = np.diff(np.sort(d, axis=1), axis=1)
    assert gaps.min() > min_gap, "test data has (near-)tied distances: pick another seed"


# ----------------------------------------------------------------------------- kNN


@pytest.mark.parametrize("backend", ["auto", "sklearn", "torch"])
@pytest.mark.parametrize("k", [1, 5, 13])
def test_knn_accuracy_equals_sklearn(k, backend):
    train, train_y = blobs(12, 4, 8, spread=1.2, seed=1)  # overlapping: accuracy well below 1
    val, val_y = blobs(6, 4, 8, spread=1.2, seed=2)
    acc, pred = knn_accuracy(torch.from_numpy(train), torch.from_numpy(train_y), torch.from_numpy(val),
                             torch.from_numpy(val_y), k=k, backend=backend)
    assert 0.3 < acc < 0.95, "toy set should be neither trivial nor hopeless"

    ref = KNeighborsClassifier(n_neighbors=k).fit(train, train_y)
    expected_pred = ref.predict(val)
    assert np.array_equal(pred, expected_pred)
    assert acc == pytest.approx(float((expected_pred == val_y).mean()))
    assert acc == pytest.approx(ref.score(val, val_y))


def test_knn_auto_backend_leaves_sklearn_on_large_sets(monkeypatch):
    import toolkit.knn

    calls = []
    real = toolkit.knn.knn_accuracy_torch
    monkeypatch.setattr(toolkit.knn, "knn_accuracy_torch", lambda *a, **kw: calls.append(kw["backend"]) or real(*a, **kw))
    train, train_y = blobs(12, 4, 8, spread=1.2, seed=1)
    val, val_y = blobs(6, 4, 8, spread=1.2, seed=2)
    small = knn_accuracy(train, train_y, val, val_y)
    assert calls == []  # 48 x 24 pairs: scikit-learn
    monkeypatch.setattr(toolkit.knn, "SKLEARN_KNN_MAX_PAIRS", len(train_y) * len(val_y))
    big = knn_accuracy(train, train_y, val, val_y)
    assert calls == ["torch"]  # 24 queries x 8 dims: below faiss's BLAS threshold
    assert big[0] == small[0] and np.array_equal(big[1], small[1])
    faiss = knn_accuracy(train, train_y, val, val_y, backend="faiss")
    assert calls == ["torch", "faiss"] and np.array_equal(faiss[1], small[1])


def test_knn_accuracy_with_more_neighbours_than_references():
    # k = 13 (the default) on a reference set of 6 must still work: every reference votes.
    train, train_y = np.eye(6, dtype=np.float32), np.array([0, 0, 0, 0, 1, 1])
    val, val_y = np.eye(6, dtype=np.float32)[:2], np.array([0, 1])
    acc, pred = knn_accuracy(train, train_y, val, val_y, k=13)
    assert list(pred) == [0, 0]  # majority class wins with all 6 voting
    assert acc == 0.5


# ----------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_metrics_match_brute_force(seed):
    train, train_y = blobs(10, 4, 6, spread=0.6, seed=10 + seed, centres_seed=seed)
    train, train_y = train[:37], train_y[:37]  # unequal class sizes: R differs per class
    val, val_y = blobs(4, 4, 6, spread=0.6, seed=20 + seed, centres_seed=seed)
    assert_no_ties(train, val)
    p1, mapr = brute_force_retrieval(train, train_y, val, val_y)
    assert 0.2 < mapr < 0.95, "toy set should be neither trivial nor hopeless"

    got = retrieval_metrics(torch.from_numpy(train), torch.from_numpy(train_y), torch.from_numpy(val), torch.from_numpy(val_y))
    assert got["precision_at_1"] == pytest.approx(p1, abs=1e-6)
    assert got["map_at_r"] == pytest.approx(mapr, abs=1e-5)


def test_retrieval_metrics_perfect_and_hand_computed():
    # 1-D embeddings: class 0 near 0, class 1 near 10; one query of each class.
    ref = torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.1]])
    ref_y = torch.tensor([0, 0, 0, 1, 1])
    perfect = retrieval_metrics(ref, ref_y, torch.tensor([[0.05], [10.05]]), torch.tensor([0, 1]))
    assert perfect == {"precision_at_1": pytest.approx(1.0), "map_at_r": pytest.approx(1.0)}
    # query of class 0 sitting at 9.0: order = 10.0(1) 10.1(1) 0.2(0) -> R=3, hits at rank 3 only
    # MAP@R = (1/3) * (1/3); precision@1 = 0
    got = retrieval_metrics(ref, ref_y, torch.tensor([[9.0]]), torch.tensor([0]))
    assert got["precision_at_1"] == pytest.approx(0.0)
    assert got["map_at_r"] == pytest.approx(1 / 9)


def test_retrieval_metrics_on_tightly_clustered_embeddings():
    """Early in training (BatchNorm in eval mode with barely-updated running statistics) all
    embeddings sit within ~1e-4 of each other. The classes are still perfectly separated, as
    kNN sees; precision@1 and MAP@R must see it too, not collapse to float32 round-off ties."""
    rng = np.random.default_rng(0)
    dim, num_classes = 16, 4
    base = np.zeros(dim)
    base[0] = 1.0
    offsets = 1e-4 * rng.normal(size=(num_classes, dim))

    def sample(n):
        y = np.repeat(np.arange(num_classes), n)
        x = base + offsets[y] + 2e-6 * rng.normal(size=(len(y), dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y

    train, train_y = sample(10)  # 40 references: more than 25, like every real run
    val, val_y = sample(3)
    p1, mapr = brute_force_retrieval(train, train_y, val, val_y)
    acc, _ = knn_accuracy(train, train_y, val, val_y, k=13)
    assert acc == 1.0 and p1 == 1.0 and mapr > 0.99  # the reference agrees: perfectly separated

    got = retrieval_metrics(torch.from_numpy(train), torch.from_numpy(train_y), torch.from_numpy(val), torch.from_numpy(val_y))
    assert got["precision_at_1"] == pytest.approx(p1), "precision@1 lost to float32 round-off in the distance matrix"
    assert got["map_at_r"] == pytest.approx(mapr, abs=1e-4)


def test_evaluate_embeddings_reports_knn_and_ranking_metrics():
    train, train_y = blobs(8, 3, 5, spread=0.3, seed=5)
    val, val_y = blobs(3, 3, 5, spread=0.3, seed=6)
    keys = [f"k{i}" for i in range(len(train_y))]
    out = evaluate_embeddings(
        (keys, torch.from_numpy(train), torch.from_numpy(train_y)),
        (keys[: len(val_y)], torch.from_numpy(val), torch.from_numpy(val_y)),
        k=5,
    )
    assert {"knn_accuracy", "precision_at_1", "map_at_r", "r_precision", "recall_at_1", "recall_at_5"} <= set(out)
    assert not any(name.startswith(("fnmr", "roc", "threshold")) for name in out), "no pair metrics on val x train"
    assert all(0.0 <= out[name] <= 1.0 for name in ("knn_accuracy", "precision_at_1", "map_at_r", "r_precision"))


# ----------------------------------------------------------------------------- gather


def test_gather_to_main_single_process_sorts_by_key():
    keys = ["s00000003", "s00000000", "s00000002", "s00000001"]
    emb = torch.tensor([[3.0, 3.0], [0.0, 0.0], [2.0, 2.0], [1.0, 1.0]])
    labels = torch.tensor([13, 10, 12, 11])
    out_keys, out_emb, out_labels = gather_to_main(keys, emb, labels)
    assert out_keys == sorted(keys)
    # rows travel with their keys
    assert torch.equal(out_emb, torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    assert out_labels.tolist() == [10, 11, 12, 13]


def test_gather_to_main_rejects_duplicate_keys():
    keys = ["s1", "s2", "s1"]
    with pytest.raises(RuntimeError, match="duplicate"):
        gather_to_main(keys, torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
