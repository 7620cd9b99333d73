"""The embedding loop, single process: precision choice, LR schedule, and a real short run.

The run goes through `python launch/embed.py --config <yaml> key=value ...`, the way the
README starts it, on a tiny synthetic folder whose classes are trivially separable (a bright
quadrant per class on dim noise), so "does it learn" has a firm answer in a few steps.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from toolkit.files import safe_load
from toolkit.config import EmbedConfig, load_config
from toolkit.engine.accelerator import resolve_precision
from toolkit.engine.embed import build_scheduler
from toolkit.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "embed.py"
CLASSES = ["q0", "q1", "q2", "q3"]
RUN_TIMEOUT_S = 300


# ----------------------------------------------------------------------------- helpers
# (imported by test_embed_launch.py too)


def make_quadrant_folder(root: str | Path, *, per_class: int = 20, side: int = 16, seed: int = 0) -> Path:
    """``root/q<c>/img_<i>.png``: grey noise (0-59) with quadrant ``c`` brightened by 180.

    Four classes that any embedder separates within a few steps; every image differs.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    half = side // 2
    for c, name in enumerate(CLASSES):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        r, col = divmod(c, 2)
        for i in range(per_class):
            a = rng.integers(0, 60, size=(side, side)).astype(np.uint8)
            a[r * half : (r + 1) * half, col * half : (col + 1) * half] += 180
            Image.fromarray(a, mode="L").save(d / f"img_{i:03d}.png")
    return root


def make_quadrant_shards(tmp: Path, *, per_class: int = 20) -> Path:
    """Shard the quadrant folder: 68 train (3 shards: 32, 32, 4) / 12 val samples, 16×16 grey."""
    from toolkit.data.shards import write_shards

    images = make_quadrant_folder(tmp / "images", per_class=per_class)
    out = tmp / "shards"
    write_shards(images, out, image_size=16, grayscale=True, samples_per_shard=32, workers=1, progress=False)
    return out


def write_config(path: Path, shards: Path, **overrides) -> Path:
    """A tiny CPU run config: 16×16 input, P×K = 4×4, no W&B, no worker processes."""
    cfg = {
        "shards": str(shards),
        "input_size": 16,
        "batch_size": 16,
        "K": 4,
        "num_workers": 0,
        "eval_batch_size": 32,
        "tracker": "none",
        "progress": False,
        "log_every": 1,
        "collective_timeout_s": 120,
        **overrides,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_env(**extra) -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled", **extra}


def launch_python(*args, cwd: Path, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`python launch/embed.py ARGS`, stdout and stderr merged."""
    return subprocess.run(
        [sys.executable, str(LAUNCH), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, timeout=timeout, env=run_env(),
    )


def train_steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if "train/loss" in r]


def step_files(run_dir: Path) -> dict[int, Path]:
    found = {}
    for p in (run_dir / "checkpoints").glob("step-*.pt"):
        found[int(re.fullmatch(r"step-(\d+)\.pt", p.name).group(1))] = p
    return found


# ----------------------------------------------------------------------------- pure functions


def test_precision_auto_is_fp32_on_cpu():
    # CPU bf16 autocast is 5-8x slower on CPUs without bf16 units: auto must pick fp32 there.
    assert resolve_precision("auto", cpu=True) == "no"
    assert resolve_precision("fp32", cpu=True) == "no"
    assert resolve_precision("bf16", cpu=False) == "bf16"
    assert resolve_precision("fp16", cpu=False) == "fp16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_precision_auto_on_gpu():
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert resolve_precision("auto", cpu=False) == expected


def _lrs(schedule: str, warmup: int, total: int) -> list[float]:
    """The learning rate used by each of ``total`` optimiser steps (base lr 1)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, schedule=schedule, warmup_steps=warmup, total_steps=total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    out.append(opt.param_groups[0]["lr"])  # after the last step
    return out


def test_scheduler_warmup_then_cosine():
    lrs = _lrs("cosine", warmup=4, total=12)
    # linear warm-up 1/4, 2/4, 3/4, 4/4 ...
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # ... then cosine from the peak down to 0 at total_steps
    expected = [0.5 * (1 + np.cos(np.pi * (s - 4) / 8)) for s in range(4, 13)]
    assert lrs[4:] == pytest.approx(expected, abs=1e-9)
    assert lrs[4] == pytest.approx(1.0) and lrs[8] == pytest.approx(0.5) and lrs[12] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])), "the cosine part must never increase"


def test_scheduler_warmup_then_constant():
    lrs = _lrs("constant", warmup=3, total=8)
    assert lrs == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert _lrs("cosine", warmup=0, total=4) == pytest.approx([1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.5 * (1 + np.cos(3 * np.pi / 4)), 0.0])


def test_a_time_budget_drives_the_cosine_when_it_runs_out_before_the_steps():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    clock = {"spent": 0.0}
    sched = build_scheduler(opt, schedule="cosine", warmup_steps=2, total_steps=102, time_spent=lambda: clock["spent"])
    lrs = []
    for step in range(12):
        clock["spent"] = step / 10  # the clock runs 10x faster than the 100 post-warm-up steps
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == pytest.approx([0.5, 1.0])  # warm-up by steps, as before
    # after warm-up: the time fraction (set before the previous step) is further along than the steps
    assert lrs[6] == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.5)))
    assert lrs[11] == pytest.approx(0.0, abs=1e-12)  # annealed when the clock says the budget is spent
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


# ----------------------------------------------------------------------------- one real run

# 68 train samples / batch 16 = 4 steps per epoch. epochs=3 would be 12 steps; max_steps=10
# must cut the run at exactly 10 (validations at steps 4 and 8, plus a last one at 10).
MAX_STEPS, STEPS_PER_EPOCH = 10, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_quadrant_shards(tmp_path_factory.mktemp("quadrants"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards):
    """One short single-process run shared by the tests below: (run_dir, completed process)."""
    tmp = tmp_path_factory.mktemp("embed-run")
    config = write_config(tmp / "run.yaml", shards, epochs=3, max_steps=MAX_STEPS, lr=0.001)
    run_dir = tmp / "run"
    r = launch_python("--config", config, f"run_dir={run_dir}", cwd=tmp)
    assert r.returncode == 0, r.stdout[-5000:]
    return run_dir, r


def test_short_run_learns_separable_classes(trained):
    run_dir, r = trained
    m = re.search(r"best kNN val accuracy ([0-9.]+)", r.stdout)
    assert m, r.stdout[-3000:]
    assert float(m.group(1)) >= 0.9, r.stdout[-3000:]
    val = [rec["val/knn_accuracy"] for rec in read_metrics(run_dir) if "val/knn_accuracy" in rec]
    assert val and max(val) >= 0.9
    assert "1 process(es) on" in r.stdout


def test_run_folder_holds_config_and_metrics(trained):
    run_dir, _ = trained
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["input_size"] == 16 and cfg["max_steps"] == MAX_STEPS and cfg["run_dir"] == str(run_dir)
    records = read_metrics(run_dir)
    # log_every=1: every step logged once, with a finite loss and the learning rate
    assert train_steps(records) == list(range(1, MAX_STEPS + 1))
    for rec in records:
        if "train/loss" in rec:
            assert np.isfinite(rec["train/loss"]) and rec["train/lr"] > 0
    val_steps = [rec["step"] for rec in records if "val/knn_accuracy" in rec]
    assert val_steps == [4, 8, 10]  # after each full epoch, and at the step budget
    for rec in records:
        if "val/knn_accuracy" in rec:
            assert {"val/precision_at_1", "val/map_at_r"} <= set(rec)


def test_run_config_yaml_can_be_passed_back_to_launch(trained):
    """A user reproduces a run with `--config runs/<name>/config.yaml`."""
    run_dir, _ = trained
    cfg = load_config(EmbedConfig, run_dir / "config.yaml")
    assert cfg.max_steps == MAX_STEPS and cfg.input_size == 16


def test_best_embedder_is_safe_loadable_and_complete(trained, shards):
    from toolkit.evaluation import embed_split
    from toolkit.knn import knn_accuracy
    from toolkit.models import build_embedder

    run_dir, _ = trained
    best = safe_load(run_dir / "best_embedder.pt")  # weights_only=True: no arbitrary pickles
    assert {"model", "config", "classes", "metrics", "index"} <= set(best)
    assert best["classes"] == CLASSES
    assert best["config"]["input_size"] == 16
    assert best["metrics"]["val/knn_accuracy"] >= 0.9
    emb, lab = best["index"]["embeddings"], best["index"]["labels"]
    assert emb.shape == (68, 128) and lab.shape == (68,)  # every train sample once
    assert sorted(torch.bincount(lab.long()).tolist()) == [17, 17, 17, 17]
    assert torch.allclose(emb.float().norm(dim=1), torch.ones(68), atol=1e-2)

    # the file alone is enough to predict: rebuild the model, embed val, kNN against the index
    model = build_embedder(arch=best["config"]["arch"], in_channels=1, input_size=16, embedding_dim=best["config"]["embedding_dim"])
    model.load_state_dict(best["model"])
    _, val_emb, val_y = embed_split(
        model, shards=str(shards), split="val", rank=0, world_size=1, device=torch.device("cpu"),
        input_size=16, batch_size=32, num_workers=0,
    )
    acc, _ = knn_accuracy(emb.float(), lab.long(), val_emb, val_y, k=best["config"]["knn_k"])
    assert acc >= 0.9


def test_checkpoints_respect_max_steps_exactly(trained):
    run_dir, r = trained
    files = step_files(run_dir)
    assert files, "no checkpoints/step-*.pt"
    assert max(files) == MAX_STEPS
    assert sorted(files) == [4, 8, 10]  # one per validation (ckpt_every=0), keep_last=3
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == MAX_STEPS
    state = safe_load(files[MAX_STEPS])
    assert state["step"] == MAX_STEPS
    assert {"model", "optimizer", "scheduler", "rng", "epoch", "config"} <= set(state)
    assert len(state["rng"]) == 1  # one entry per rank
    assert state["scheduler"]["last_epoch"] == MAX_STEPS  # the schedule advanced once per step
    assert max(train_steps(read_metrics(run_dir))) == MAX_STEPS
    assert f"after {MAX_STEPS} steps" in r.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS
    # What the P×K batcher did is counted for the run and per epoch: every batch it formed,
    # under its stated bound (max(32·P·K, shuffle_buffer) samples).
    pk = summary["pk_batches"]
    assert pk["emitted"] + pk["padded"] >= MAX_STEPS * 16 and pk["peak_buffered"] <= pk["bound"] == 1000, pk
    assert any("data/pk_deferred" in rec for rec in read_metrics(run_dir))


def test_run_files_are_readable_like_any_other_file(trained):
    """Artifacts honour the umask like files written with open(): a teammate (or the host
    user, for a run made inside a container) can read a shared run folder."""
    run_dir, _ = trained
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    for name in ("best_embedder.pt", "config.yaml", "metrics.jsonl"):
        mode = (run_dir / name).stat().st_mode & 0o777
        assert mode == expected, f"{name}: mode {oct(mode)}, expected {oct(expected)} (umask {oct(umask)})"


def test_rerun_into_existing_run_dir_is_refused(trained, shards, tmp_path):
    src, _ = trained
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.suffix != ".pt"}
    ckpts_before = sorted(step_files(run_dir))

    config = write_config(tmp_path / "other.yaml", shards, epochs=1, lr=0.005)
    r = launch_python("--config", config, f"run_dir={run_dir}", cwd=tmp_path)
    assert r.returncode != 0, r.stdout[-3000:]
    assert "resume=true" in r.stdout and "overwrite=true" in r.stdout, r.stdout[-3000:]
    assert str(run_dir) in r.stdout
    assert "Traceback" not in r.stdout
    assert sorted(step_files(run_dir)) == ckpts_before
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == MAX_STEPS
    # nothing of the existing run changes: not its metrics, not its config
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.suffix != ".pt"}
    assert after.keys() == before.keys()
    changed = sorted(str(k) for k in before if before[k] != after[k])
    assert changed == [], f"a refused run modified {changed}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_short_run_on_gpu_with_auto_precision(tmp_path, shards):
    config = write_config(tmp_path / "gpu.yaml", shards, epochs=2, precision="auto")
    run_dir = tmp_path / "run"
    r = launch_python("--config", config, f"run_dir={run_dir}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-5000:]
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert f"on cuda, precision {expected}" in r.stdout, r.stdout[-3000:]
    best = safe_load(run_dir / "best_embedder.pt")
    assert best["metrics"]["val/knn_accuracy"] >= 0.9
    assert all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())


def test_the_last_checkpoint_holds_the_final_validation(tmp_path):
    """max_steps on a ckpt_every step, mid-epoch: that step is saved in the loop, then the stop
    validates. The checkpoint must carry the best found then, or a resume would let a worse
    model replace best_embedder.pt."""
    import json

    from classify_helpers import make_separable_folder, run_launch, shard
    from toolkit.checkpoint import CheckpointManager

    shards = shard(make_separable_folder(tmp_path / "img", per_class=12), tmp_path / "shards")
    run_dir = tmp_path / "run"
    rc, out = run_launch("embed", [
        f"shards={shards}", f"run_dir={run_dir}", "input_size=16", "batch_size=8", "K=2", "max_steps=4", "epochs=0",
        "ckpt_every=2", "val_every=100", "num_workers=0", "tracker=none", "progress=false",
    ])
    assert rc == 0, out
    best = json.loads((run_dir / "summary.json").read_text())["best_knn_accuracy"]
    state = CheckpointManager(run_dir / "checkpoints").load_latest()
    assert state["step"] == 4 and best >= 0 and state["best"] == best


def test_a_time_budget_alone_trains_until_the_deadline(tmp_path):
    """epochs=0 max_steps=0 max_minutes=M is a valid budget: it must train (and validate), not stop at step 0."""
    import json

    from classify_helpers import make_separable_folder, run_launch, shard

    shards = shard(make_separable_folder(tmp_path / "img", per_class=12), tmp_path / "shards")
    rc, out = run_launch("embed", [
        f"shards={shards}", f"run_dir={tmp_path / 'run'}", "input_size=16", "batch_size=8", "K=2", "max_steps=0", "epochs=0",
        "max_minutes=0.05", "num_workers=0", "tracker=none", "progress=false", "schedule=cosine", "lr=0.001",
        "log_every=1",
    ])
    assert rc == 0, out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] > 0 and summary["best_knn_accuracy"] >= 0
    assert (tmp_path / "run" / "best_embedder.pt").is_file()
    # No step budget: the cosine follows the clock, from the base rate down to ~0 at the deadline.
    lrs = [r["train/lr"] for r in read_metrics(tmp_path / "run") if "train/lr" in r]
    assert lrs[0] > 0.5 * 0.001 and lrs[-1] < 0.5 * 0.001, lrs  # the last rate used the clock of the step before
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    from toolkit.checkpoint import CheckpointManager

    assert 0.05 * 60 <= CheckpointManager(tmp_path / "run" / "checkpoints").load_latest()["seconds"] < 0.05 * 60 + 30


def test_a_folder_with_an_earlier_runs_files_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    """A run killed before its first checkpoint left metrics.jsonl: starting again there would append to it."""
    from classify_helpers import make_embedder_file, make_separable_folder, run_launch, shard

    shards = shard(make_separable_folder(tmp_path / "img", per_class=8), tmp_path / "shards")
    for stage, files in (("embed", ["metrics.jsonl"]), ("classify", ["summary.json", "metrics.jsonl"])):
        run_dir = tmp_path / f"{stage}-run"
        run_dir.mkdir()
        for name in files:
            (run_dir / name).write_text("{}\n")
        if stage == "embed":
            args = [f"shards={shards}", "input_size=16"]
        else:
            args = [f"embedder={make_embedder_file(shards, tmp_path / 'emb', train_steps=1)}"]
        rc, _ = run_launch(stage, [*args, f"run_dir={run_dir}", "tracker=none", "progress=false"])
        err = capsys.readouterr().err
        assert rc == 2 and "already holds a run (" in err and files[-1] in err, err
        assert sorted(p.name for p in run_dir.iterdir()) == sorted(files), "nothing written"


def test_shards_with_a_class_without_training_images_are_refused_when_training_starts(tmp_path, capsys):
    import warnings

    from classify_helpers import make_separable_folder, run_launch, shard

    images = make_separable_folder(tmp_path / "img", per_class=8)
    (images / "broken").mkdir()
    for i in range(3):
        (images / "broken" / f"x{i}.png").write_bytes(b"not an image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sharding warns about it already
        shards = shard(images, tmp_path / "shards")
    rc, out = run_launch("embed", [f"shards={shards}", "input_size=16", f"run_dir={tmp_path / 'run'}", "tracker=none"])
    err = capsys.readouterr().err
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert err.endswith("cannot train on these shards: 1 class(es) without training images: broken\n"), err
    assert not (tmp_path / "run").exists(), "refused before anything was written"
