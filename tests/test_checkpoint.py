"""Checkpoints survive kills mid-save, load with weights_only, and resume RNG streams exactly."""
from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch

from toolkit import files
from toolkit.checkpoint import CheckpointManager, capture_rng, restore_rng
from toolkit.errors import CheckpointError
from toolkit.files import atomic_torch_save, atomic_write_json, atomic_write_text, safe_load


def _tiny_training_state(step: int = 7) -> dict:
    """A complete state like the loops save: model, optimizer (with moments), RNG, config."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()  # populates exp_avg / exp_avg_sq so the optimizer state is non-trivial
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": capture_rng(),
        "step": step,
        "epoch": 1,
        "config": {"model": {"dim": 128, "act": "leaky_relu"}, "lr": 0.01, "tags": ["a", "b"], "resume": None, "amp": False},
    }


def test_round_trip_through_weights_only_load(tmp_path):
    state = _tiny_training_state()
    path = atomic_torch_save(state, tmp_path / "ck.pt")
    loaded = safe_load(path)  # weights_only=True inside: would raise if anything were unsafe

    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v), k
    exp_avg = state["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], exp_avg)
    assert loaded["optimizer"]["param_groups"][0]["lr"] == 0.01
    assert loaded["config"] == state["config"]
    assert loaded["step"] == 7 and loaded["epoch"] == 1
    # numpy's state must have been converted to builtins, or weights_only would have refused it
    assert isinstance(loaded["rng"]["numpy"]["keys"], list) and len(loaded["rng"]["numpy"]["keys"]) == 624

    # and the loaded optimizer state really restores into a fresh optimizer
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    model.load_state_dict(loaded["model"])
    opt = torch.optim.Adam(model.parameters())
    opt.load_state_dict(loaded["optimizer"])
    assert opt.param_groups[0]["lr"] == 0.01


def test_restore_rng_repeats_every_stream(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.randn()  # leaves a cached gaussian in numpy's state: must survive too
    state = capture_rng()
    first = (torch.rand(3), random.random(), np.random.rand(3), np.random.randn())

    # go through a file, as a resume would
    atomic_torch_save({"rng": state}, tmp_path / "rng.pt")
    torch.rand(10), random.random(), np.random.rand(10)  # advance everything
    restore_rng(safe_load(tmp_path / "rng.pt")["rng"])
    second = (torch.rand(3), random.random(), np.random.rand(3), np.random.randn())

    assert torch.equal(first[0], second[0])
    assert first[1] == second[1]
    np.testing.assert_array_equal(first[2], second[2])
    assert first[3] == second[3]


def test_keep_last_two_and_pointer_at_newest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save_best({"acc": torch.tensor(0.9)})
    for step in (10, 20, 30, 40):
        written = mgr.save({"step": step}, step=step)
        assert written.name == f"step-{step:09d}.pt"

    names = sorted(p.name for p in tmp_path.glob("step-*.pt"))
    assert names == ["step-000000030.pt", "step-000000040.pt"]
    assert (tmp_path / "best.pt").is_file()  # pruning never touches best*
    assert json.loads((tmp_path / "latest.json").read_text()) == {"step": 40, "file": "step-000000040.pt"}
    assert mgr.latest() == tmp_path / "step-000000040.pt"
    assert mgr.load_latest()["step"] == 40
    assert float(safe_load(tmp_path / "best.pt")["acc"]) == pytest.approx(0.9)


def test_pruning_never_deletes_the_file_just_written(tmp_path):
    # A run restarted from an early checkpoint writes a *smaller* step number than what is on disk.
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (100, 200):
        mgr.save({"step": step}, step=step)
    mgr.save({"step": 50}, step=50)
    assert (tmp_path / "step-000000050.pt").is_file()
    assert mgr.load_latest()["step"] == 50  # pointer wins over "highest number"


def test_truncated_newest_falls_back_to_previous_good(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save({"step": 1, "w": torch.ones(100)}, step=1)
    newest = mgr.save({"step": 2, "w": torch.ones(100)}, step=2)
    # Simulate a kill mid-write on a filesystem without atomic rename: a cut-off zip.
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])

    with pytest.warns(UserWarning, match="step-000000002.pt"):
        assert mgr.latest() == tmp_path / "step-000000001.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert mgr.load_latest()["step"] == 1


def test_garbage_file_and_missing_pointer_target(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save({"step": 1}, step=1)
    mgr.save({"step": 2}, step=2)
    (tmp_path / "step-000000002.pt").write_bytes(b"\x00garbage" * 10)
    (tmp_path / "latest.json").write_text('{"step": 3, "file": "step-000000003.pt"}')  # points at nothing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert mgr.load_latest()["step"] == 1

    with pytest.raises(CheckpointError, match=r"step-000000002\.pt: unreadable"):
        safe_load(tmp_path / "step-000000002.pt")


def test_empty_directory_has_nothing_to_resume(tmp_path):
    assert CheckpointManager(tmp_path / "none-yet").latest() is None
    assert CheckpointManager(tmp_path / "none-yet").load_latest() is None


def test_atomic_save_leaves_no_temp_files(tmp_path):
    atomic_torch_save({"x": torch.arange(3)}, tmp_path / "a.pt")
    atomic_write_text(tmp_path / "b.txt", "hello\n")
    atomic_write_json(tmp_path / "c.json", {"k": [1, 2]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.txt", "c.json"]
    assert (tmp_path / "b.txt").read_text() == "hello\n"
    assert json.loads((tmp_path / "c.json").read_text()) == {"k": [1, 2]}


def test_crash_during_save_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    atomic_torch_save({"version": 1}, target)
    good_bytes = target.read_bytes()

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")  # partial bytes reach the temp file ...
        raise KeyboardInterrupt("killed mid-save")  # ... then the process is interrupted

    monkeypatch.setattr(files.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"version": 2}, target)

    assert target.read_bytes() == good_bytes
    assert safe_load(target) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # temp file cleaned up


class _Arbitrary:
    def __init__(self):
        self.payload = "could have been os.system"


def test_pickled_arbitrary_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": _Arbitrary()}, path)  # plain torch.save pickles the class reference
    with pytest.raises(CheckpointError, match=r"evil\.pt: .*weights_only"):
        safe_load(path)
