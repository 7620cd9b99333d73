"""Tracking writes plain run files always, offline W&B runs when asked, and never imports wandb needlessly."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from toolkit.progress import progress
from toolkit.tracking import NullTracker, make_tracker, read_metrics, wandb_mode

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Point every W&B location at tmp_path and force offline mode: nothing escapes the test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in [
        ("WANDB_DIR", "wandb_dir"),
        ("WANDB_CACHE_DIR", "wandb_cache"),
        ("WANDB_CONFIG_DIR", "wandb_config"),
        ("WANDB_DATA_DIR", "wandb_data"),  # offline artifacts are staged here
        ("WANDB_ARTIFACT_DIR", "wandb_artifacts"),
    ]:
        monkeypatch.setenv(var, str(tmp_path / sub))
    for var in ("WANDB_API_KEY", "NETRC", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    yield tmp_path
    import wandb

    wandb.teardown()  # stop the service so the next test's env is picked up fresh


def _offline_run(run_dir: Path) -> Path:
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def _wandb_log(run_dir: Path, *expected: bytes, timeout: float = 30.0) -> bytes:
    """The offline run's .wandb log once it holds every ``expected`` byte string.

    W&B's service process writes the log; on a loaded machine the last records can land a
    moment after ``finish()`` returned (seen in CI: only the 10-byte header was there)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        data = next(_offline_run(run_dir).glob("run-*.wandb")).read_bytes()
        if all(e in data for e in expected) or time.monotonic() > deadline:
            return data
        time.sleep(0.2)


def test_offline_wandb_run_writes_files_and_run_folder(wandb_env):
    run_dir = wandb_env / "run"
    config = {"model": {"dim": 128}, "lr": 0.01, "data": Path("shards/digits"), "sizes": (32, 32)}
    tracker = make_tracker(
        enabled=True, kind="wandb", run_dir=run_dir, config=config, project="tests", name="t1", tags=["ci"], job_type="embed"
    )
    assert tracker.mode == "offline"
    tracker.log({"loss": 0.75, "lr": 0.01}, step=1)
    tracker.log({"loss": 0.5}, step=2)
    tracker.summary({"best_knn_acc": 0.9})
    tracker.finish()
    tracker.finish()  # idempotent: loops may finish in a finally after an explicit finish

    # resolved config, with Path/tuple made plain so yaml.safe_load reads it back
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == {
        "model": {"dim": 128}, "lr": 0.01, "data": "shards/digits", "sizes": [32, 32],
    }
    rows = read_metrics(run_dir)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.75), (2, 0.5)]
    assert rows[0]["lr"] == 0.01 and rows[0]["time"] <= rows[1]["time"]
    assert json.loads((run_dir / "summary.json").read_text()) == {"best_knn_acc": 0.9}

    data = _wandb_log(run_dir, b"loss", b"best_knn_acc")
    assert b"loss" in data and b"best_knn_acc" in data  # metrics and summary went to W&B's log too
    assert not (wandb_env / "home" / ".netrc").exists()  # offline never tries to log in


def test_offline_artifact_is_recorded_and_staged(wandb_env):
    run_dir = wandb_env / "run"
    model_file = wandb_env / "embedder-best.pt"
    model_file.write_bytes(b"fake weights 123")
    with make_tracker(enabled=True, kind="wandb", run_dir=run_dir, config={}, project="tests", name="t2") as tracker:
        tracker.log_artifact(model_file, name="embedder", type="model", metadata={"knn_acc": 0.9})
        model_file.write_bytes(b"overwritten later")  # the staged copy must not follow the original

    # Offline, W&B records the artifact (name, type, manifest entry) in the run's .wandb log and
    # copies the file into $WANDB_DATA_DIR/artifacts/staging; `wandb sync` uploads from there.
    data = _wandb_log(run_dir, b"embedder-best.pt", b"knn_acc")
    assert b"embedder" in data and b"embedder-best.pt" in data and b"knn_acc" in data
    staging = wandb_env / "wandb_data" / "artifacts" / "staging"
    staged = [p for p in staging.iterdir() if p.is_file()]
    assert [p.read_bytes() for p in staged] == [b"fake weights 123"]
    assert str(staged[0]).encode() in data  # the manifest points at the staged copy


def test_kind_none_writes_files_without_importing_wandb(tmp_path):
    run_dir = tmp_path / "run"
    script = f"""
import sys
from toolkit.progress import progress
from toolkit.tracking import make_tracker, read_metrics
with make_tracker(enabled=True, kind="none", run_dir={str(run_dir)!r}, config={{"k": 13}}, project="p", name=None) as t:
    t.log({{"knn_acc": 0.5}}, step=3)
    t.summary({{"best": 0.5}})
    t.log_artifact({str(run_dir / "config.yaml")!r}, name="x", type="model")  # no-op without W&B
    t.log_image("plot", "nothing.png", step=3)
    for _ in progress(range(3), enabled=False):
        pass
print(read_metrics({str(run_dir)!r}))
print("wandb" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    assert out[-1] == "False"  # `wandb` never imported
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == {"k": 13}
    rows = read_metrics(run_dir)
    assert len(rows) == 1 and rows[0]["step"] == 3 and rows[0]["knn_acc"] == 0.5
    assert json.loads((run_dir / "summary.json").read_text()) == {"best": 0.5}
    assert not (run_dir / "wandb").exists()


def test_disabled_rank_gets_null_tracker_that_writes_nothing(tmp_path):
    tracker = make_tracker(enabled=False, kind="wandb", run_dir=tmp_path / "run", config={"a": 1}, project="p", name="n")
    assert isinstance(tracker, NullTracker) and not tracker.enabled
    with tracker:
        tracker.log({"loss": 1.0}, step=1)
        tracker.summary({"x": 1})
    assert not (tmp_path / "run").exists()  # non-main ranks must not race rank 0 on the same files


def test_wandb_mode_from_env_and_netrc(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    assert wandb_mode() == "offline"  # not logged in: offline, never an interactive prompt

    netrc_file = tmp_path / ".netrc"
    netrc_file.write_text("machine example.com login user password secret\n")
    netrc_file.chmod(0o600)
    assert wandb_mode() == "offline"  # a key for another host does not count
    netrc_file.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert wandb_mode() == "online"  # `wandb login` writes exactly this

    netrc_file.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode() == "online"

    monkeypatch.setenv("WANDB_MODE", "offline")  # explicit wins over being logged in
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode() == "online"


def test_read_metrics_skips_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed mid-write
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
    assert read_metrics(tmp_path / "missing") == []


def test_progress_enabled_and_disabled(capsys):
    bar = progress(total=5, desc="steps", enabled=False)
    bar.update(2)
    bar.set_postfix(loss=0.1)
    bar.close()
    assert list(progress(range(4), enabled=False)) == [0, 1, 2, 3]
    assert capsys.readouterr().err == ""  # disabled: silent

    assert list(progress(range(4), desc="epoch", enabled=True)) == [0, 1, 2, 3]
    assert re.search(r"epoch.*4/4", capsys.readouterr().err)  # forced on: tqdm draws even without a TTY


def test_offline_table_and_image_reach_the_wandb_run(wandb_env):
    """What the report sends to W&B: the open-set table and the worst-queries PNG."""
    from PIL import Image

    run_dir = wandb_env / "run"
    png = wandb_env / "worst.png"
    Image.new("L", (8, 8)).save(png)
    with make_tracker(enabled=True, kind="wandb", run_dir=run_dir, config={}, project="tests", name="t3") as tracker:
        tracker.log({"loss": 1.0}, step=5)
        tracker.log_table("report/open_set", ["embeddings", "recall_at_1"], [["raw pixels", 0.5], ["embedder", 0.875]])
        tracker.log_image("report/worst_queries", png)
    offline = _offline_run(run_dir)
    data = _wandb_log(run_dir, b"report/open_set", b"report/worst_queries")
    assert b"report/open_set" in data and b"report/worst_queries" in data
    tables = list(offline.rglob("*.table.json"))
    assert tables, "the table is written as a W&B table file"
    content = json.loads(tables[0].read_text())
    assert content["columns"] == ["embeddings", "recall_at_1"] and content["data"][1] == ["embedder", 0.875]
