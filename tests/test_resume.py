"""Exact resume: a run killed and resumed ends where the uninterrupted run ends.

1. two gloo ranks, ``augment=true``, ``ckpt_every`` set: N steps straight and N steps with a
   SIGKILL of every process in the middle and ``resume=true`` give bit-identical weights, the
   same best_embedder.pt and the same metrics records (no step twice, a torn line repaired)
2. all ranks resume from the checkpoint rank 0 picks: a rank whose (local) run folder lacks
   it fails, and every rank says so in one line; a different world size or config is refused
   naming what differs
3. metrics.jsonl and the W&B run id survive a kill (unit level)

Launches are real ``accelerate launch`` processes, as the README starts them (helpers of
test_reliability.py).
"""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from test_embed import make_quadrant_shards, read_metrics, step_files, train_steps, write_config
from test_embed_launch import finish, kill_tree
from conftest import free_port
from test_reliability import RUN_TIMEOUT_S, error_lines, launch_two, run_single, wait_for_checkpoint
from toolkit.engine.embed import RESUME_MAY_CHANGE, resume_mismatch
from toolkit.config import EmbedConfig
from toolkit.files import safe_load
from toolkit.tracking import METRICS_FILE, Tracker, repair_metrics

TOTAL = 12  # steps; 2 per epoch on two ranks (68 train samples, batch 16)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_quadrant_shards(tmp_path_factory.mktemp("resume"))


def config_for(tmp, shards):
    return write_config(tmp / "run.yaml", shards, epochs=100, max_steps=TOTAL, ckpt_every=2, keep_last=20, val_every=2,
                        augment=True, lr=0.003, collective_timeout_s=60)


def launch_and_wait(config, *overrides, log):
    proc = launch_two(config, *overrides, log=log)
    out = finish(proc, log, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def straight_and_resumed(tmp_path_factory, shards):
    """(straight run dir, killed-and-resumed run dir, the step it was killed after)."""
    tmp = tmp_path_factory.mktemp("runs")
    config = config_for(tmp, shards)
    straight = tmp / "straight"
    launch_and_wait(config, f"run_dir={straight}", log=tmp / "straight.log")

    resumed = tmp / "resumed"
    log = tmp / "killed.log"
    proc = launch_two(config, f"run_dir={resumed}", log=log)
    try:
        killed_after = wait_for_checkpoint(resumed, [proc], log, at_least=4)
    finally:
        kill_tree(proc)  # SIGKILL every rank and the launcher: a lost machine, an OOM kill of the job
    killed_after = json.loads((resumed / "checkpoints" / "latest.json").read_text())["step"]
    assert killed_after < TOTAL, "the run ended before the kill: make it longer"
    with open(resumed / METRICS_FILE, "a") as f:
        f.write('{"step": 9999, "train/lo')  # the kill tore the last line
    time.sleep(0.5)  # the dead launcher's lock goes stale
    out = launch_and_wait(config, f"run_dir={resumed}", "resume=true", log=tmp / "resumed.log")
    assert f"resumed from step {killed_after} " in out, out[-3000:]
    return straight, resumed, killed_after


@pytest.mark.slow
def test_killed_and_resumed_run_ends_bit_for_bit_where_the_straight_run_ends(straight_and_resumed):
    straight, resumed, killed_after = straight_and_resumed
    a, b = safe_load(step_files(straight)[TOTAL]), safe_load(step_files(resumed)[TOTAL])
    assert a["step"] == b["step"] == TOTAL and len(b["rng"]) == 2  # every rank's random state
    assert json.loads((resumed / "checkpoints" / "latest.json").read_text())["step"] == TOTAL
    diff = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not diff, f"weights differ after resume from step {killed_after} (augment=true): {diff[:5]}"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, st in a["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
    # The best embedder is the same one, with the same score: a resume never replaces a better one.
    best_a, best_b = safe_load(straight / "best_embedder.pt"), safe_load(resumed / "best_embedder.pt")
    assert best_a["step"] == best_b["step"] and best_a["metrics"] == best_b["metrics"]
    assert all(torch.equal(best_a["model"][k], best_b["model"][k]) for k in best_a["model"])
    assert a["best"] == b["best"] and a["best_knn"] == b["best_knn"]


@pytest.mark.slow
def test_resumed_metrics_have_each_step_once_and_no_torn_line(straight_and_resumed):
    straight, resumed, _ = straight_and_resumed
    ra, rb = read_metrics(straight), read_metrics(resumed)
    assert train_steps(rb) == list(range(1, TOTAL + 1)) == train_steps(ra)
    # Same records, same values (losses bit-for-bit), wall-clock fields aside.
    def plain(rows):
        return [{k: v for k, v in r.items() if k not in ("time", "train/images_per_s")} for r in rows]
    assert plain(rb) == plain(ra)
    lines = (resumed / METRICS_FILE).read_text().splitlines()
    assert all(json.loads(line) for line in lines), "every line is a whole record"


@pytest.mark.slow
def test_a_rank_without_the_chosen_checkpoint_stops_every_rank_in_one_line(straight_and_resumed, tmp_path, shards):
    """Machines with local run folders: machine 0 holds step 8, machine 1 only up to 4."""
    straight, _, _ = straight_and_resumed
    folders = []
    for m in range(2):
        d = tmp_path / f"machine{m}" / "run"
        shutil.copytree(straight, d, ignore=shutil.ignore_patterns(".lock", "wandb*"))
        for step, p in step_files(d).items():
            if step > (8 if m == 0 else 4):
                p.unlink()
        (d / "checkpoints" / "latest.json").write_text(json.dumps({"step": 8 if m == 0 else 4,
                                                                   "file": f"step-{8 if m == 0 else 4:09d}.pt"}))
        folders.append(d)
    config = config_for(tmp_path, shards)
    port = free_port()
    logs = [tmp_path / f"m{m}.log" for m in range(2)]
    procs = [launch_two(config, f"run_dir={folders[m]}", "resume=true", log=logs[m], machine_rank=m, port=port) for m in range(2)]
    outs = [finish(p, log, timeout=RUN_TIMEOUT_S) for p, log in zip(procs, logs)]
    for m, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode != 0, out[-3000:]
        lines = error_lines(out)
        assert lines and all("resume=true: rank 1: cannot load" in ln and "step-000000008.pt" in ln for ln in lines), out[-3000:]
    assert not any("resumed from step" in out for out in outs)


@pytest.mark.slow
def test_resume_refuses_another_world_size_or_config_naming_it(straight_and_resumed, tmp_path):
    straight, _, _ = straight_and_resumed
    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns(".lock", "wandb*"))
    r = run_single("--config", straight.parent / "run.yaml", f"run_dir={run}", "resume=true", "max_steps=14", cwd=tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert error_lines(r.stderr) == [
        f"error: resume=true: rank 0: the checkpoint of step {TOTAL} was written by 2 processes, this run has 1: resume "
        "with num_processes=2 (each rank's data share and random state depend on it)"], r.stderr[-2000:]


def test_resume_mismatch_names_what_differs():
    cfg = EmbedConfig(lr=0.01, K=4, max_steps=50)
    saved = {"step": 8, "rng": [{}, {}], "config": {**EmbedConfig(lr=0.001, max_steps=20).__dict__}}
    assert resume_mismatch(saved, cfg, 2) == (
        "the checkpoint of step 8 was trained with a different config (lr 0.001 -> 0.01): resume with the run's own "
        "(--config RUN/config.yaml), or start over with overwrite=true")
    assert "written by 2 processes, this run has 4" in resume_mismatch(saved, cfg, 4)
    saved["config"]["lr"] = 0.01
    assert resume_mismatch(saved, cfg, 2) == ""  # a longer budget is fine
    assert {"max_steps", "epochs", "max_minutes", "run_dir"} <= RESUME_MAY_CHANGE and "seed" not in RESUME_MAY_CHANGE


def test_torn_metrics_line_is_repaired_and_rewind_drops_what_came_after(tmp_path):
    t = Tracker(kind="none", run_dir=tmp_path, config={}, project="p")
    for step in (1, 2, 3):
        t.log({"train/loss": step / 10}, step=step)
    records_at_checkpoint = t.records
    t.log({"val/knn_accuracy": 0.5}, step=3)  # logged after the checkpoint of step 3
    t.log({"train/loss": 0.4}, step=4)
    t.finish()
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 5, "tra')  # killed mid-write
    t = Tracker(kind="none", run_dir=tmp_path, config={}, project="p")  # opening repairs the torn line
    assert (tmp_path / METRICS_FILE).read_text().endswith("}\n") and t.records == 5
    t.rewind(3, records_at_checkpoint)
    t.log({"train/loss": 0.41}, step=4)
    t.finish()
    rows = read_metrics(tmp_path)
    assert [(r["step"], sorted(k for k in r if k not in ("step", "time"))) for r in rows] == [
        (1, ["train/loss"]), (2, ["train/loss"]), (3, ["train/loss"]), (4, ["train/loss"])]
    assert rows[-1]["train/loss"] == 0.41
    assert not repair_metrics(tmp_path)  # nothing torn now


def test_wandb_offline_resume_keeps_the_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for resume in (False, True):
        t = Tracker(kind="wandb", run_dir=tmp_path, config={"a": 1}, project="p", resume=resume)
        ids.append(t.wandb_run.id)
        t.log({"train/loss": 1.0}, step=len(ids))
        t.finish()
    assert ids[0] == ids[1] == (tmp_path / "wandb-run-id").read_text().strip()
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{ids[0]}"))) >= 1
    (tmp_path / "wandb-run-id").write_text("../../etc; rm -rf /\n")  # untrusted: not used as an id
    with pytest.warns(UserWarning, match="not a W&B run id"):
        t = Tracker(kind="wandb", run_dir=tmp_path, config={"a": 1}, project="p", resume=True)
    assert t.wandb_run.id != ids[0]
    t.finish()
