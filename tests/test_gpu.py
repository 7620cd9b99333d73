"""On a CUDA GPU: compile and channels_last in bf16, a short training run, channels_last
evaluation, and ``toolkit bench gpu`` end to end. Marked ``gpu``; skipped without CUDA.

``.ci/gpu_check.sh`` runs these (``-m gpu``) and then the full ``toolkit bench gpu``. The
compiled test uses the bench's shapes (ZFNet at 220×220, batch 128, bf16 autocast,
channels_last), so the bench then finds those kernels in inductor's cache.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[1]


def _toolkit(*args, timeout: float = 300, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "toolkit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1)


def test_compiled_channels_last_bf16_matches_eager_at_220():
    """The seed recipe's step on the GPU (uint8 batch -> to_model_input at 220, channels_last,
    bf16 autocast, train mode): torch.compile agrees with eager within bf16 rounding."""
    import copy

    from toolkit.bench.step import make_batches
    from toolkit.data.transforms import to_model_input
    from toolkit.models import build_embedder

    torch.manual_seed(0)
    eager = build_embedder(arch="zfnet", in_channels=1, input_size=220).cuda().to(memory_format=torch.channels_last)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    images, _ = make_batches(1, batch_size=128, K=4, channels=1, size=32, seed=0)[0]
    x = to_model_input(images.cuda(), input_size=220, channels_last=True)
    w = torch.randn(128, 128, device="cuda")
    outs = []
    for net in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            emb = net(x)
        (emb.float() * w).sum().backward()
        outs.append(emb.detach())
    assert outs[1].shape == (128, 128) and torch.isfinite(outs[1]).all()
    assert _cosines(outs[0], outs[1]).min() > 0.99
    ge = torch.cat([p.grad.flatten() for p in eager.parameters()])
    gc = torch.cat([p.grad.flatten() for p in twin.parameters()])
    assert torch.isfinite(gc).all() and (gc - ge).norm() <= 0.05 * ge.norm()


def test_channels_last_evaluation_matches_contiguous(tmp_path):
    """embed_split (the validator's and `toolkit evaluate`'s embedding) with channels_last on CUDA."""
    from test_embed import make_quadrant_shards
    from toolkit.evaluation import embed_split
    from toolkit.models import build_embedder

    shards = make_quadrant_shards(tmp_path)
    torch.manual_seed(0)
    model = build_embedder(arch="zfnet", in_channels=1, input_size=32).cuda().eval()
    kw = dict(shards=str(shards), split="val", rank=0, world_size=1, device=torch.device("cuda"), input_size=32,
              num_workers=0)
    keys, plain, _ = embed_split(model, **kw)
    keys_cl, cl, _ = embed_split(model.to(memory_format=torch.channels_last), **kw, channels_last=True)
    assert keys == keys_cl and len(keys) == 12
    assert _cosines(plain, cl).min() > 0.999  # TF32 convolutions and cuDNN's algorithms differ per layout


def test_short_bf16_run_with_compile_and_channels_last(tmp_path):
    """`precision=bf16 compile=true channels_last=true` trains, validates and saves on the GPU."""
    from test_embed import launch_python, make_quadrant_shards, write_config
    from toolkit.files import safe_load
    from toolkit.models import ZFNet

    shards = make_quadrant_shards(tmp_path)
    config = write_config(tmp_path / "run.yaml", shards, max_steps=4, epochs=0, precision="bf16", compile=True,
                          channels_last=True)
    r = launch_python("--config", config, f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-5000:]
    assert "on cuda, precision bf16" in r.stdout, r.stdout[-3000:]
    best = safe_load(tmp_path / "run" / "best_embedder.pt")
    assert best["model"].keys() == ZFNet(input_size=16).state_dict().keys()  # no "_orig_mod." names
    assert all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())


def test_bench_gpu_runs_its_matrix_small(tmp_path):
    """`toolkit bench gpu` on CUDA at 64×64, eager (the compiled rows run in the full bench): every
    configuration timed, shares of the bf16 peak, the loader's rows, JSON on stdout and in --out."""
    out = tmp_path / "gpu.json"
    r = _toolkit("bench", "gpu", "--input_size", 64, "--batch_size", 32, "--warmup", 1, "--steps", 3,
                 "--dtypes", "bf16,fp32", "--compile", "false", "--loader_batches", 8, "--workers", 2, "--out", out,
                 env_extra={"TOOLKIT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["skipped"] is False and json.loads(out.read_text()) == report
    rows = report["train"]
    assert [(x["dtype"], x["channels_last"], x["compiled"]) for x in rows] == [
        ("bf16", False, False), ("bf16", True, False), ("fp32", False, False), ("fp32", True, False)]
    for row in rows:
        assert row["images_per_s"] > 0, row
        share = row["share_of_bf16_peak"]
        if report["peak_tflops"] == "unknown":  # a GPU missing from PEAK_TFLOPS
            assert share == "unknown", row
        else:
            assert 0 < share < 1, row
    assert [x["workers"] for x in report["loader"]["rows"]] == [1, 2]
    assert report["loader"]["samples_per_s"] > 0 and report["loader"]["workers_for_best_train"] >= 1
    assert "| dtype | channels_last | torch.compile | images/s per GPU |" in r.stderr
