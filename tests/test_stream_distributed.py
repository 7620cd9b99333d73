"""Streaming loader across real processes: 2 gloo ranks × 2 workers, launched like users do.

``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`` starts two CPU
processes on gloo (``--cpu --num_processes 2`` starts only one, see the README). The script
does a collective after every training batch, so a rank with fewer batches would hang or
fail the run; the subprocess timeout turns a hang into a failure.
"""
from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from conftest import craft_shards, launch_two_cpu

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
SCRIPT = HERE / "dist_scripts" / "loader_ranks.py"
TIMEOUT_S = 120


def launch(shards: Path, out: Path, *args) -> subprocess.CompletedProcess:
    return launch_two_cpu(SCRIPT, shards, out, *args, timeout=TIMEOUT_S, what="distributed loader")


def run_and_check(tmp_path, split_sizes, *, epochs=2, P=2, K=2):
    shards = tmp_path / "shards"
    truth = craft_shards(shards, split_sizes, num_classes=4)
    out = tmp_path / "out"
    r = launch(shards, out, "--P", P, "--K", K, "--batch-size", P * K, "--epochs", epochs, "--num-workers", 2)
    assert r.returncode == 0, r.stdout[-4000:]
    reports = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]

    # really two processes, world size 2, on gloo/CPU
    assert [rep["rank"] for rep in reports] == [0, 1]
    assert all(rep["world_size"] == 2 for rep in reports)
    assert all("MULTI_CPU" in rep["distributed_type"] for rep in reports)
    assert reports[0]["pid"] != reports[1]["pid"]

    labels = dict(truth["train"])
    steps = sum(split_sizes["train"]) // (2 * P * K)
    for e in range(epochs):
        counts = [rep["epochs"][e]["num_batches"] for rep in reports]
        assert counts == [steps, steps], f"epoch {e}: unequal batch counts {counts}"
        for rep in reports:
            assert rep["epochs"][e]["reduced_total"] == 2 * steps * P * K
            for b in rep["epochs"][e]["batches"]:
                c = Counter(b["labels"])
                assert len(c) == P and set(c.values()) == {K}, f"batch is not P×K: {dict(c)}"
                assert all(labels[k] == y for k, y in zip(b["keys"], b["labels"]))
    # the two ranks do not stream the same batches
    assert reports[0]["epochs"][0]["batches"] != reports[1]["epochs"][0]["batches"]

    # eval: disjoint per rank, union == the split, labels right
    seen = [[tuple(kv) for kv in rep["eval"]] for rep in reports]
    keys0, keys1 = {k for k, _ in seen[0]}, {k for k, _ in seen[1]}
    assert not keys0 & keys1, "a sample was evaluated on both ranks"
    assert len(seen[0]) + len(seen[1]) == len(labels), "a sample was evaluated twice or lost"
    assert dict(seen[0] + seen[1]) == labels
    return reports


def test_uneven_shards_two_ranks_two_workers(tmp_path):
    run_and_check(tmp_path, {"train": [50, 3, 17, 1], "val": [6, 2, 1]}, epochs=2)


def test_single_shard_fewer_shards_than_slots(tmp_path):
    reports = run_and_check(tmp_path, {"train": [40], "val": [7]}, epochs=1)
    # four slots share one shard: both ranks still read, and evaluate, something
    assert all(rep["eval"] for rep in reports)
