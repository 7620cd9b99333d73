"""One run per run folder: a lock while a job runs there, and overwrite=true moving the old run aside.

The lock's mechanics are tested on their own (fast); the launch scripts are then run on tiny
data: in this process where that is enough, as real processes where the lock's holder must
be another process (alive, or SIGKILLed and so stale).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from classify_helpers import run_launch, shared_classify_run, shared_embed_run
from conftest import launch_two_cpu
from test_embed import LAUNCH, launch_python, make_quadrant_shards, step_files, train_steps, write_config
from toolkit.files import safe_load
from toolkit.artifacts import LOCK_FILE, RUN_OUTPUTS
from toolkit.rundir import (
    RunFolderBusy,
    STALE_AFTER_S,
    acquire_lock,
    lock_is_stale,
    move_previous_run,
    process_start_time,
    read_lock,
)
from toolkit.tracking import read_metrics

HOLD_LOCK = Path(__file__).resolve().parent / "dist_scripts" / "hold_run_lock.py"
HOST = socket.gethostname()
EARLIER = "previous-20200101T000000Z"  # a folder an earlier overwrite left: must stay as it is


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def new_previous(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("previous-*") if p.name != EARLIER)


def add_user_files(run_dir: Path) -> dict[str, bytes]:
    """Files the toolkit does not write: a note and an earlier previous-* folder."""
    (run_dir / "notes.txt").write_text("lr 1e-3 looked unstable; try warmup\n")
    (run_dir / EARLIER / "checkpoints").mkdir(parents=True)
    (run_dir / EARLIER / "checkpoints" / "step-000000099.pt").write_bytes(b"an even older run")
    return {k: v for k, v in files_of(run_dir).items() if k == "notes.txt" or k.startswith(EARLIER)}


def start_holder(run_dir: Path) -> subprocess.Popen:
    """Another process holding run_dir's lock (released when its stdin closes); returns once it holds it."""
    proc = subprocess.Popen([sys.executable, str(HOLD_LOCK), str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while (read_lock(run_dir) or {}).get("pid") != proc.pid:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"lock holder did not take {run_dir / LOCK_FILE} (rc {proc.poll()})")
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_quadrant_shards(tmp_path_factory.mktemp("quadrants-rundir"))


# ----------------------------------------------------------------------------- the lock itself


def test_lock_is_exclusive_and_released(tmp_path):
    run_dir = tmp_path / "run"
    lock = acquire_lock(run_dir, command="launch/embed.py run_dir=run")
    held = read_lock(run_dir)
    assert held["pid"] == os.getpid() and held["host"] == HOST and held["command"] == "launch/embed.py run_dir=run"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", held["started"])
    assert lock_is_stale(held) is False
    with pytest.raises(RunFolderBusy, match=f"run folder {re.escape(str(run_dir))} is in use by pid {os.getpid()} on host "):
        acquire_lock(run_dir)
    assert read_lock(run_dir) == held, "a refused job must leave the holder's lock alone"
    lock.release()
    assert read_lock(run_dir) is None
    with acquire_lock(run_dir):
        assert (run_dir / LOCK_FILE).is_file()
    assert not (run_dir / LOCK_FILE).exists()


def test_lock_of_a_dead_process_is_stale_and_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old = {"pid": gone.pid, "host": HOST, "started": "2026-01-01T00:00:00Z", "process_start": 1, "command": "old job"}
    (run_dir / LOCK_FILE).write_text(json.dumps(old))
    assert lock_is_stale(old) is True
    lock = acquire_lock(run_dir)
    assert lock.took_over == old
    assert read_lock(run_dir) == lock.info and lock.info["pid"] == os.getpid()
    lock.release()
    assert not (run_dir / LOCK_FILE).exists()


def test_reused_pid_is_stale_a_live_process_is_not():
    me = {"pid": os.getpid(), "host": HOST, "process_start": process_start_time(os.getpid())}
    assert lock_is_stale(me) is False
    if me["process_start"] is not None:  # Linux: the pid now names another process than the lock's
        assert lock_is_stale({**me, "process_start": me["process_start"] - 1}) is True
    assert lock_is_stale({**me, "host": "gpu-node-7"}) is None  # cannot be checked from here
    if os.path.exists("/proc/self/ns/pid"):  # another container with this host name: cannot be checked either
        assert lock_is_stale({**me, "pid_namespace": "pid:[1]"}) is None
    assert lock_is_stale({}) is True  # unreadable: its writer died before filling it


def test_lock_from_another_host_is_refused_and_says_how_to_remove_it(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = {"pid": 4242, "host": "gpu-node-7", "started": "2026-12-01T15:30:00Z", "process_start": 7, "command": "train"}
    (run_dir / LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(RunFolderBusy) as refused:
        acquire_lock(run_dir)
    msg = str(refused.value)
    assert msg.startswith(f"run folder {run_dir} is in use by pid 4242 on host gpu-node-7 since 2026-12-01T15:30:00Z: ")
    assert f"delete {run_dir / LOCK_FILE}" in msg and "\n" not in msg
    assert read_lock(run_dir) == other
    # ... until its holder has not refreshed it for STALE_AFTER_S: a job killed on another
    # machine (or in a container with a new host name) must not block a requeued resume forever
    old = time.time() - STALE_AFTER_S - 60
    os.utime(run_dir / LOCK_FILE, (old, old))
    with acquire_lock(run_dir) as lock:
        assert lock.took_over == other and read_lock(run_dir)["pid"] == os.getpid()


def test_a_held_lock_is_refreshed_while_its_job_runs(tmp_path):
    from toolkit.rundir import RunLock, lock_age_s

    run_dir = tmp_path / "run"
    with acquire_lock(run_dir) as first:
        old = time.time() - 3600
        os.utime(first.path, (old, old))
        beating = RunLock(first.path, first.info, heartbeat_s=0.05)  # the same lock, a fast heartbeat
        deadline = time.time() + 10
        while lock_age_s(first.path) > 60 and time.time() < deadline:
            time.sleep(0.05)
        beating._stop.set()
        assert lock_age_s(first.path) < 60, "the heartbeat keeps the lock fresh"


def test_move_previous_run_moves_only_what_the_toolkit_writes(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in RUN_OUTPUTS:
        if name in ("checkpoints", "plots", "wandb", "wandb-data"):
            (run_dir / name).mkdir()
            (run_dir / name / "inside").write_text(name)
        elif name != LOCK_FILE:
            (run_dir / name).write_text(f"old {name}")
    user = add_user_files(run_dir)
    old = {k: v for k, v in files_of(run_dir).items() if k not in user}

    with acquire_lock(run_dir) as lock:
        dest = move_previous_run(run_dir, now=datetime(2026, 12, 1, 15, 30, tzinfo=timezone.utc))
        assert dest == run_dir / "previous-20261201T153000Z"
        assert files_of(dest) == old, "the previous run moves whole, nothing deleted"
        assert sorted(p.name for p in run_dir.iterdir()) == sorted([LOCK_FILE, "notes.txt", EARLIER, dest.name])
        assert read_lock(run_dir) == lock.info, "the lock of the job starting over stays"
        assert {k: v for k, v in files_of(run_dir).items() if not k.startswith(dest.name)} == {**user, LOCK_FILE: (run_dir / LOCK_FILE).read_bytes()}

        assert move_previous_run(run_dir) is None, "nothing left to move: no empty folder"
        (run_dir / "metrics.jsonl").write_text("a second start over within the same second\n")
        again = move_previous_run(run_dir, now=datetime(2026, 12, 1, 15, 30, tzinfo=timezone.utc))
        assert again == run_dir / "previous-20261201T153000Z-2" and files_of(dest) == old

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": HOST, "started": "x", "command": "y"}))
    stale = move_previous_run(run_dir)
    assert stale is not None and (stale / LOCK_FILE).is_file() and not (run_dir / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- embed: overwrite, then resume


def embed_args(config: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(config), f"run_dir={run_dir}", *extra]


def test_embed_overwrite_moves_the_old_run_aside_and_resume_never_reads_it(tmp_path, shards, capsys):
    # 68 train images / 16 = 4 steps per epoch; a checkpoint every step.
    config = write_config(tmp_path / "run.yaml", shards, epochs=100, ckpt_every=1, lr=0.001)
    run_dir = tmp_path / "run"

    # run 1: 6 steps, checkpoints 4, 5, 6 (keep_last=3)
    rc, out = run_launch("embed", embed_args(config, run_dir, "max_steps=6", "keep_last=3"))
    assert rc == 0, out + capsys.readouterr().err
    assert sorted(step_files(run_dir)) == [4, 5, 6]
    user = add_user_files(run_dir)
    run1 = {k: v for k, v in files_of(run_dir).items() if k not in user}

    # run 2 starts over with fewer steps: its step files (2, 3) must not lose to run 1's 4-6
    rc, out = run_launch("embed", embed_args(config, run_dir, "max_steps=3", "keep_last=2", "overwrite=true"))
    assert rc == 0, out + capsys.readouterr().err
    assert sorted(step_files(run_dir)) == [2, 3]
    records = read_metrics(run_dir)
    assert train_steps(records) == [1, 2, 3] and max(r["step"] for r in records) == 3, "metrics.jsonl is run 2's only"
    best = safe_load(run_dir / "best_embedder.pt")
    assert best["step"] == 3 and best["config"]["max_steps"] == 3
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["max_steps"] == 3
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    (prev,) = new_previous(run_dir)
    assert re.fullmatch(r"previous-\d{8}T\d{6}Z", prev.name)
    assert f"overwrite=true: moved the previous run in {run_dir} to {prev}" in out
    assert files_of(prev) == run1, "run 1 moved aside whole, byte for byte"
    assert {k: v for k, v in files_of(run_dir).items() if k in user} == user, "notes and earlier previous-* untouched"
    assert not (run_dir / LOCK_FILE).exists()

    # run 2's newest checkpoint is damaged: resume falls back to run 2's step 2, never run 1's step 6
    newest = step_files(run_dir)[3]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    rc, out = run_launch("embed", embed_args(config, run_dir, "max_steps=4", "keep_last=2", "resume=true"))
    assert rc == 0, out + capsys.readouterr().err
    assert "resumed from step 2 " in out, out
    assert train_steps(read_metrics(run_dir)) == [1, 2, 3, 4]  # step 3 came after the checkpoint: logged again, once
    assert files_of(prev) == run1 and new_previous(run_dir) == [prev], "resume leaves the old run where it is"


def test_embed_refuses_resume_together_with_overwrite(tmp_path, shards, capsys):
    config = write_config(tmp_path / "run.yaml", shards, max_steps=1)
    rc, _ = run_launch("embed", embed_args(config, tmp_path / "run", "resume=true", "overwrite=true"))
    assert rc == 2 and "pass one of them" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- classify: overwrite


def test_classify_overwrite_moves_the_old_run_aside(tmp_path, tmp_path_factory, capsys):
    import shutil

    base = shared_embed_run(tmp_path_factory)
    run_dir = tmp_path / "cls"
    shutil.copytree(shared_classify_run(tmp_path_factory), run_dir)  # a finished 8-epoch run, report and plots
    user = add_user_files(run_dir)
    run1 = {k: v for k, v in files_of(run_dir).items() if k not in user}
    assert {"best_head.pt", "metrics.jsonl", "report.json", "report.md", "summary.json", "config.yaml"} <= run1.keys()
    assert any(k.startswith("plots/") for k in run1)

    rc, out = run_launch("classify", [
        f"embedder={base['embed']}", f"run_dir={run_dir}", "max_steps=2", "epochs=0", "batch_size=16",
        "num_workers=0", "tracker=none", "progress=false", "overwrite=true",
    ])
    assert rc == 0, out + capsys.readouterr().err
    (prev,) = new_previous(run_dir)
    assert f"moved the previous run in {run_dir} to {prev}" in out
    assert files_of(prev) == run1, "the old head, metrics, report and plots moved aside, not deleted"
    records = read_metrics(run_dir)
    assert records and max(r["step"] for r in records) <= 2, "metrics.jsonl is the new run's only"
    head = safe_load(run_dir / "best_head.pt")
    assert head["step"] <= 2 and head["config"]["max_steps"] == 2
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert (run_dir / "report.json").is_file()
    assert {k: v for k, v in files_of(run_dir).items() if k in user} == user
    assert not (run_dir / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- the lock in the launch scripts


@pytest.mark.parametrize("extra", [[], ["resume=true"], ["overwrite=true"]])
def test_embed_holds_the_lock_while_it_runs_and_releases_it_on_failure(extra, tmp_path, shards, monkeypatch):
    import toolkit.engine.embed as engine

    config = write_config(tmp_path / "run.yaml", shards, max_steps=1)
    run_dir = tmp_path / "run"
    seen = {}

    def failing_fit(cfg, accelerator, tracker):
        seen.update(read_lock(run_dir) or {})
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(engine, "fit", failing_fit)
    with pytest.raises(RuntimeError, match="a bug in the loop"):
        run_launch("embed", embed_args(config, run_dir, *extra))
    assert seen.get("pid") == os.getpid() and seen["command"].startswith("launch/embed.py --config "), seen
    assert not (run_dir / LOCK_FILE).exists(), "the lock must go on failure too"


def test_a_second_job_is_refused_and_a_killed_jobs_lock_taken_over(tmp_path, shards, capsys):
    config = write_config(tmp_path / "run.yaml", shards, max_steps=1)
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    try:
        held = read_lock(run_dir)
        # a real second launch, same folder: one line, exit 2, and nothing written there
        r = launch_python("--config", config, f"run_dir={run_dir}", cwd=tmp_path)
        assert r.returncode == 2, r.stdout[-3000:]
        lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
        expected = f"error: run folder {run_dir} is in use by pid {holder.pid} on host {HOST} since {held['started']}: "
        assert lines[-1].startswith(expected), r.stdout[-3000:]
        assert "Traceback" not in r.stdout
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE] and read_lock(run_dir) == held
    finally:
        holder.kill()  # SIGKILL: the lock stays behind, stale
        holder.wait()
    assert read_lock(run_dir) == held

    rc, out = run_launch("embed", embed_args(config, run_dir))
    assert rc == 0, out + capsys.readouterr().err
    assert f"taking over the stale lock of pid {holder.pid} on host {HOST}" in out
    assert train_steps(read_metrics(run_dir)) == [1]
    assert not (run_dir / LOCK_FILE).exists()


def test_classify_refuses_a_held_folder_and_runs_once_it_is_released(tmp_path, tmp_path_factory, capsys):
    base = shared_embed_run(tmp_path_factory)
    run_dir = tmp_path / "cls"
    args = [f"embedder={base['embed']}", f"run_dir={run_dir}", "max_steps=1", "epochs=0", "batch_size=16",
            "num_workers=0", "tracker=none", "progress=false"]
    holder = start_holder(run_dir)
    try:
        rc, _ = run_launch("classify", args)
        err = capsys.readouterr().err
        assert rc == 2 and f"error: run folder {run_dir} is in use by pid {holder.pid} on host {HOST}" in err, err
    finally:
        holder.stdin.close()  # the holder ends normally: its lock goes with it
        holder.wait(timeout=60)
    assert read_lock(run_dir) is None
    rc, out = run_launch("classify", args)
    assert rc == 0, out + capsys.readouterr().err
    assert "stale lock" not in out


@pytest.mark.slow
def test_two_processes_agree_on_the_lock(tmp_path, shards):
    """Under `accelerate launch` with 2 ranks, rank 0 alone takes the lock and moves the old run
    aside; a refusal reaches every rank as the same line, and nobody hangs."""
    config = write_config(tmp_path / "run.yaml", shards, max_steps=2, epochs=100)
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    try:
        r = launch_two_cpu(LAUNCH, "--config", config, f"run_dir={run_dir}", timeout=240, what="refused 2-process launch")
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    refusal = re.findall(r"error: run folder .*? or use another run_dir\n", r.stdout)
    assert r.returncode != 0 and len(refusal) == 2 and len(set(refusal)) == 1, r.stdout[-4000:]
    assert f"in use by pid {holder.pid} on host {HOST}" in refusal[0]

    (run_dir / "metrics.jsonl").write_text('{"step": 99, "train/loss": 1.0}\n')  # an old run's
    r = launch_two_cpu(LAUNCH, "--config", config, f"run_dir={run_dir}", "overwrite=true", timeout=240,
                       what="2-process overwrite run")
    assert r.returncode == 0, r.stdout[-4000:]
    assert r.stdout.count("taking over the stale lock") == 1 and r.stdout.count("moved the previous run") == 1
    (prev,) = new_previous(run_dir)
    assert (prev / "metrics.jsonl").read_text() == '{"step": 99, "train/loss": 1.0}\n'
    assert train_steps(read_metrics(run_dir)) == [1, 2]
    assert not (run_dir / LOCK_FILE).exists()
