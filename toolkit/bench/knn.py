"""``toolkit bench knn``: validation's kNN(13) with faiss, the toolkit's blockwise torch kNN and scikit-learn.

For each train size N (default 10,000 and 100,000; ``--sizes 10000,100000,1000000`` for a
million), the benchmark draws 128-d unit-norm embeddings around class centres (what a
trained embedder gives: 100 classes, a spread that leaves kNN accuracy well below 1) and
15 % as many queries (at most ``--max_queries``, 15,000: all of them at 10k and 100k, 1.5 %
at 1M), then classifies the queries with

* **faiss-screened** (exact): :func:`toolkit.knn.knn_predict` ``backend="faiss"``: faiss's
  flat index screens 2k + 8 candidates in float32, the float64 refinement, rounding-bound
  check and vote give scikit-learn's answers, tie rules included;
* **torch** (exact): ``backend="torch"``, the toolkit's own float32 matmul screen per tile,
  then the same refinement;
* **sklearn** (exact, the reference): ``KNeighborsClassifier(n_neighbors=13)``, ``fit`` +
  ``predict``;
* **faiss flat raw** (reference row, not a backend): ``IndexFlatL2`` search of the k
  nearest in float32 and a vote (smallest label on a tie), no refinement: near ties it can
  pick another neighbour than scikit-learn's float64 distances;
* optionally (``--approx hnsw,ivf``) **faiss hnsw** / **faiss ivf**: approximate indexes
  (:class:`toolkit.search.IndexSpec` defaults), build + search, timed once.

All get the same float32 arrays in the same process, with the same threads; the timed runs
alternate A B C D, D C B A ... and each method reports its best wall time. Exact methods
must agree with scikit-learn on every prediction: the agreement is printed and anything
below 1 fails the benchmark. The approximate rows' agreement is printed, not required.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from toolkit.bench import log, write_json
from toolkit.errors import ConfigError

DEFAULT_SIZES = "10000,100000"
EXACT = ("faiss-screened", "torch", "sklearn")
APPROX = {"hnsw": "faiss hnsw", "ivf": "faiss ivf"}


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


def _faiss_screened(train, y, queries, k):
    from toolkit.knn import knn_predict

    return knn_predict(train, y, queries, k=k, backend="faiss")[0].numpy()


def _torch(train, y, queries, k):
    from toolkit.knn import knn_predict

    return knn_predict(train, y, queries, k=k, backend="torch")[0].numpy()


def _sklearn(train, y, queries, k):
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=min(k, len(y)))
    clf.fit(train, y)
    return clf.predict(queries)


def _vote(y, ids):
    """Majority label of each row of neighbour ids (Q, k), the smallest label on a tie; id -1 does not vote."""
    classes, inverse = np.unique(y, return_inverse=True)
    rows, cols = np.nonzero(ids >= 0)
    counts = np.zeros((len(ids), len(classes)), np.int64)
    np.add.at(counts, (rows, inverse[ids[rows, cols]]), 1)
    return classes[counts.argmax(1)]  # argmax: the first, i.e. smallest, class among the most voted


def _index_vote(spec):
    def run(train, y, queries, k, timings=None):
        from toolkit import search

        t = time.perf_counter()
        index = search.build_index(train, spec)
        built = time.perf_counter()
        _dist, ids = search.search(index, queries, min(k, len(y)))
        if timings is not None:
            timings.update(build_s=built - t, search_s=time.perf_counter() - built)
        return _vote(y, ids)
    return run


def _methods(approx: list[str]) -> dict:
    from toolkit.search import IndexSpec

    methods = {"faiss-screened": _faiss_screened, "torch": _torch, "sklearn": _sklearn,
               "faiss flat raw": _index_vote(IndexSpec(kind="flat"))}
    for kind in approx:
        methods[APPROX[kind]] = _index_vote(IndexSpec(kind=kind))
    return methods


def main(
    *,
    sizes: str | int | tuple = DEFAULT_SIZES,
    query_fraction: float = 0.15,
    max_queries: int = 15000,
    dim: int = 128,
    classes: int = 100,
    k: int = 13,
    repeats: int = 2,
    approx: str = "",
    seed: int = 0,
    out: str = "",
) -> dict:
    """Seconds of kNN(k) classification: faiss-screened, raw faiss, torch, scikit-learn (and approximate indexes).

    Args:
        sizes: comma-separated train sizes N (e.g. 10000,100000,1000000).
        query_fraction: queries per train embedding (validation is 15 % of the data).
        max_queries: at most this many queries per size (1M × 15 % would take an hour).
        dim: embedding dimension.
        classes: number of classes the embeddings cluster around.
        k: neighbours that vote.
        repeats: timed runs per exact method and size, alternating; each method's best is reported.
        approx: comma-separated approximate faiss indexes to add (hnsw, ivf), timed once each.
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
    for name, value in (("dim", dim), ("classes", classes), ("k", k), ("repeats", repeats), ("max_queries", max_queries)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"toolkit bench knn: --{name} must be a positive integer, got {value!r}")
    if not isinstance(query_fraction, (int, float)) or not 0 < query_fraction <= 10:
        raise ConfigError(f"toolkit bench knn: --query_fraction must be in (0, 10], got {query_fraction!r}")
    approx_parts = list(approx) if isinstance(approx, (list, tuple)) else str(approx).split(",")
    kinds = [str(p).strip() for p in approx_parts if str(p).strip()]
    bad = [p for p in kinds if p not in APPROX]
    if bad:
        raise ConfigError(f"toolkit bench knn: --approx takes {', '.join(APPROX)} (comma-separated), got {approx!r}")

    from toolkit.knn import auto_backend

    methods = _methods(kinds)
    timed = [m for m in methods if m not in APPROX.values()]  # alternated, best of `repeats`
    # Warm-up outside the clock: imports, thread pools, first-call set-up of every method.
    tiny = make_set(256, 64, dim=dim, classes=classes, seed=seed + 1)
    for fn in methods.values():
        fn(tiny[0], tiny[1], tiny[2], k)
    rows = []
    for n in ns:
        q = min(max_queries, max(1, int(round(query_fraction * n))))
        train, y, queries, yq = make_set(n, q, dim=dim, classes=classes, seed=seed)
        times: dict[str, list[float]] = {m: [] for m in methods}
        preds: dict[str, np.ndarray] = {}
        extra: dict[str, dict] = {}
        order = []
        for r in range(repeats):
            order += timed if r % 2 == 0 else timed[::-1]
        order += [APPROX[kind] for kind in kinds]
        for name in order:
            t = time.perf_counter()
            if name in APPROX.values():
                extra[name] = {}
                pred = methods[name](train, y, queries, k, timings=extra[name])
            else:
                pred = methods[name](train, y, queries, k)
            times[name].append(time.perf_counter() - t)
            preds[name] = pred
            log(f"  N={n:,} Q={q:,} {name:15s}: {times[name][-1]:.2f} s")
        ref = preds["sklearn"]
        sk = min(times["sklearn"])
        result = {}
        for name in methods:
            best = min(times[name])
            result[name] = {
                "exact": name in EXACT, "s": best, "vs_sklearn": sk / best,
                "agreement": float((preds[name] == ref).mean()), "mismatches": int((preds[name] != ref).sum()),
                "runs": times[name], **extra.get(name, {}),
            }
        exact_times = {m: result[m]["s"] for m in EXACT}
        rows.append({
            "n_train": n, "n_queries": q, "accuracy": float((ref == yq).mean()),
            "fastest_exact": min(exact_times, key=exact_times.get), "auto": auto_backend(n, q, dim),
            "methods": result,
        })

    lines = [
        "## toolkit bench knn",
        "",
        f"kNN(k={k}) classification, {dim}-d unit vectors around {classes} class centres (spread 2.5: accuracy "
        f"well below 1), float32, queries {query_fraction:.0%} of N (at most {max_queries:,}); faiss-screened / torch = "
        f"toolkit.knn.knn_predict(backend=...), sklearn = KNeighborsClassifier(n_neighbors={k}) fit + predict, faiss "
        f"flat raw = IndexFlatL2 k-search + vote (no refinement); same process, torch threads {torch.get_num_threads()}; "
        f"exact methods and raw: best of {repeats} run(s), alternating; approximate indexes: one run, build included.",
        "",
        "| train N | queries | method | exact | seconds | × sklearn | agreement | mismatches |",
        "|---:|---:|---|:-:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for name, m in row["methods"].items():
            secs = f"{m['s']:.3f}"
            if "build_s" in m:
                secs += f" (build {m['build_s']:.2f})"
            lines.append(
                f"| {row['n_train']:,} | {row['n_queries']:,} | {name} | {'yes' if m['exact'] else 'no'} | {secs} | "
                f"{m['vs_sklearn']:.2f}× | {m['agreement']:.6f} | {m['mismatches']} |"
            )
    lines += [""] + [
        f"N={row['n_train']:,}: kNN accuracy {row['accuracy']:.3f}; fastest exact: {row['fastest_exact']}; "
        f"backend=\"auto\" runs: {row['auto']}" for row in rows
    ]
    lines += ["", "target: exact methods agree 1.000000 with scikit-learn; times are reported, not targeted"]
    print("\n".join(lines))
    report = {"benchmark": "knn", "k": k, "dim": dim, "classes": classes, "threads": torch.get_num_threads(),
              "repeats": repeats, "query_fraction": query_fraction, "max_queries": max_queries, "rows": rows}
    if out:
        write_json(out, report)
    bad_rows = [(row, name) for row in rows for name, m in row["methods"].items() if m["exact"] and m["mismatches"]]
    if bad_rows:
        raise RuntimeError(
            "toolkit bench knn: predictions differ from scikit-learn's: "
            + ", ".join(f"{name} at N={row['n_train']}: {row['methods'][name]['mismatches']} of {row['n_queries']}"
                        for row, name in bad_rows)
        )
    return report
