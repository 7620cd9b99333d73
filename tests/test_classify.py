"""Classifier head on a frozen embedder: the embedder never changes, the head learns, two
processes work, and bad inputs stop the launch before any work."""
from __future__ import annotations

import json

import pytest
import torch

from classify_helpers import ROOT, make_separable_folder, run_launch, shard, shared_classify_run, shared_embed_run
from conftest import launch_two_cpu
from toolkit.files import safe_load
from toolkit.config import ClassifyConfig
from toolkit.tracking import make_tracker, read_metrics

TIMEOUT_S = 240


def test_fit_head_leaves_the_embedder_bit_identical(tmp_path, tmp_path_factory, monkeypatch):
    from accelerate import Accelerator

    import toolkit.engine.classify as classify

    base = shared_embed_run(tmp_path_factory)
    saved = safe_load(base["embed"] / "best_embedder.pt")["model"]
    bn_vars = [v for k, v in saved.items() if k.endswith("running_var")]
    assert bn_vars and not all(torch.equal(v, torch.ones_like(v)) for v in bn_vars), "BN stats must be non-default to be a real check"

    captured = {}

    def spy(*args, **kwargs):  # keep the very module fit_head trains with
        model, payload = real(*args, **kwargs)
        captured["model"] = model
        return model, payload

    real = classify.load_embedder
    monkeypatch.setattr(classify, "load_embedder", spy)
    cfg = ClassifyConfig(embedder=str(base["embed"]), run_dir=str(tmp_path / "cls"), epochs=2, batch_size=16,
                         num_workers=0, tracker="none", progress=False)
    with make_tracker(enabled=True, kind="none", run_dir=cfg.run_dir, config={}, project="test") as tracker:
        summary = classify.fit_head(cfg, Accelerator(cpu=True), tracker)
    assert summary["steps"] == 2 * (72 // 16) and summary["epochs"] == 2

    model = captured["model"]
    after = model.state_dict()
    assert after.keys() == saved.keys()
    changed = [k for k in saved if not torch.equal(after[k].cpu(), saved[k])]
    assert not changed, f"frozen embedder changed: {changed[:5]}"
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules()), "embedder left eval mode"

    # the head was trained and saved; the comparison above would have caught a train-mode pass
    payload = safe_load(tmp_path / "cls" / "best_head.pt")
    assert {"head", "config", "classes", "metrics"} <= payload.keys()
    assert payload["embedder"] == str((base["embed"] / "best_embedder.pt").resolve())
    key = next(k for k in saved if k.endswith("running_mean"))
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 1, 16, 16))
    assert not torch.equal(model.state_dict()[key], saved[key])


@pytest.mark.parametrize("cache", [True, False])
def test_train_embeddings_are_computed_once_when_cached(cache, tmp_path, tmp_path_factory, monkeypatch):
    from accelerate import Accelerator

    import toolkit.engine.classify as classify

    base = shared_embed_run(tmp_path_factory)
    embedded = []

    def spy(*args, **kwargs):  # count the images the frozen embedder sees
        model, payload = real(*args, **kwargs)
        model.register_forward_hook(lambda mod, inp, out: embedded.append(inp[0].shape[0]))
        return model, payload

    real = classify.load_embedder
    monkeypatch.setattr(classify, "load_embedder", spy)
    cfg = ClassifyConfig(embedder=str(base["embed"]), run_dir=str(tmp_path / "cls"), epochs=3, batch_size=16,
                         num_workers=0, tracker="none", progress=False, cache_embeddings=cache)
    with make_tracker(enabled=True, kind="none", run_dir=cfg.run_dir, config={}, project="test") as tracker:
        summary = classify.fit_head(cfg, Accelerator(cpu=True), tracker)
    steps_per_epoch = 72 // 16
    assert summary["steps"] == 3 * steps_per_epoch and summary["epochs"] == 3
    from toolkit.data.shards import read_info

    n_val = read_info(base["shards"]).splits["val"].num_samples
    train_seen = sum(embedded) - n_val
    assert train_seen == (1 if cache else 3) * steps_per_epoch * 16
    assert summary["best_val_accuracy"] > 0.5  # replayed epochs still train the head


def test_head_reaches_high_accuracy_and_logs_curves(tmp_path_factory):
    run_dir = shared_classify_run(tmp_path_factory)  # launch/classify.py, 8 epochs, 1 process
    payload = safe_load(run_dir / "best_head.pt")
    assert payload["metrics"]["val/accuracy"] >= 0.95
    epochs = [r for r in read_metrics(run_dir) if "val/accuracy" in r]
    assert [r["epoch"] for r in epochs] == list(range(1, 9))
    for r in epochs:
        assert {"train/loss", "train/accuracy", "val/loss", "val/accuracy"} <= r.keys()
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"]
    assert epochs[-1]["val/loss"] < epochs[0]["val/loss"]
    # the best head on disk is the best epoch logged
    assert payload["metrics"]["val/accuracy"] == max(r["val/accuracy"] for r in epochs)


def test_launch_refuses_other_classes_and_an_existing_run(tmp_path, tmp_path_factory, capsys):
    base = shared_embed_run(tmp_path_factory)
    other = shard(make_separable_folder(tmp_path / "img", per_class=4, classes=("down", "left", "right", "sideways")), tmp_path / "other")
    rc, _ = run_launch("classify", [f"embedder={base['embed']}", f"shards={other}", f"run_dir={tmp_path / 'a'}", "tracker=none"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing from the model: sideways" in err and "up" in err
    assert not (tmp_path / "a").exists(), "work started before the check"

    done = shared_classify_run(tmp_path_factory)
    rc, _ = run_launch("classify", [f"embedder={base['embed']}", f"run_dir={done}", "tracker=none"])
    assert rc == 2 and "overwrite=true" in capsys.readouterr().err
    # never inside the embedding run: overwrite would wipe its metrics
    rc, _ = run_launch("classify", [f"embedder={base['embed']}", f"run_dir={base['embed']}", "tracker=none", "overwrite=true"])
    assert rc == 2 and "its own folder" in capsys.readouterr().err
    assert (base["embed"] / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_two_process_classifier_run(tmp_path, tmp_path_factory):
    base = shared_embed_run(tmp_path_factory)
    run_dir = tmp_path / "cls2"
    res = launch_two_cpu(
        ROOT / "launch" / "classify.py", f"embedder={base['embed']}", f"run_dir={run_dir}", "epochs=8", "batch_size=16",
        "num_workers=1", "tracker=none", "progress=false", "collective_timeout_s=120",
        timeout=TIMEOUT_S, what="two-process classifier run",
    )
    assert res.returncode == 0, res.stdout[-4000:]

    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    # 72 train images / (2 ranks × 16) = 2 steps per epoch on each rank
    epochs = [r for r in read_metrics(run_dir) if "val/accuracy" in r]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(e, 2 * e) for e in range(1, 9)]
    payload = safe_load(run_dir / "best_head.pt")
    assert payload["metrics"]["val/accuracy"] >= 0.9
    report = json.loads((run_dir / "report.json").read_text())
    assert report["num_samples"] == 24 and report["head_accuracy"] >= 0.9


def test_wandb_agent_trials_get_their_own_folder_before_it_is_checked(tmp_path, tmp_path_factory, monkeypatch):
    # A W&B agent starts every trial with the same command. The base run_dir already holds a
    # finished head (an earlier trial, or a plain run): the trial must neither be refused nor
    # write over it, but go to run_dir/sweep-<sweep id>/<run id>.
    base = shared_embed_run(tmp_path_factory)
    run_dir = tmp_path / "cls"
    run_dir.mkdir()
    (run_dir / "best_head.pt").write_bytes(b"an earlier run's head")
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_RUN_ID", "run7")
    rc, out = run_launch("classify", [
        f"embedder={base['embed']}", f"run_dir={run_dir}", "max_steps=2", "epochs=0", "batch_size=16",
        "num_workers=0", "tracker=none", "progress=false",
    ])
    assert rc == 0, out
    assert (run_dir / "best_head.pt").read_bytes() == b"an earlier run's head"
    assert (run_dir / "sweep-abc123" / "run7" / "best_head.pt").is_file()
