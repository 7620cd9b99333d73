"""The performance benchmarks (issue 6) run end to end with tiny options, as users run them.

Each prints both sides and a numeric ratio; ``toolkit bench gpu`` skips cleanly without CUDA.
The numbers themselves are not checked (they depend on the machine): only that they are
there and positive. About a minute in all on 2 cores.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_bench import run  # the installed `toolkit` script, in a subprocess

NUM = r"(\d[\d,]*(?:\.\d+)?)"


def _row(stdout: str, prefix: str) -> list[str]:
    line = next(line for line in stdout.splitlines() if line.startswith(prefix))
    return [c.strip().strip("*") for c in line.strip().strip("|").split("|")]


def _num(cell: str) -> float:
    m = re.match(NUM, cell)
    assert m, cell
    return float(m.group(1).replace(",", ""))


def test_step_bench_prints_both_sides_and_ratio(tmp_path):
    out = tmp_path / "step.json"
    r = run("bench", "step", "--batch_size", 8, "--K", 4, "--warmup", 1, "--steps", 1, "--repeats", 1,
            "--out", out, timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    header = _row(r.stdout, "| toolkit images/s")
    assert header == ["toolkit images/s", "plain images/s", "ratio", "median paired ratio"]
    data = [line for line in r.stdout.splitlines() if re.match(r"\| \d", line)]
    assert len(data) == 1
    toolkit_rate, plain_rate, ratio, paired = (c.strip() for c in data[0].strip().strip("|").split("|"))
    assert _num(toolkit_rate) > 0 and _num(plain_rate) > 0 and _num(paired) > 0
    assert re.match(r"\d+\.\d+× \(target ≥0\.95× [✓✗]\)", ratio), ratio
    report = json.loads(out.read_text())
    assert report["ratio"] == pytest.approx(report["toolkit"]["images_per_s"] / report["plain"]["images_per_s"])
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_scaling_bench_one_vs_two_processes(tmp_path):
    out = tmp_path / "scaling.json"
    r = run("bench", "scaling", "--batch_size", 20, "--K", 2, "--warmup", 0, "--steps", 1, "--repeats", 1,
            "--out", out, env_extra={"TOOLKIT_CACHE": str(tmp_path / "cache")}, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    header = _row(r.stdout, "| ms per step")
    assert header[1:] == ["1 process", "2 processes"]
    for phase in ("forward", "gather", "mining", "backward", "step (wall)", "images/s"):
        cells = _row(r.stdout, f"| {phase}") if not phase.startswith(("step", "images")) else _row(
            r.stdout, f"| **{phase}")
        assert len(cells) == 3 and all(_num(c) >= 0 for c in cells[1:]), cells
    assert re.search(r"2 processes vs 1: \d+\.\d+×", r.stdout)
    report = json.loads(out.read_text())
    assert report["one"]["processes"] == 1 and report["many"]["processes"] == 2
    assert report["many"]["backend"] == "gloo"
    assert report["one"]["global_batch"] == 20 and report["many"]["global_batch"] == 40
    assert report["many"]["ms"]["gather"] > 0 and report["one"]["ms"]["wait"] < 1.0  # no barrier alone
    assert (tmp_path / "cache" / "bench" / "digits-shards32" / "_info.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_bench_skips_without_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    r = run("bench", "gpu", "--out", out, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["benchmark"] == "gpu" and report["skipped"] is True and "CUDA" in report["reason"]
    assert json.loads(out.read_text()) == report


def test_gpu_bench_pieces_run_on_cpu():
    """The GPU script's timing and FLOP counting, at 32×32 on CPU (the CUDA run is not available here)."""
    from toolkit.bench.gpu import bench_train, count_flops, peak_for
    from toolkit.bench.step import make_batches
    from toolkit.models import build_embedder

    assert peak_for("NVIDIA H200")["bf16"] == 989.0
    assert peak_for("NVIDIA H100 PCIe")["bf16"] == 756.0
    assert peak_for("NVIDIA A100-SXM4-80GB")["bf16"] == 312.0
    assert peak_for("Some Unknown GPU") is None
    model = build_embedder(input_size=32).to(memory_format=torch.channels_last)
    x, y = make_batches(1, batch_size=8, K=4, channels=1, size=32, seed=0)[0]
    flops = count_flops(model, x, y, input_size=32)
    assert flops > 0
    res = bench_train(dtype="fp32", compiled=False, batch_size=8, K=4, input_size=32, warmup=0, steps=1, seed=0,
                      flops_per_step=flops, peak=peak_for("NVIDIA H200"), device="cpu")
    assert res["images_per_s"] > 0 and 0 < res["share_of_peak"] < 1 and res["peak_tflops"] == 67.0


def test_new_benchmarks_are_registered_and_check_options():
    from toolkit.bench import BENCHMARKS, check_options, get_bench
    from toolkit.errors import ConfigError

    for name in ("step", "knn", "scaling", "gpu"):
        assert name in BENCHMARKS
    with pytest.raises(ConfigError, match="--repeats"):
        check_options("knn", get_bench("knn"), {"repeat": 1})
    assert Path(sys.executable).with_name("accelerate").exists() or subprocess.run(
        ["accelerate", "--help"], capture_output=True).returncode == 0


def test_mining_bench_prints_both_sides_ratio_and_b2_cost(tmp_path):
    out = tmp_path / "mining.json"
    r = run("bench", "mining", "--sizes", "64,256", "--per_rank", "256,512", "--worlds", "1,2,8", "--repeats", 1,
            "--objectives", "triplet,pml:MultiSimilarityLoss+pml:MultiSimilarityMiner", "--objective_sizes", "64", "--min_time", 0,
            "--out", out, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    header = _row(r.stdout, "| global batch | toolkit")
    assert header[:8] == ["global batch", "toolkit ms", "toolkit ns/B²", "vectorised ms (same objective)",
                          "toolkit vs vectorised", "same loss", "PML ms (every triplet in the margin)", "toolkit vs PML"]
    for b in (64, 256):
        cells = _row(r.stdout, f"| {b} |")
        toolkit_ms, per_b2, vec_ms, pml_ms = _num(cells[1]), _num(cells[2]), _num(cells[3]), _num(cells[6])
        assert toolkit_ms > 0 and pml_ms > 0 and vec_ms > 0
        # the table rounds ms to 0.1: allow that half-unit (a fast machine runs B = 64 in < 1 ms)
        assert per_b2 == pytest.approx(toolkit_ms * 1e6 / b**2, rel=0.05, abs=0.05 * 1e6 / b**2 + 0.1)
        assert cells[5] == "✓", cells  # the vectorised loss computes the toolkit's objective
        assert re.match(r"\d+\.\d+×", cells[4]) and re.match(r"\d+\.\d+×", cells[7]), cells
    assert "targets at 2048" in r.stdout
    report = json.loads(out.read_text())
    assert [row["batch"] for row in report["rows"]] == [64, 256]
    for row in report["rows"]:
        assert row["speedup"] == pytest.approx(row["pml"]["seconds"] / row["toolkit"]["seconds"])
        assert row["vectorised_loss_diff"] < 1e-5
    # per rank: own anchors with W ranks cost less than every rank mining the whole batch
    per_rank = _row(r.stdout, "| global batch | every rank")
    assert per_rank[1:5] == ["every rank mines all, ms", "own anchors W=1, ms", "own anchors W=2, ms", "own anchors W=8, ms"]
    assert [row["global_batch"] for row in report["per_rank"]] == [256, 512]
    big = report["per_rank"][-1]
    assert big["own_ms"]["8"] < big["all_ms"] and big["ratio_at_max_w"] == pytest.approx(big["all_ms"] / big["own_ms"]["8"])
    # the training objectives, the built-in and a PML loss with its miner, timed the same way
    assert _row(r.stdout, "| objective (loss=")[1:] == ["B=64, ms", "B=64: / triplet"]
    ms = {row["objective"]: row["ms"]["64"] for row in report["objectives"]}
    assert list(ms) == ["triplet", "pml:MultiSimilarityLoss+pml:MultiSimilarityMiner"] and min(ms.values()) > 0
    pml = _row(r.stdout, "| pml:MultiSimilarityLoss+pml:MultiSimilarityMiner |")
    assert _num(pml[2].rstrip("×")) == pytest.approx(ms["pml:MultiSimilarityLoss+pml:MultiSimilarityMiner"] / ms["triplet"], abs=0.06)

@pytest.mark.slow
def test_validate_bench_prints_gathered_and_sharded_side_by_side_with_the_same_metrics(tmp_path):
    out = tmp_path / "validate.json"
    r = run("bench", "validate", "--references", 3000, "--queries", 400, "--classes", 20, "--out", out, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    assert _row(r.stdout, "| |")[1:] == ["gathered on rank 0 (before)", "sharded", "sharded / before"]
    wall = _row(r.stdout, "| wall time")
    assert _num(wall[1]) > 0 and _num(wall[2]) > 0
    assert _row(r.stdout, "| same metrics")[2] == "✓"
    report = json.loads(out.read_text())
    assert report["same_metrics"] and report["before"]["processes"] == report["after"]["processes"] == 2
    assert 0.3 < report["after"]["metrics"]["knn_accuracy"] <= 1.0
    assert report["time_ratio"] == pytest.approx(report["after"]["wall_s"] / report["before"]["wall_s"])
