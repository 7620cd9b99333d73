"""Semi-hard mining cost: the toolkit's O(B²) loss vs pytorch-metric-learning, same embeddings.

For each global batch size B (128-d unit vectors, P×K labels with K = 4), times forward +
backward of ``toolkit.losses.triplet_loss(strategy="semihard")`` and of pytorch-metric-
learning's ``TripletMarginMiner(type_of_triplets="semihard")`` + ``TripletMarginLoss``
(margin 0.2 both), and measures peak memory of each in a fresh subprocess (peak RSS growth
on CPU, ``torch.cuda.max_memory_allocated`` on GPU). PML's miner enumerates all B·K·B
triplets (a B×B×B mask while that has fewer than 2³¹ elements, a per-anchor Python loop
beyond), so its cost grows as B³. Ours scans each positive's distance threshold over a block
of anchors at a time and differentiates only the chosen pairs: time grows as B² (the
``ns/B²`` column stays flat) and memory as one block plus B·K.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

DEFAULT_SIZES = (256, 1024, 2048, 4096)


def _batch(b: int, *, dim: int = 128, k: int = 4, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=1).to(device)
    labels = torch.arange(b // k).repeat_interleave(k)[:b]
    labels = labels[torch.randperm(b, generator=g)].to(device)
    return emb, labels


def _toolkit_fn():
    from toolkit.losses import triplet_loss

    return lambda e, y: triplet_loss(e, y, margin=0.2, strategy="semihard")[0]


def _pml_fn():
    try:
        from pytorch_metric_learning import losses, miners
    except ImportError as exc:  # a dev-only dependency
        raise RuntimeError("the mining benchmark needs pytorch-metric-learning: pip install pytorch-metric-learning") from exc
    miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    loss = losses.TripletMarginLoss(margin=0.2)
    return lambda e, y: loss(e, y, miner(e, y))


def _measure(side: str, b: int, repeats: int, device: str) -> dict:
    """Runs in a fresh process so peak memory belongs to this side alone."""
    import resource

    fn = _toolkit_fn() if side == "toolkit" else _pml_fn()
    emb, labels = _batch(b, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats + 1):  # first call warms up
        e = emb.clone().requires_grad_(True)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(e, labels).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"side": side, "batch": b, "seconds": min(times[1:]), "peak_bytes": max(0, peak)}


def _run_child(side: str, b: int, repeats: int, device: str, timeout: float) -> dict:
    code = (
        "import json,sys; from toolkit.bench.mining import _measure; "
        f"print(json.dumps(_measure({side!r}, {b}, {repeats}, {device!r})))"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env={**os.environ})
    except subprocess.TimeoutExpired:
        return {"side": side, "batch": b, "seconds": None, "peak_bytes": None, "error": f"over {timeout:.0f} s"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["failed"])[-1]
        return {"side": side, "batch": b, "seconds": None, "peak_bytes": None, "error": last[:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_mb(x):
    return "—" if x is None else f"{x / 2**20:.1f}"


def _fmt_per_b2(seconds, b):
    return "—" if seconds is None else f"{seconds * 1e9 / b**2:.1f}"


def _fmt_s(x):
    return "—" if x is None else f"{x * 1000:.1f}"


def main(*, sizes: str = ",".join(map(str, DEFAULT_SIZES)), repeats: int = 3, timeout: float = 120.0, device: str = "auto", out: str = "") -> dict:
    """Time and memory of semi-hard mining, toolkit vs pytorch-metric-learning.

    Args:
        sizes: comma-separated global batch sizes (e.g. 256,1024,2048,4096).
        repeats: timed repetitions per side (best is reported).
        timeout: seconds allowed per side and size (PML at large B is slow).
        device: auto (cuda if present), cpu or cuda.
        out: optional JSON output file.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # fire turns "--sizes 256,1024" into a tuple, "--sizes 256" into an int
    batch_sizes = [int(x) for x in sizes] if isinstance(sizes, (tuple, list)) else [int(x) for x in str(sizes).split(",") if x.strip()]
    rows = []
    for b in batch_sizes:
        ours = _run_child("toolkit", b, repeats, device, timeout)
        pml = _run_child("pml", b, repeats, device, timeout)
        speed = pml["seconds"] / ours["seconds"] if ours["seconds"] and pml["seconds"] else None
        # RSS growth under ~1 MiB is below what ru_maxrss resolves: no ratio rather than a silly one
        mem = pml["peak_bytes"] / ours["peak_bytes"] if (ours["peak_bytes"] or 0) >= 2**20 and pml["peak_bytes"] else None
        rows.append({"batch": b, "toolkit": ours, "pml": pml, "speedup": speed, "memory_ratio": mem})
    lines = [
        f"semi-hard mining, forward+backward, 128-d, K=4, margin 0.2, device {device}",
        "",
        "| global batch | toolkit ms | toolkit ns/B² | PML ms | speed-up | toolkit peak MB | PML peak MB | memory ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sp = "—" if r["speedup"] is None else f"{r['speedup']:.1f}×"
        mr = "—" if r["memory_ratio"] is None else f"{r['memory_ratio']:.1f}×"
        note = " ".join(x.get("error", "") for x in (r["toolkit"], r["pml"]) if x.get("error"))
        lines.append(
            f"| {r['batch']} | {_fmt_s(r['toolkit']['seconds'])} | {_fmt_per_b2(r['toolkit']['seconds'], r['batch'])} | "
            f"{_fmt_s(r['pml']['seconds'])} | {sp} | "
            f"{_fmt_mb(r['toolkit']['peak_bytes'])} | {_fmt_mb(r['pml']['peak_bytes'])} | {mr} |" + (f" {note}" if note else "")
        )
    lines.append("")
    lines.append("targets at 2048: ≥ 10× faster, ≥ 20× less peak memory")
    print("\n".join(lines))
    result = {"device": device, "rows": rows}
    if out:
        from toolkit.files import atomic_write_json

        atomic_write_json(out, result)
    return result
