"""Two "machines" on one host: two `accelerate launch` invocations with --num_machines 2.

Each invocation starts one CPU process (machine rank 0 hosts the rendezvous on 127.0.0.1).
The data split must account for machines × processes × workers: in eval mode each sample is
read by exactly one process, the training stream gives both machines the same number of
batches, and a short training run through launch/embed.py finishes with one set of outputs.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psutil
import pytest

from conftest import ACCELERATE, craft_shards, free_port, make_image_folder
from toolkit.data.shards import write_shards

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180


def _machine_cmd(machine_rank: int, port: int, script, *args) -> list[str]:
    return [
        ACCELERATE, "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
        "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
        "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *map(str, args),
    ]


def _run_two_machines(script, *args) -> list[str]:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    port = free_port()
    procs = [
        subprocess.Popen(_machine_cmd(r, port, script, *args), cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for r in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            for c in psutil.Process(p.pid).children(recursive=True):
                c.kill()
            p.kill()
        pytest.fail("two-machine run hung")
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def test_two_machines_split_the_data_exactly_once(tmp_path):
    shards = tmp_path / "shards"
    craft_shards(shards, {"train": [30, 7, 19, 4, 12], "val": [9, 4]}, num_classes=4)  # 5 shards, 4 slots
    out = tmp_path / "out"
    _run_two_machines(ROOT / "tests" / "dist_scripts" / "loader_ranks.py", shards, out, "--epochs", 1, "--num-workers", 2)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert reports[0]["pid"] != reports[1]["pid"]
    # same number of training batches on both machines (DDP would hang otherwise)
    assert len(reports[0]["epochs"][0]["batches"]) == len(reports[1]["epochs"][0]["batches"]) > 0
    # eval: every sample of the split read by exactly one process
    info = json.loads((shards / "_info.json").read_text())
    keys0, keys1 = ({k for k, _ in r["eval"]} for r in reports)
    assert not keys0 & keys1
    assert len(keys0 | keys1) == info["splits"]["train"]["num_samples"]


def test_two_machines_train_a_few_steps(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", sizes={c: 12 for c in "abcd"}, size=(16, 16))
    shards = tmp_path / "shards"
    write_shards(folder, shards, image_size=16, samples_per_shard=10, workers=1, progress=False)
    run = tmp_path / "run"
    outs = _run_two_machines(
        ROOT / "launch" / "embed.py", f"shards={shards}", "input_size=16", "batch_size=8", "P=2", "K=4",
        "max_steps=3", "epochs=0", "num_workers=1", "eval_batch_size=16", f"run_dir={run}", "tracker=none",
    )
    assert "2 process(es)" in outs[0]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/knn_accuracy" in r for r in rows)
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 3
    assert (run / "best_embedder.pt").is_file()
