"""Trackers besides W&B: tracker=csv|tensorboard|mlflow, offline-first, in the run folder.

What a user notices: the same records as metrics.jsonl reach the dashboard files, a resume
leaves no step twice in them, and a missing package is one line naming the extra to install.
"""
from __future__ import annotations

import csv
import importlib.util

import pytest

from toolkit.config import EmbedConfig
from toolkit.errors import ConfigError
from toolkit.tracking import METRICS_CSV, Tracker, read_metrics


def log_three(t):
    for step in (1, 2, 3):
        t.log({"train/loss": 1.0 / step, "odd,key": step, "note": "text", "nan": float("nan")}, step=step)


def test_csv_tracker_holds_every_number_of_metrics_jsonl_and_follows_a_rewind(tmp_path):
    t = Tracker(kind="csv", run_dir=tmp_path, config={"a": 1}, project="p")
    log_three(t)
    t.rewind(2)
    t.log({"train/loss": 0.3}, step=3)
    t.finish()
    with open(tmp_path / METRICS_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), r["key"], float(r["value"])) for r in rows] == [
        (1, "train/loss", 1.0), (1, "odd,key", 1.0), (2, "train/loss", 0.5), (2, "odd,key", 2.0), (3, "train/loss", 0.3)]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_tensorboard_tracker_writes_the_scalars_in_the_run_folder(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = Tracker(kind="tensorboard", run_dir=tmp_path, config={"lr": 0.001, "nested": {"k": 4}}, project="p", name="embed")
    log_three(t)
    t.finish()
    events = EventAccumulator(str(tmp_path / "tensorboard" / "embed"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [(e.step, round(e.value, 6)) for e in loss] == [(1, 1.0), (2, 0.5), (3, round(1 / 3, 6))]
    assert "nan" not in events.Tags()["scalars"] and "note" not in events.Tags()["scalars"]


@pytest.mark.parametrize("kind", ["mlflow", "tensorboard"])
def test_missing_tracker_package_is_one_line_naming_the_extra(kind, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == kind else real(name, *a))
    with pytest.raises(ConfigError, match=rf'tracker={kind} needs the {kind} package: pip install "toolkit\[{kind}\]"'):
        EmbedConfig(tracker=kind).validate()
