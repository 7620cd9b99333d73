"""``toolkit bench validate``: validation gathered on rank 0 (before) vs sharded across ranks.

Runs :mod:`toolkit.bench._validate_worker` twice on ``--processes`` gloo CPU processes (the
README's two-process command), on the same synthetic embeddings (``--references`` train
rows, ``--queries`` val rows, 128-d, ``--classes`` classes): once gathering both splits on
rank 0, which scores alone (kNN(13), the ranking metrics, the "unknown" distance) while the
others wait, once with ``sharded_val_metrics``. Prints wall time and the busiest rank's peak
memory (peak RSS; and its growth over the RSS before scoring) side by side, and checks that
both give the same metrics.

How they grow with W ranks, N references, Q queries, D dims, depth = max(k, min(R_CAP, R)):

* gathered: rank 0 receives and holds N·D (+ keys), searches Q × N alone: memory O(N·D),
  time O(Q·N·D) whatever W; the other ranks idle.
* sharded: each rank holds N/W·D + Q·D and searches Q × N/W: time O(Q·N·D / W); rank 0
  receives W·Q·(k + depth) candidates and merges them: O(W·Q·depth), small while
  depth ≪ N/W.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from toolkit.bench import cores, log, require_ints, write_json
from toolkit.bench.scaling import launch

WORKER = Path(__file__).with_name("_validate_worker.py")


def _mb(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def _same(a: dict, b: dict) -> bool:
    """The same kNN accuracy and counts; rates to 1e-12 (sharded validation averages the
    rates over blocks of queries, the gathered one over all queries at once)."""
    def close(x, y):
        return x == y or (x != x and y != y) or abs(x - y) <= 1e-12 * max(1.0, abs(x))
    return a.keys() == b.keys() and a["knn_accuracy"] == b["knn_accuracy"] and all(close(a[k], b[k]) for k in a)


def _busiest(run: dict) -> dict:
    return max(run["ranks"], key=lambda r: r["peak_rss"])


def main(
    *,
    references: int = 1_000_000,
    queries: int = 150_000,
    classes: int = 1000,
    processes: int = 2,
    timeout: float = 3600.0,
    seed: int = 0,
    out: str = "",
) -> dict:
    """Validation's wall time and the busiest rank's peak memory: gathered on rank 0 vs sharded.

    Args:
        references: train embeddings (the kNN references), e.g. 1000000.
        queries: val embeddings (the queries), e.g. 150000.
        classes: classes of the synthetic embeddings.
        processes: gloo CPU processes (the cores are split between them).
        timeout: seconds allowed per launch.
        seed: data seed.
        out: optional JSON output file (written atomically).
    """
    require_ints("validate", (("references", references, 2), ("queries", queries, 1), ("classes", classes, 2),
                              ("processes", processes, 2)))
    threads = max(1, cores() // processes)
    args = ["--references", str(references), "--queries", str(queries), "--classes", str(classes), "--seed", str(seed),
            "--collective_timeout", str(timeout)]  # a rank may wait for rank 0 as long as the launch may run
    runs = {}
    with tempfile.TemporaryDirectory(prefix="toolkit-validate-") as tmp:
        for mode in ("gather", "sharded"):
            runs[mode] = launch(processes, [*args, "--mode", mode], Path(tmp) / f"{mode}.json", threads=threads,
                                timeout=timeout, worker=WORKER, what="validate")
            busy = _busiest(runs[mode])
            log(f"  {mode}: {runs[mode]['wall_s']:.1f} s, busiest rank {busy['rank']} peak {_mb(busy['peak_rss'])} MB")
    before, after = runs["gather"], runs["sharded"]
    ub, ua = before["unknown"], after["unknown"]
    same = _same(before["metrics"], after["metrics"]) and abs(ub["distance"] - ua["distance"]) <= 1e-6 * max(1.0, ub["distance"])
    rates = [k for k in before["metrics"] if isinstance(before["metrics"][k], float)]
    largest = max((abs(before["metrics"][k] - after["metrics"][k]) for k in rates), default=0.0)
    b_busy, a_busy = _busiest(before), _busiest(after)
    mem_ratio = a_busy["peak_rss"] / b_busy["peak_rss"]
    time_ratio = after["wall_s"] / before["wall_s"]
    print("## toolkit bench validate\n")
    print(f"{references:,} train references × 128, {queries:,} val queries, {classes:,} classes; {processes} gloo CPU "
          f"processes × {threads} thread(s) ({cores()} cores); kNN(13), ranking metrics (Recall@k, MAP@R, ...) and the "
          "\"unknown\" distance, as the validator computes them.\n")
    print("| | gathered on rank 0 (before) | sharded | sharded / before |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| wall time, s | {before['wall_s']:.1f} | {after['wall_s']:.1f} | {time_ratio:.2f}× |")
    print(f"| busiest rank's peak RSS, MB | {_mb(b_busy['peak_rss'])} (rank {b_busy['rank']}) | "
          f"{_mb(a_busy['peak_rss'])} (rank {a_busy['rank']}) | {mem_ratio:.2f}× |")
    grow = [r["peak_rss"] - r["rss_before"] for r in (b_busy, a_busy)]
    print(f"| its growth while scoring, MB | {_mb(grow[0])} | {_mb(grow[1])} | {grow[1] / max(1, grow[0]):.2f}× |")
    print(f"| same metrics (kNN exact, rates to 1e-12, \"unknown\" distance to 1e-6) | | {'✓' if same else '✗'} | |")
    print(f"| largest difference of a rate | | {largest:.1e} | |")
    print("\ntargets on 2 processes: busiest rank ≤ 0.6× the memory, wall time ≤ 0.7×")
    report = {"benchmark": "validate", "cores": cores(), "threads": threads, "before": before, "after": after,
              "memory_ratio": mem_ratio, "time_ratio": time_ratio, "same_metrics": same, "largest_rate_difference": largest}
    if out:
        write_json(out, report)
    return report
