"""W&B sweep files: valid, expanded exactly as the agent does, and runnable offline on 2 CPU processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import free_port, make_image_folder
from toolkit.config import _field_types, load_config
from toolkit.errors import ConfigError
from toolkit.data.shards import write_shards
from toolkit.sweep import STAGES, expand_command, grid_parameters, load_sweep, sample_parameters, stage_of

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
VENV_BIN = Path(sys.executable).parent


def test_there_are_sweep_files_for_both_stages():
    assert {stage_of(yaml.safe_load(p.read_text())) for p in SWEEPS} == {"embed", "classify"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_file_metric_and_parameters_are_real(path):
    spec = load_sweep(path)
    stage = stage_of(spec)
    cfg_cls, logged = STAGES[stage]
    assert spec["metric"]["name"] in logged
    assert set(spec["parameters"]) <= set(_field_types(cfg_cls))
    # every sampled trial is a valid config (e.g. P×K fits the batch)
    base = yaml.safe_load((ROOT / spec["command"][spec["command"].index("--config") + 1]).read_text())
    points = grid_parameters(spec) if spec["method"] == "grid" else [sample_parameters(spec, seed=s) for s in range(20)]
    for params in points:
        load_config(cfg_cls, None, {**base, **params})


def test_expand_command_matches_the_wandb_agent():
    spec = load_sweep(ROOT / "configs" / "sweeps" / "embed.yaml")
    argv = expand_command(spec, {"lr": 0.003, "margin": 0.2, "K": 4})
    assert argv == [
        "/usr/bin/env", "accelerate", "launch", "launch/embed.py", "--config", "configs/embed/fast.yaml",
        "--lr=0.003", "--margin=0.2", "--K=4",
    ]


def test_a_sweep_with_an_unlogged_metric_or_unknown_parameter_is_refused(tmp_path):
    spec = yaml.safe_load((ROOT / "configs" / "sweeps" / "embed.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**spec, "metric": {"name": "val/accuracyy", "goal": "maximize"}}))
    with pytest.raises(Exception, match="not logged"):
        load_sweep(bad)
    bad.write_text(yaml.safe_dump({**spec, "parameters": {"learning_rate": {"values": [1]}}}))
    with pytest.raises(Exception, match="learning_rate"):
        load_sweep(bad)


def test_sweep_without_server_says_so_in_one_line(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    r = subprocess.run([str(VENV_BIN / "toolkit"), "sweep", str(ROOT / "configs/sweeps/embed.yaml")],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2
    assert "need a W&B server" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _kill_tree(proc):
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    for p in [*kids]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.kill()


@pytest.mark.slow
def test_agent_command_runs_offline_on_two_cpu_processes(tmp_path):
    """The agent's exact argv, with the user's default accelerate config = 2 CPU processes."""
    folder = make_image_folder(tmp_path / "imgs", sizes={c: 14 for c in "abcd"}, size=(16, 16))
    shards = tmp_path / "shards"
    write_shards(folder, shards, image_size=16, samples_per_shard=20, workers=1, progress=False)
    # `accelerate config` writes $HF_HOME/accelerate/default_config.yaml; plain `accelerate
    # launch` (what the sweep command runs) then starts two CPU processes.
    hf_home = tmp_path / "hf"
    (hf_home / "accelerate").mkdir(parents=True)
    acc = yaml.safe_load((ROOT / "configs/accelerate/cpu2.yaml").read_text())
    acc["main_process_port"] = free_port()
    (hf_home / "accelerate" / "default_config.yaml").write_text(yaml.safe_dump(acc))

    spec = load_sweep(ROOT / "configs" / "sweeps" / "embed.yaml")
    params = sample_parameters(spec, seed=3)
    # What a tiny trial needs on top of the sampled hyper-parameters (also just --key=value).
    params.update(shards=str(shards), input_size=16, batch_size=8, P=2, K=4, max_steps=3, epochs=0,
                  num_workers=0, eval_batch_size=16, run_dir=str(tmp_path / "run"), tracker="wandb")
    argv = expand_command(spec, params)
    assert argv[:4] == ["/usr/bin/env", "accelerate", "launch", "launch/embed.py"]
    env = {**os.environ, "HF_HOME": str(hf_home), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        pytest.fail("sweep trial hung")
    assert proc.returncode == 0, out[-3000:]
    assert "2 process(es)" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(spec["metric"]["name"] in r for r in rows), "the sweep's metric is what the validator logs"
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["lr"] == pytest.approx(params["lr"]) and cfg["margin"] == params["margin"]
    # offline W&B run folder: metrics, config and the best-embedder artifact
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"val/best_knn_accuracy" in log and b"margin" in log and b"embedder" in log


@pytest.mark.slow
def test_a_local_grid_sweep_runs_its_first_points_and_prints_them_ranked(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", sizes={c: 14 for c in "abcd"}, size=(16, 16))
    shards = tmp_path / "shards"
    write_shards(folder, shards, image_size=16, samples_per_shard=20, workers=1, progress=False)
    tiny = ["input_size=16", "batch_size=8", "P=2", "K=4", "max_steps=2", "epochs=0", "num_workers=0",
            "eval_batch_size=16", "tracker=none", "progress=false"]
    spec = {"program": "launch/embed.py", "method": "grid",
            "metric": {"name": "val/best_knn_accuracy", "goal": "maximize"},
            "parameters": {"shards": {"value": str(shards)}, "lr": {"values": [0.0001, 0.003]},
                           "margin": {"values": [0.2, 0.5]}},
            "command": ["${env}", "${interpreter}", "${program}", *tiny, "${args}"]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(VENV_BIN / "toolkit"), "sweep", str(path), "--local", "2", "--runs", str(tmp_path / "trials")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == ["trial-000", "trial-001"]  # the first 2 of 4
    assert "--lr=0.0001 --margin=0.2" in r.stdout and "--lr=0.0001 --margin=0.5" in r.stdout
    table = [line for line in r.stdout.splitlines() if line.startswith("| ") and "trial-" in line]
    assert len(table) == 2
    values = [float(line.split("|")[2]) for line in table]
    assert values == sorted(values, reverse=True) and all(0.0 <= v <= 1.0 for v in values)
    for line in table:  # each row's value is what that trial's validator logged
        run = Path(line.split("|")[-2].strip())
        logged = [json.loads(x).get("val/best_knn_accuracy") for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert float(line.split("|")[2]) == pytest.approx(max(v for v in logged if v is not None), abs=1e-4)


def test_grid_points_come_in_the_agents_order_and_distributions_are_refused():
    # W&B's grid sorts the parameters by name (the last varies fastest), whatever the file's order
    spec = {"parameters": {"c": {"values": [3, 4]}, "b": {"value": "x"}, "a": {"values": [2, 1]}}}
    assert grid_parameters(spec) == [{"a": 2, "b": "x", "c": 3}, {"a": 2, "b": "x", "c": 4},
                                     {"a": 1, "b": "x", "c": 3}, {"a": 1, "b": "x", "c": 4}]
    with pytest.raises(ConfigError, match="grid sweep takes value or values"):
        grid_parameters({"parameters": {"lr": {"min": 0.1, "max": 1.0}}})


# --------------------------------------------------------------------------- a sweep file is data

@pytest.mark.parametrize(
    "command, why",
    [
        (["bash", "-c", "touch {marker}", "${args}"], "accelerate launch"),
        (["${env}", "accelerate", "launch", "--no_python", "touch", "{marker}", "${args}"], "not an accelerate launch option"),
        (["accelerate", "launch", "launch/other.py", "${args}"], "expected the launch script"),
        (["python", "-c", "import os; os.system('touch {marker}')", "${args}"], "expected the launch script"),
        (["accelerate", "launch", "launch/embed.py", "&&", "touch", "{marker}", "${args}"], "only --config FILE"),
        (["${env}", "${interpreter}", "${program}", "${args}"], "program must be one of"),
        (["accelerate", "launch", "launch/embed.py", "--shards=pipe:touch {marker} #{}", "${args}"], "must be a local folder"),
    ],
)
def test_a_sweep_command_can_only_run_the_launch_scripts(tmp_path, command, why):
    marker = tmp_path / "pwned"
    spec = yaml.safe_load((ROOT / "configs" / "sweeps" / "embed.yaml").read_text())
    spec["command"] = [c.replace("{marker}", str(marker)) for c in command]
    if "${program}" in command:
        spec["program"] = "evil.py"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=why):
        load_sweep(bad)
    if command[0] == "bash":  # once, the way users run it
        r = subprocess.run([str(VENV_BIN / "toolkit"), "sweep", str(bad), "--local", "1"], capture_output=True, text=True,
                           cwd=tmp_path, env={**os.environ, "WANDB_MODE": "offline"}, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and why in r.stderr, r.stderr
    assert not marker.exists(), "a command from a sweep file was run"


def test_the_wandb_default_command_and_launch_options_are_accepted(tmp_path):
    spec = yaml.safe_load((ROOT / "configs" / "sweeps" / "embed.yaml").read_text())
    for command in (
        ["${env}", "${interpreter}", "${program}", "${args}"],
        ["accelerate", "launch", "--config_file", "configs/accelerate/cpu2.yaml", "--num_processes=2", "--multi_gpu",
         "launch/embed.py", "--config", "configs/embed/fast.yaml", "epochs=1", "${args}"],
    ):
        p = tmp_path / "ok.yaml"
        p.write_text(yaml.safe_dump({**spec, "command": command}))
        assert load_sweep(p)["command"] == command


def test_a_sweep_cannot_supply_a_pipe_shard_location(tmp_path):
    spec = yaml.safe_load((ROOT / "configs" / "sweeps" / "embed.yaml").read_text())
    spec["parameters"]["shards"] = {"values": ["shards/a", "pipe:touch /tmp/x/{}"]}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(Exception, match="never from a file"):
        load_sweep(bad)
