"""Two real CPU processes on gloo, started with the README's command, end to end.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \\
        --main_process_port <port> launch/embed.py --config <yaml> key=value ...

Each launch gets its own process group and is killed (with every process it started) after
a timeout, so a hang fails the test instead of the suite. torchrun starts each rank in a
session of its own, so killing the launcher's process group alone would leave the ranks
running: the whole process tree is killed instead. A run killed (SIGKILL) and resumed:
tests/test_resume.py, which also proves the weights end bit for bit where a straight run's do.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from conftest import ACCELERATE, free_port
from test_embed import LAUNCH, make_quadrant_shards, read_metrics, run_env, train_steps, write_config
from toolkit.files import safe_load

pytestmark = pytest.mark.slow

TIMEOUT_S = 300


def start(config: Path, *overrides, log: Path) -> subprocess.Popen:
    cmd = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(LAUNCH), "--config", str(config), *map(str, overrides),
    ]
    env = run_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    with open(log, "w") as f:  # a file, not a pipe: a full pipe would stall the ranks
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=log.parent, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher, its process group and every descendant (ranks live in their own sessions)."""
    try:
        victims = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        victims = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(victims, timeout=30)


def finish(proc: subprocess.Popen, log: Path, timeout: float = TIMEOUT_S) -> str:
    """Wait for the launch; kill it and fail on a hang. Returns the merged output."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"two-process run hung (> {timeout} s):\n{log.read_text()[-4000:]}")
    return log.read_text()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_quadrant_shards(tmp_path_factory.mktemp("quadrants-2p"))


def test_two_process_run(tmp_path, shards):
    # 68 train samples / (2 ranks × 16) = 2 steps per epoch; 2 epochs = 4 steps
    config = write_config(tmp_path / "run.yaml", shards, epochs=2)
    run_dir = tmp_path / "run"
    log = tmp_path / "launch.log"
    proc = start(config, f"run_dir={run_dir}", log=log)
    out = finish(proc, log)
    assert proc.returncode == 0, out[-4000:]
    assert out.count("embed: 2 process(es) on cpu") == 1, out[-4000:]
    assert (run_dir / "best_embedder.pt").is_file()
    assert out.count("done: best kNN val accuracy") == 1, "summary printed by more than rank 0"

    records = read_metrics(run_dir)
    assert train_steps(records) == [1, 2, 3, 4], "each step must be logged exactly once (rank 0 only)"
    assert [r["step"] for r in records if "val/knn_accuracy" in r] == [2, 4]

    best = safe_load(run_dir / "best_embedder.pt")
    assert {"model", "config", "classes", "metrics", "index"} <= set(best)
    assert best["index"]["embeddings"].shape[0] == 68, "validation must see every train sample exactly once"

    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 4
    state = safe_load(run_dir / "checkpoints" / latest["file"])
    assert state["step"] == 4
    assert isinstance(state["rng"], list) and len(state["rng"]) == 2, "one RNG state per rank"
    assert all("torch" in r for r in state["rng"])


