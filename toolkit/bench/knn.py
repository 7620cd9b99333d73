"""``toolkit bench knn``: validation's kNN(13), the toolkit's blockwise torch kNN vs scikit-learn.

For each train size N (default 10,000 and 100,000; ``--sizes 1000000`` for a million), the
benchmark draws 128-d unit-norm embeddings around class centres (what a trained embedder
gives: 100 classes, a spread that leaves kNN accuracy well below 1) and 15 % as many
queries, then classifies the queries with

* **toolkit**: :func:`toolkit.knn.knn_predict` (float32 matmul screen per tile, float64
  refinement of the candidates, scikit-learn's tie rules);
* **sklearn**: ``KNeighborsClassifier(n_neighbors=13)``, ``fit`` + ``predict``, what
  :func:`toolkit.knn.knn_accuracy` runs.

Both get the same float32 arrays in the same process, with the same threads; runs
alternate A B B A ... and each side reports its best wall time. The predictions must be
identical: the agreement fraction is printed and anything below 1 fails the benchmark.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from toolkit.bench import log, write_json
from toolkit.errors import ConfigError

DEFAULT_SIZES = "10000,100000"


def make_set(n: int, q: int, *, dim: int = 128, classes: int = 100, spread: float = 2.5, seed: int = 0):
    """(train (n, dim) float32, train labels, queries (q, dim) float32, query labels), unit-norm rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    out = []
    for count in (n, q):
        y = rng.integers(0, classes, count)
        x = centres[y] + spread * rng.standard_normal((count, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out += [np.ascontiguousarray(x, dtype=np.float32), y]
    return out[0], out[1], out[2], out[3]


def _toolkit(train, y, queries, k):
    from toolkit.knn import knn_predict

    pred, _votes = knn_predict(train, y, queries, k=k)
    return pred.numpy()


def _sklearn(train, y, queries, k):
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=min(k, len(y)))
    clf.fit(train, y)
    return clf.predict(queries)


def main(
    *,
    sizes: str | int | tuple = DEFAULT_SIZES,
    query_fraction: float = 0.15,
    dim: int = 128,
    classes: int = 100,
    k: int = 13,
    repeats: int = 2,
    seed: int = 0,
    out: str = "",
) -> dict:
    """Seconds of kNN(k) classification, toolkit (torch, blockwise) vs scikit-learn, same data.

    Args:
        sizes: comma-separated train sizes N (e.g. 10000,100000,1000000).
        query_fraction: queries per train embedding (validation is 15 % of the data).
        dim: embedding dimension.
        classes: number of classes the embeddings cluster around.
        k: neighbours that vote.
        repeats: timed runs per side and size, alternating A B B A; each side's best is reported.
        seed: data seed.
        out: optional JSON output file (written atomically).
    """
    # fire turns "10000,100000" into a tuple and "10000" into an int.
    parts = list(sizes) if isinstance(sizes, (list, tuple)) else str(sizes).split(",")
    try:
        ns = [int(p) for p in parts if str(p).strip()]
    except ValueError:
        raise ConfigError(f"toolkit bench knn: --sizes must be comma-separated integers, got {sizes!r}") from None
    if not ns or min(ns) < 1:
        raise ConfigError(f"toolkit bench knn: --sizes must be positive integers, got {sizes!r}")
    for name, value in (("dim", dim), ("classes", classes), ("k", k), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"toolkit bench knn: --{name} must be a positive integer, got {value!r}")
    if not isinstance(query_fraction, (int, float)) or not 0 < query_fraction <= 10:
        raise ConfigError(f"toolkit bench knn: --query_fraction must be in (0, 10], got {query_fraction!r}")

    sides = {"toolkit": _toolkit, "sklearn": _sklearn}
    # Warm-up outside the clock: imports, thread pools, first-call set-up on both sides.
    tiny = make_set(256, 64, dim=dim, classes=classes, seed=seed + 1)
    for fn in sides.values():
        fn(tiny[0], tiny[1], tiny[2], k)
    rows = []
    for n in ns:
        q = max(1, int(round(query_fraction * n)))
        train, y, queries, yq = make_set(n, q, dim=dim, classes=classes, seed=seed)
        times: dict[str, list[float]] = {"toolkit": [], "sklearn": []}
        preds: dict[str, np.ndarray] = {}
        order = []
        for r in range(repeats):
            order += ["toolkit", "sklearn"] if r % 2 == 0 else ["sklearn", "toolkit"]
        for side in order:
            t = time.perf_counter()
            pred = sides[side](train, y, queries, k)
            times[side].append(time.perf_counter() - t)
            preds[side] = pred
            log(f"  N={n:,} {side:7s}: {times[side][-1]:.2f} s")
        agree = float((preds["toolkit"] == preds["sklearn"]).mean())
        a, b = min(times["toolkit"]), min(times["sklearn"])
        rows.append({
            "n_train": n, "n_queries": q, "toolkit_s": a, "sklearn_s": b, "speedup": b / a,
            "agreement": agree, "mismatches": int((preds["toolkit"] != preds["sklearn"]).sum()),
            "accuracy": float((preds["sklearn"] == yq).mean()),
            "runs": times,
        })

    lines = [
        "## toolkit bench knn",
        "",
        f"kNN(k={k}) classification of {query_fraction:.0%} as many queries as train embeddings, {dim}-d unit vectors "
        f"around {classes} class centres (spread 2.5: accuracy well below 1), float32; toolkit = toolkit.knn.knn_predict (torch), sklearn = "
        f"KNeighborsClassifier(n_neighbors={k}) fit + predict; same process, torch threads {torch.get_num_threads()}; "
        f"best of {repeats} run(s) per side, alternating A B B A.",
        "",
        "| train N | queries | toolkit s | sklearn s | speed-up | agreement | kNN accuracy |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n_train']:,} | {r['n_queries']:,} | {r['toolkit_s']:.3f} | {r['sklearn_s']:.3f} | "
            f"{r['speedup']:.2f}× | {r['agreement']:.6f} | {r['accuracy']:.3f} |"
        )
    lines += ["", "target: identical predictions (agreement 1.000000); the speed-up is reported, not targeted"]
    print("\n".join(lines))
    report = {"benchmark": "knn", "k": k, "dim": dim, "classes": classes, "threads": torch.get_num_threads(),
              "repeats": repeats, "rows": rows}
    if out:
        write_json(out, report)
    bad = [r for r in rows if r["mismatches"]]
    if bad:
        raise RuntimeError(
            "toolkit bench knn: predictions differ from scikit-learn's: "
            + ", ".join(f"N={r['n_train']}: {r['mismatches']} of {r['n_queries']}" for r in bad)
        )
    return report
