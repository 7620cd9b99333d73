"""Reliability: crashes, kills and bad input lose nothing and hang nothing (issue 7).

1. one of two ranks killed (or stuck): the survivor stops within a bounded time with one
   line naming the cause; resume=true continues at the last complete checkpoint
2. a kill in the middle of a checkpoint save never leaves a "latest" that fails to load
3. corrupt shards at training time: skipped with a counted warning naming the shard
   (strict_data=true: stop, naming it); ranks still take the same number of steps
   (checked on two ranks inside the kill-and-resume test, to save two launches)
4. non-finite loss: stop at that step (or skip it), the last good checkpoint intact
5. bad configuration: one line, exit 2, before any work (no run folder)
6. odd images at shard time: converted correctly, or reported and skipped; odd file names
   survive the round trip
7. untrusted files: pickles with code are refused; shard member names are plain keys

Multi-process tests start real gloo processes the way the README does and kill whole process
trees on a hang (helpers from test_embed_launch.py), so a hang fails a test, not the suite.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from conftest import craft_shards, free_port, make_image_folder, read_tar_samples, write_tar
from test_embed import LAUNCH, make_quadrant_shards, read_metrics, run_env, step_files, train_steps, write_config
from test_embed_launch import ACCELERATE, finish, kill_tree
from toolkit.checkpoint import CheckpointManager
from toolkit.files import safe_load
from toolkit.errors import CheckpointError

SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"
RUN_TIMEOUT_S = 240


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Quadrant shards: 4 classes, 68 train samples in shards of 32, 32, 4; 12 val; 16×16 grey."""
    return make_quadrant_shards(tmp_path_factory.mktemp("reliability"))


def env(**extra) -> dict:
    # One BLAS thread per process: 2 busy cores, up to 3 processes per launch.
    return run_env(OMP_NUM_THREADS="1", **extra)


def launch_two(config: Path, *overrides, log: Path, machine_rank: int | None = None, port: int | None = None,
               extra_env: dict | None = None, script: tuple = (LAUNCH,)) -> subprocess.Popen:
    """The README's two-process gloo launch. With ``machine_rank``: one process on each of two
    "machines" (two launchers on localhost), so no launcher kills the survivor for us."""
    machines = ["--num_machines", "1"] if machine_rank is None else [
        "--num_machines", "2", "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    cmd = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", *machines, "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(port or free_port()),
        *map(str, script), "--config", str(config), *map(str, overrides),
    ]
    with open(log, "w") as f:  # a file, not a pipe: a full pipe would stall the ranks
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(ACCELERATE_USE_CPU="1", **(extra_env or {})),
                                cwd=log.parent, start_new_session=True)


def launch_on_two_machines(config: Path, tmp_path: Path) -> tuple[Path, list[Path], list[subprocess.Popen]]:
    """One rank on each of two "machines" (two launchers on localhost): (run dir, logs, launchers)."""
    run_dir, port = tmp_path / "run", free_port()
    logs = [tmp_path / "machine0.log", tmp_path / "machine1.log"]
    return run_dir, logs, [launch_two(config, f"run_dir={run_dir}", log=logs[r], machine_rank=r, port=port) for r in (0, 1)]


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The worker process of ``rank`` among the launcher's descendants (torchrun sets RANK)."""
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank):
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no process with RANK={rank} under launcher {launcher.pid}")


def wait_for_checkpoint(run_dir: Path, procs: list[subprocess.Popen], log: Path, at_least: int = 2) -> int:
    """Poll latest.json until it names step >= at_least; fail if a run ends or it takes too long."""
    pointer = run_dir / "checkpoints" / "latest.json"
    deadline = time.time() + RUN_TIMEOUT_S
    while time.time() < deadline:
        try:
            step = json.loads(pointer.read_text())["step"]
            if step >= at_least:
                return step
        except (OSError, ValueError, KeyError):
            pass
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"run ended (rc {p.returncode}) before a checkpoint:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)
    pytest.fail(f"no checkpoint after {RUN_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def run_single(*args, cwd: Path, script: Path = LAUNCH) -> subprocess.CompletedProcess:
    """One process (``python SCRIPT ARGS``), stdout and stderr kept apart."""
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=RUN_TIMEOUT_S, env=env())


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def all_finite(state_dict: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state_dict.values() if torch.is_tensor(v) and v.is_floating_point())


@pytest.fixture(scope="module")
def corrupt_shards(shards, tmp_path_factory) -> tuple[Path, str]:
    """The quadrant shards with an undecodable PNG in train-000000.tar and train-000001.tar cut in half.

    Returns (folder, key of the undecodable sample).
    """
    folder = tmp_path_factory.mktemp("corrupt") / "shards"
    shutil.copytree(shards, folder)
    first = folder / "train-000000.tar"
    members = read_tar_samples(first)
    bad_key = sorted(members)[5]
    members[bad_key]["png"] = b"\x89PNG\r\n\x1a\n but not really"
    write_tar(first, members)
    second = folder / "train-000001.tar"
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2 + 700])  # cut inside a member, past half the samples
    return folder, bad_key


# ----------------------------------------------------------------------------- 1. kill / stall one rank


@pytest.mark.slow
def test_one_rank_killed_then_resume_continues_over_damaged_shards(tmp_path, corrupt_shards):
    """Items 1 and 3 in one pair of launches (each costs ~20 s of start-up on 2 busy cores):
    rank 1 is SIGKILLed mid-training, the survivor stops in bounded time naming the cause,
    and resume=true continues at the last checkpoint -- all over shards with an undecodable
    sample and a truncated tar, which must be skipped with counted warnings while both ranks
    still take the same number of steps (one rank a batch short would leave the other waiting
    in a collective until the timeout)."""
    folder, bad_key = corrupt_shards
    timeout_s, total = 20, 12
    config = write_config(tmp_path / "run.yaml", folder, epochs=100, max_steps=total, ckpt_every=2, keep_last=2,
                          val_every=100, collective_timeout_s=timeout_s)
    run_dir = tmp_path / "run"
    warnings_on = {"PYTHONWARNINGS": "ignore,default::UserWarning"}  # the shared test env silences warnings
    log1 = tmp_path / "first.log"
    proc = launch_two(config, f"run_dir={run_dir}", log=log1, extra_env=warnings_on)
    try:
        wait_for_checkpoint(run_dir, [proc], log1)
        rank_process(proc, 1).kill()  # SIGKILL rank 1 only: an OOM kill, a lost node
        killed_at = time.time()
        try:
            proc.wait(timeout=timeout_s + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"survivor still running {timeout_s + 60} s after the kill:\n{log1.read_text()[-4000:]}")
        elapsed = time.time() - killed_at
    finally:
        kill_tree(proc)
    out = log1.read_text()
    assert proc.returncode != 0
    assert elapsed < timeout_s + 60, elapsed
    # Rank 0 either saw the broken connection itself or was stopped by the launcher (which
    # noticed the dead rank first): either way, one line naming the cause and what to do.
    lines = [ln for ln in error_lines(out) if ln.startswith("error: rank 0:")]
    assert len(lines) == 1, out[-4000:]
    assert re.match(r"error: rank 0: (lost contact with another process|stopped by SIGTERM)", lines[0]), lines[0]
    n = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    assert f"last complete checkpoint: step {n}; resume with resume=true" in lines[0]
    assert 2 <= n < total, f"the run got to step {n} before the kill: make it longer"
    assert safe_load(run_dir / "checkpoints" / CheckpointManager.filename(n))["step"] == n
    lines_before = len(read_metrics(run_dir))

    log2 = tmp_path / "resume.log"
    proc = launch_two(config, f"run_dir={run_dir}", "resume=true", log=log2, extra_env=warnings_on)
    out2 = finish(proc, log2, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, out2[-4000:]
    assert f"resumed from step {n} " in out2, out2[-4000:]
    assert f"after {total} steps" in out2, out2[-4000:]
    new = read_metrics(run_dir)[lines_before:]
    assert train_steps(new) == list(range(n + 1, total + 1)), "step count must continue from the checkpoint"
    assert any("val/knn_accuracy" in r for r in new), "metrics continue too"
    state = safe_load(run_dir / "checkpoints" / CheckpointManager.filename(total))
    assert state["step"] == total and len(state["rng"]) == 2

    # The damaged data: skipped, each skip a warning naming the shard, with a running count.
    both = out + out2
    assert f"skipping unreadable data in train-000000.tar, sample {bad_key} (" in both, both[-4000:]
    assert "skipping unreadable data in train-000001.tar (" in both, both[-4000:]
    assert re.search(r"skipped so far by this loader worker\): DataError: only \d+ of 32 samples found \(truncated shard\?\)", both)
    assert max(int(c) for c in re.findall(r"\((\d+) skipped so far by this loader worker\)", both)) >= 2, "skips are counted"
    # ... and totalled over loader workers and both ranks: one line per epoch, and summary.json.
    assert re.search(r"warning: epoch \d+: skipped \d+ training samples over all ranks \(unreadable \d+", out2), out2[-4000:]
    skipped = json.loads((run_dir / "summary.json").read_text())["skipped_samples"]
    assert skipped["unreadable"] >= 1 and skipped["short_shard"] >= 1 and skipped["bad_label"] == 0, skipped
    # validation embeds the train split too and says what it could not read
    assert re.search(r"warning: validation read (\d+) of the (\d+) train samples: \d+ skipped", out2), out2[-4000:]


@pytest.mark.slow
def test_stuck_rank_makes_survivor_fail_after_collective_timeout(tmp_path, shards):
    """Rank 1 frozen (SIGSTOP) on another "machine": nobody kills rank 0, the collective timeout must."""
    timeout_s = 10
    config = write_config(tmp_path / "run.yaml", shards, epochs=100, max_steps=400, ckpt_every=2, val_every=100,
                          collective_timeout_s=timeout_s)
    run_dir, logs, procs = launch_on_two_machines(config, tmp_path)
    try:
        wait_for_checkpoint(run_dir, procs, logs[0])
        frozen = rank_process(procs[1], 1)
        frozen.suspend()  # SIGSTOP: alive, sockets open, never answers again
        stopped_at = time.time()
        try:
            procs[0].wait(timeout=timeout_s + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 hangs {timeout_s + 60} s after rank 1 froze:\n{logs[0].read_text()[-4000:]}")
        elapsed = time.time() - stopped_at
    finally:
        for p in procs:
            kill_tree(p)
    out = logs[0].read_text()
    assert procs[0].returncode != 0
    assert elapsed < timeout_s + 60, elapsed
    lines = error_lines(out)
    assert len(lines) == 1, out[-4000:]
    assert lines[0].startswith("error: rank 0: lost contact with another process during training ("), lines[0]
    assert "resume with resume=true" in lines[0]
    assert 'embed.py", line' not in out, "no traceback from the rank, only the launcher's own report"


@pytest.mark.slow
def test_sigterm_to_a_rank_blocked_in_a_collective_exits_within_the_grace_time(tmp_path, shards):
    """Rank 1 frozen, rank 0 waiting for it inside a gloo collective (C++, where Python runs no
    signal handler): SIGTERM to rank 0 must end it within TERM_GRACE_S, not collective_timeout_s."""
    from toolkit.engine.failures import TERM_GRACE_S

    timeout_s = 120
    config = write_config(tmp_path / "run.yaml", shards, epochs=100, max_steps=400, ckpt_every=2, val_every=100,
                          collective_timeout_s=timeout_s)
    run_dir, logs, procs = launch_on_two_machines(config, tmp_path)
    try:
        wait_for_checkpoint(run_dir, procs, logs[0])
        rank_process(procs[1], 1).suspend()  # rank 0 is soon blocked in the next collective
        time.sleep(2)
        rank_process(procs[0], 0).send_signal(signal.SIGTERM)
        sent = time.time()
        try:
            procs[0].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running {timeout_s} s after SIGTERM:\n{logs[0].read_text()[-4000:]}")
        elapsed = time.time() - sent
    finally:
        for p in procs:
            kill_tree(p)
    out = logs[0].read_text()
    assert elapsed < TERM_GRACE_S + 10, (elapsed, out[-3000:])
    lines = error_lines(out)
    assert len(lines) == 1, out[-4000:]
    assert lines[0].startswith("error: rank 0: stopped by SIGTERM during training ("), lines[0]
    assert "resume with resume=true (the process was blocked for 5 s, in a collective or a read)" in lines[0], lines[0]


@pytest.mark.slow
def test_ranks_waiting_for_rank_0s_part_of_validation_are_not_killed_by_the_collective_timeout(tmp_path, shards):
    """Rank 0 alone saves the best embedder (a large index, a slow disk) for longer than
    collective_timeout_s: the others wait with validation_timeout_s and the run completes."""
    config = write_config(tmp_path / "run.yaml", shards, epochs=2, max_steps=0, val_every=1, collective_timeout_s=8,
                          validation_timeout_s=120)
    log = tmp_path / "run.log"
    proc = launch_two(config, f"run_dir={tmp_path / 'run'}", log=log, script=(SCRIPTS / "slow_rank0_save.py", 12))
    out = finish(proc, log, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, out[-4000:]
    assert not error_lines(out), out[-3000:]
    assert "best kNN val accuracy" in out, out[-3000:]


def test_sigterm_mid_training_is_one_line_naming_the_checkpoint(tmp_path, shards):
    """What the launcher (or a scheduler) does to survivors: SIGTERM to the process group, a
    loader worker included. Python's default would end the run without a word."""
    config = write_config(tmp_path / "run.yaml", shards, epochs=100, max_steps=400, ckpt_every=2, val_every=100, num_workers=1)
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(LAUNCH), "--config", str(config), f"run_dir={run_dir}"],
                                stdout=subprocess.DEVNULL, stderr=f, env=env(), cwd=tmp_path, start_new_session=True)
    try:
        wait_for_checkpoint(run_dir, [proc], log)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        kill_tree(proc)
    err = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-4000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-4000:]
    n = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    assert lines[0].startswith("error: rank 0: stopped by SIGTERM during training (")
    assert lines[0].endswith(f"last complete checkpoint: step {n}; resume with resume=true")
    assert CheckpointManager(run_dir / "checkpoints").load_latest()["step"] == n


# ----------------------------------------------------------------------------- 2. atomic checkpoints

SLOW_SAVE = r"""
import io, sys, time
from pathlib import Path
import torch
from toolkit.checkpoint import CheckpointManager

folder, flag = Path(sys.argv[1]), Path(sys.argv[2])
manager = CheckpointManager(folder, keep_last=3)
for step in (1, 2):
    manager.save({"step": step, "w": torch.full((256, 256), float(step))}, step)
real_save = torch.save

def slow_save(obj, f, *args, **kwargs):  # half the bytes reach the disk, then the process is killed
    buf = io.BytesIO()
    real_save(obj, buf)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    flag.touch()
    time.sleep(600)
    f.write(data[len(data) // 2 :])

torch.save = slow_save
manager.save({"step": 3, "w": torch.full((256, 256), 3.0)}, 3)
"""


def test_kill_in_the_middle_of_a_checkpoint_save_keeps_the_previous_one(tmp_path):
    folder, flag = tmp_path / "checkpoints", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(folder), str(flag)], env=env())
    try:
        deadline = time.time() + 120
        while not flag.exists():
            assert proc.poll() is None, "the writer died before the slow save"
            assert time.time() < deadline, "the slow save never started"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no exception handler, no cleanup runs
        proc.wait()
    manager = CheckpointManager(folder, keep_last=3)
    assert manager.latest() == folder / "step-000000002.pt"
    state = manager.load_latest()
    assert state["step"] == 2 and torch.equal(state["w"], torch.full((256, 256), 2.0))
    assert json.loads((folder / "latest.json").read_text())["step"] == 2
    assert not (folder / "step-000000003.pt").exists(), "a partial file must never carry a step name"
    leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".step-000000003.pt."), leftovers
    # The next save (the resumed run's) removes the dead save's temp file.
    manager.save({"step": 3, "w": torch.zeros(1)}, 3)
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step-000000001.pt", "step-000000002.pt", "step-000000003.pt"]


# ----------------------------------------------------------------------------- 4. non-finite loss (+ 2: resume)


@pytest.fixture(scope="module")
def nan_stopped_run(shards, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """A run whose 5th loss is NaN: checkpoints at steps 2 and 4, then it must stop at step 5."""
    tmp = tmp_path_factory.mktemp("nan-run")
    config = write_config(tmp / "run.yaml", shards, epochs=100, max_steps=8, ckpt_every=2, keep_last=3, val_every=100)
    run_dir = tmp / "run"
    result = run_single("5", "--config", config, f"run_dir={run_dir}", cwd=tmp, script=SCRIPTS / "nonfinite_loss.py")
    return config, run_dir, result


def test_nonfinite_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(nan_stopped_run):
    _, run_dir, result = nan_stopped_run
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-4000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-4000:]
    assert re.match(r"error: non-finite loss \(nan\): stopped before the update at step 5; last good checkpoint: .*step-000000004\.pt", lines[0]), lines[0]
    assert train_steps(read_metrics(run_dir)) == [1, 2, 3, 4], "the poisoned step must not be logged or taken"
    assert sorted(step_files(run_dir)) == [2, 4], "nothing may be saved after the NaN"
    manager = CheckpointManager(run_dir / "checkpoints")
    assert manager.latest() == run_dir / "checkpoints" / "step-000000004.pt"
    state = manager.load_latest()
    assert state["step"] == 4 and all_finite(state["model"])


def test_resume_passes_over_a_truncated_newest_checkpoint(nan_stopped_run, tmp_path):
    config, stopped, _ = nan_stopped_run
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    newest = run_dir / "checkpoints" / "step-000000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a save cut short (disk full, power cut)
    result = run_single("--config", config, f"run_dir={run_dir}", "resume=true", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "skipping unusable checkpoint" in out and "step-000000004.pt" in out, out[-4000:]
    assert "resumed from step 2 " in out, out[-4000:]
    # steps 3 and 4 of the first run came after the checkpoint resumed from: logged once, by the resume
    assert train_steps(read_metrics(run_dir)) == list(range(1, 9))
    assert safe_load(run_dir / "checkpoints" / "step-000000008.pt")["step"] == 8


def test_nonfinite_loss_skip_mode_skips_only_that_step(shards, tmp_path):
    config = write_config(tmp_path / "run.yaml", shards, epochs=100, max_steps=4, ckpt_every=2, val_every=100, on_nonfinite="skip")
    run_dir = tmp_path / "run"
    result = run_single("3", "--config", config, f"run_dir={run_dir}", cwd=tmp_path, script=SCRIPTS / "nonfinite_loss.py")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "warning: non-finite loss at step 3, step skipped (1 so far)" in out, out[-4000:]
    assert train_steps(read_metrics(run_dir)) == [1, 2, 3, 4], "the budget counts updates, not poisoned batches"
    state = CheckpointManager(run_dir / "checkpoints").load_latest()
    assert state["step"] == 4 and all_finite(state["model"]) and all_finite(state["optimizer"]["state"][0])


# ----------------------------------------------------------------------------- 3. corrupt data at training time


def test_strict_data_stops_at_the_first_damaged_shard_naming_it(tmp_path, corrupt_shards):
    folder, _ = corrupt_shards
    config = write_config(tmp_path / "run.yaml", folder, epochs=2, num_workers=1)  # a loader worker: its error is relayed
    run_dir = tmp_path / "run"
    result = run_single("--config", config, f"run_dir={run_dir}", "strict_data=true", cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-4000:]
    assert re.match(r"error: corrupt shard data in train-00000[01]\.tar", lines[0]), lines[0]
    assert "strict_data is on" in lines[0]
    assert not step_files(run_dir), "nothing trained on, nothing saved"


def test_truncated_shard_is_reported_not_read_as_a_shorter_one(tmp_path):
    """tarfile reads a tar cut at a member boundary as a complete, shorter archive: no error at all."""
    from toolkit.errors import DataError
    from toolkit.data.stream import ShardStream, make_loader

    folder = tmp_path / "shards"
    craft_shards(folder, {"val": [10, 10]}, num_classes=2)
    shard = folder / "val-000001.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[9].offset  # header of the 4th sample (3 members per sample)
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.warns(UserWarning, match=r"val-000001\.tar .*only 3 of 10 samples found"):
        keys = [k for ks, _, _ in make_loader(ShardStream(folder, split="val", mode="eval"), num_workers=0) for k in ks]
    assert len(keys) == 13
    # Train mode re-reads the damage on every pass: counted each time, warned once.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = ShardStream(folder, split="val", mode="train", batch_size=4, P=2, K=2)
        assert len(list(make_loader(s, num_workers=0))) == s.steps_per_epoch() == 5  # 20 // 4: the promised length
    damage = [str(w.message) for w in caught if "skipping unreadable" in str(w.message)]
    assert len(damage) == 1, damage
    assert s.skip_counts()["short_shard"] >= 2, "every pass over the damaged shard is counted"
    with pytest.raises(DataError, match=r"corrupt shard data in val-000001\.tar .*only 3 of 10"):
        list(make_loader(ShardStream(folder, split="val", mode="eval", strict=True), num_workers=0))


# ----------------------------------------------------------------------------- 5. bad configuration


@pytest.fixture(scope="module")
def launch_main():
    import runpy

    return runpy.run_path(str(LAUNCH), run_name="reliability_launch")["main"]


BAD_CONFIGS = {
    "unknown key": (["lrr=0.1"], "unknown config key 'lrr' (did you mean 'lr'?)"),
    "int of a word": (["batch_size=abc"], "batch_size: expected int, got 'abc'"),
    "truncated int": (["K=2.5"], "K: expected int, got '2.5'"),
    "float of a word": (["lr=fast"], "lr: expected float, got 'fast'"),
    "bool of a word": (["strict_data=perhaps"], "strict_data: expected bool, got 'perhaps'"),
    "not a choice": (["on_nonfinite=ignore"], "on_nonfinite: 'ignore' is not one of stop, skip"),
    "lr zero": (["lr=0"], "lr must be > 0, got 0.0"),
    "lr negative": (["lr=-1e-3"], "lr must be > 0, got -0.001"),
    "margin zero": (["margin=0"], "margin must be > 0, got 0.0"),
    "margin negative": (["--margin", "-0.2"], "margin must be > 0, got -0.2"),
    "K below 2": (["K=1"], "K must be >= 2"),
    "P×K over batch": (["P=5", "K=4", "batch_size=16"], "P×K = 5×4 = 20 is larger than batch_size=16"),
    "more classes than exist": (["P=5", "K=4", "batch_size=64"], "P=5 classes per batch requested but the shards have only 4"),
    "missing shard folder": (["shards={tmp}/no-such-shards"], "shard folder not found"),
    "missing _info.json": (["shards={tmp}/empty"], "no _info.json"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configuration_fails_before_any_work_with_one_line(case, launch_main, shards, tmp_path, capsys):
    overrides, expected = BAD_CONFIGS[case]
    (tmp_path / "empty").mkdir()
    config = write_config(tmp_path / "run.yaml", shards)
    run_dir = tmp_path / "run"
    rc = launch_main(["--config", str(config), f"run_dir={run_dir}", *(o.format(tmp=tmp_path) for o in overrides)])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    assert expected in captured.err
    assert not run_dir.exists(), "nothing may be written before the config is known good"


@pytest.mark.parametrize("fraction", ["0", "1", "1.5", "-0.1"])
def test_shard_val_fraction_outside_open_interval_is_one_line(fraction, tmp_path, capsys):
    from toolkit.cli import main

    images = make_image_folder(tmp_path / "images", {"a": 4, "b": 4})
    out = tmp_path / "shards"
    with pytest.raises(SystemExit) as exc:
        main(["shard", str(images), str(out), f"--val_fraction={fraction}", "--workers=1"])
    captured = capsys.readouterr()
    assert exc.value.code == 2
    assert captured.err.count("\n") == 1 and "val_fraction must be in (0, 1)" in captured.err, captured.err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["images"]


# ----------------------------------------------------------------------------- 6. odd images at shard time


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims ``width``×``height`` pixels over a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def stored_images(out: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """{original relative path: (stored pixels, json metadata)} over every shard of ``out``."""
    found = {}
    for tar in sorted(out.glob("*.tar")):
        for key, files in read_tar_samples(tar).items():
            meta = json.loads(files["json"])
            with Image.open(io.BytesIO(files["png"])) as im:
                assert im.mode == "L", (meta, im.mode)
                found[meta["path"]] = (np.asarray(im), meta | {"key": key})
    return found


def test_odd_image_modes_are_converted_or_reported(tmp_path):
    from toolkit.data.shards import write_shards

    d = tmp_path / "images" / "odd"
    d.mkdir(parents=True)
    Image.new("CMYK", (4, 4), (0, 0, 0, 128)).save(d / "cmyk.tif")  # K=128 -> grey 127
    Image.fromarray(np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)).save(d / "grey16.png")
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0 = red, 1 = blue
    pal.putpixel((1, 0), 1)
    pal.save(d / "palette.png")
    pal.save(d / "palette_transparent.png", transparency=0)  # red is see-through
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255)])
    rgba.save(d / "rgba.png")
    la = Image.new("LA", (2, 1))
    la.putdata([(50, 0), (50, 255)])
    la.save(d / "la.png")
    raw = np.zeros((16, 32), dtype=np.uint8)
    raw[:, 16:] = 255  # stored: dark left half; orientation 6 = show rotated 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(raw).save(d / "exif_rotated.jpg", exif=exif.tobytes(), quality=95)
    Image.new("L", (1, 1), 200).save(d / "one_pixel.png")
    (d / "bomb_error.png").write_bytes(png_claiming(30000, 30000))  # 900 M pixels: DecompressionBombError
    (d / "bomb_warning.png").write_bytes(png_claiming(10000, 10000))  # 100 M pixels: warning, made an error

    info = write_shards(tmp_path / "images", tmp_path / "shards", image_size=0, grayscale=True, workers=2, progress=False)
    stored = stored_images(tmp_path / "shards")

    def px(name):
        return stored[f"odd/{name}"][0].astype(int).tolist()

    assert px("cmyk.tif") == [[127] * 4] * 4
    assert px("grey16.png") == [[0, 128], [255, 4]], "16-bit grey is scaled to 8 bits, not clipped"
    assert px("palette.png") == [[76, 29]]  # ITU-R 601 luma of red, blue
    assert px("palette_transparent.png") == [[255, 29]], "transparent pixels become white"
    assert px("rgba.png") == [[255, 29]]
    assert px("la.png") == [[255, 50]]
    rotated = stored["odd/exif_rotated.jpg"][0]
    assert rotated.shape == (32, 16), "EXIF orientation applied: 32 wide × 16 high becomes 16 wide × 32 high"
    assert rotated[:14].mean() < 20 and rotated[18:].mean() > 235, "the stored left half is on top after the rotation"
    assert px("one_pixel.png") == [[200]]

    skipped = dict(info.skipped_files)
    assert set(skipped) == {"odd/bomb_error.png", "odd/bomb_warning.png"}
    assert "DecompressionBombError" in skipped["odd/bomb_error.png"]
    assert "DecompressionBombWarning" in skipped["odd/bomb_warning.png"]
    assert info.skipped == 2 and len(stored) == 8
    import pandas as pd

    assert set(pd.read_csv(tmp_path / "shards" / "skipped.csv")["path"]) == set(skipped)


def test_file_names_with_spaces_dots_and_non_ascii_survive_the_round_trip(tmp_path):
    from toolkit.data.shards import write_shards

    names = {
        "class one.v2": ["with space.png", "many.dots.in.the.name.png", "ünïcödé 名前.png"],
        "ñandú 日本": ["a b c.png", "x.y.png", "émoji 🙂.png"],
    }
    root = tmp_path / "images"
    for i, (cls, files) in enumerate(names.items()):
        (root / cls).mkdir(parents=True)
        for j, f in enumerate(files):
            Image.new("L", (4, 4), 40 * i + 10 * j).save(root / cls / f)
    write_shards(root, tmp_path / "shards", image_size=8, workers=1, progress=False)
    stored = stored_images(tmp_path / "shards")
    expected = {f"{cls}/{f}": cls for cls, files in names.items() for f in files}
    assert {p: meta["label"] for p, (_, meta) in stored.items()} == expected, "metadata path and class kept exactly"
    assert all(re.fullmatch(r"s\d{8}", meta["key"]) for _, meta in stored.values()), "keys are dot-free"
    info = json.loads((tmp_path / "shards" / "_info.json").read_text())
    assert info["classes"] == sorted(names)
    import pandas as pd

    manifest = pd.read_csv(tmp_path / "shards" / "manifest.csv")
    assert set(manifest["path"]) == set(expected)


# ----------------------------------------------------------------------------- 7. untrusted files


class _RunsCode:
    """Unpickling this calls exec(): what a booby-trapped checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def test_checkpoint_that_decompresses_past_the_limit_is_refused_unread(tmp_path):
    """A zip bomb named like a checkpoint: deflated members far larger than the file."""
    import resource
    import zipfile

    real = tmp_path / "real.pt"
    torch.save({"w": torch.arange(1000.0)}, real)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(bomb, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item))
        info = zipfile.ZipInfo("real/data/99")
        info.compress_type = zipfile.ZIP_DEFLATED
        with dst.open(info, "w") as f:  # 200 MiB of zeros, a MiB at a time: this test's own peak stays low
            for _ in range(200):
                f.write(bytes(1 << 20))
    assert bomb.stat().st_size < (2 << 20)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=r"bomb.pt: its members expand to 209,7\d\d,\d{3} bytes, more than the limit"):
        safe_load(bomb)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < (100 << 10), "refused before expanding (KiB)"
    assert torch.equal(safe_load(real)["w"], torch.arange(1000.0))  # a real checkpoint loads


def test_checkpoint_with_code_in_its_pickle_is_refused_and_nothing_runs(tmp_path):
    from toolkit.errors import DataError
    from toolkit.artifacts import open_run

    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoints"
    manager = CheckpointManager(folder)
    manager.save({"step": 1, "w": torch.ones(2)}, 1)
    evil = folder / "step-000000002.pt"
    torch.save({"step": 2, "model": {}, "config": {}, "trap": _RunsCode(marker)}, evil)
    (folder / "latest.json").write_text(json.dumps({"step": 2, "file": evil.name}))

    with pytest.raises(CheckpointError, match="weights_only loading refuses"):
        safe_load(evil)
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        assert manager.latest() == folder / "step-000000001.pt", "resume falls back to the good one"
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(evil, run / "best_embedder.pt")
    with pytest.raises(DataError, match="refuses"):
        open_run(run)  # evaluate / predict / classify load models this way
    assert not marker.exists(), "loading must never execute code from a checkpoint"
    torch.load(evil, weights_only=False)  # control: the trap is real
    assert marker.read_text() == "code ran"


def test_checkpoint_pointer_cannot_lead_outside_its_folder(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    manager = CheckpointManager(folder)
    manager.save({"step": 1}, 1)
    torch.save({"step": 99}, tmp_path / "elsewhere.pt")
    (folder / "latest.json").write_text(json.dumps({"step": 99, "file": "../../elsewhere.pt"}))
    with pytest.warns(UserWarning, match="missing elsewhere.pt"):
        assert manager.load_latest()["step"] == 1


def test_hostile_file_names_stay_plain_keys_inside_the_shards(tmp_path):
    from toolkit.data.shards import write_shards

    root = tmp_path / "images"
    hostile = {
        "a\\..\\..\\evil": ["x\\..\\..\\..\\escape.png", "%2e%2e%2fup.png"],
        "normal": ["b\\..\\c.png", "-rf .png"],
    }
    for cls, files in hostile.items():
        (root / cls).mkdir(parents=True)
        for f in files:
            Image.new("L", (4, 4), 99).save(root / cls / f, format="PNG")
    before = sorted(p.name for p in tmp_path.iterdir())
    write_shards(root, tmp_path / "out" / "shards", image_size=8, workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["out"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["shards"], "nothing written beside the output"
    members = []
    for tar in (tmp_path / "out" / "shards").glob("*.tar"):
        with tarfile.open(tar) as t:
            members += t.getnames()
    assert len(members) == 3 * 4
    assert all(re.fullmatch(r"s\d{8}\.(png|cls|json)", m) for m in members), members
    stored = stored_images(tmp_path / "out" / "shards")
    assert set(stored) == {f"{cls}/{f}" for cls, files in hostile.items() for f in files}, "original names kept as data"


@pytest.mark.parametrize("message", ["Application timeout caused pair closure", "[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234"])
def test_what_gloo_says_about_a_stuck_or_dead_peer_is_one_line(message, tmp_path):
    """gloo words a peer that stopped answering in several ways (seen: the first one, from a
    SIGSTOPped rank): each must give the one `lost contact` line, not a traceback."""
    from toolkit.engine.failures import failure_line

    status, line = failure_line(RuntimeError(message), rank=0, world=2, run_dir=tmp_path)
    assert status == 1 and line.startswith("error: rank 0: lost contact with another process during training (")
    assert "resume with resume=true" in line
