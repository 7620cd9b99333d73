"""``toolkit bench gpu``: the seed recipe on a CUDA GPU, as one JSON object (under 5 minutes).

Training images/s of the seed network (ZFNet at 220×220, one grey channel, batch 128,
semi-hard triplet loss, Adam; uint8 32×32 batches upsampled on the device by
``to_model_input``, as ``train_step`` does) in four configurations, all channels_last:
bf16 autocast and fp32, each eager and under ``torch.compile``. For each: images/s, the
achieved TFLOP/s and its share of the GPU's peak. FLOPs of one forward + backward are
counted with ``torch.utils.flop_counter.FlopCounterMode``; the peak comes from a small
table of dense (non-sparse) figures by GPU name (unknown GPU: null). fp32 convolutions run
on TF32 tensor cores when ``torch.backends.cudnn.allow_tf32`` is on (PyTorch's default), so
fp32 results carry both the plain-fp32 and the TF32 share.

Then the loader: the demo's digits shards streamed by ``ShardStream`` + ``make_loader``
(random batches of 128, several workers), each uint8 batch moved to the GPU and turned into
the (128, 1, 220, 220) model input there; images/s of that pipeline alone.

Without CUDA it prints ``{"benchmark": "gpu", "skipped": true, ...}`` and exits 0.
"""
from __future__ import annotations

import json
import os
import time

import torch

from toolkit.bench import data_root, log, require_ints

# Dense peak TFLOP/s per GPU (vendor data sheets; SXM parts unless named). Matched by
# substring of torch.cuda.get_device_name(), first match wins (so "H100 PCIe" before "H100").
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.0, "fp32": 67.0, "tf32": 494.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.0, "tf32": 378.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0, "tf32": 494.0}),
    ("GH200", {"bf16": 989.0, "fp32": 67.0, "tf32": 494.0}),
    ("A100", {"bf16": 312.0, "fp32": 19.5, "tf32": 156.0}),
    ("L40S", {"bf16": 362.0, "fp32": 91.6, "tf32": 183.0}),
    ("L4", {"bf16": 121.0, "fp32": 30.3, "tf32": 60.0}),
    ("A10", {"bf16": 125.0, "fp32": 31.2, "tf32": 62.5}),
    ("V100", {"bf16": None, "fp32": 15.7, "tf32": None}),
]


def peak_for(name: str) -> dict[str, float | None] | None:
    for key, peak in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return dict(peak)
    return None


def _emit(report: dict, out: str) -> None:
    print(json.dumps(report, indent=2))
    if out:
        from toolkit.files import atomic_write_json

        atomic_write_json(out, report)


def count_flops(model, x_uint8, labels, *, input_size: int) -> int:
    """FLOPs of one forward + backward (input conversion and loss included) on this batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from toolkit.data.transforms import to_model_input
    from toolkit.losses import triplet_loss

    with FlopCounterMode(display=False) as counter:
        x = to_model_input(x_uint8, input_size=input_size, channels_last=True)
        loss, _ = triplet_loss(model(x).float(), labels, margin=0.2, strategy="semihard")
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench_train(*, dtype: str, compiled: bool, batch_size: int, K: int, input_size: int, warmup: int,
                steps: int, seed: int, flops_per_step: int | None, peak: dict | None, device: str = "cuda") -> dict:
    """One configuration: images/s, achieved TFLOP/s and share of peak (runs on CPU too, for tests)."""
    from toolkit.bench.step import make_batches
    from toolkit.data.transforms import to_model_input
    from toolkit.losses import triplet_loss
    from toolkit.models import build_embedder

    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build_embedder(arch="zfnet", in_channels=1, input_size=input_size).to(dev)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    net = torch.compile(model) if compiled else model
    batches = [(x.to(dev), y.to(dev)) for x, y in make_batches(4, batch_size=batch_size, K=K, channels=1, size=32,
                                                                seed=seed)]
    use_bf16 = dtype == "bf16"

    def step(x, y):
        inp = to_model_input(x, input_size=input_size, channels_last=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            emb = net(inp)
        loss, _ = triplet_loss(emb.float(), y, margin=0.2, strategy="semihard")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    _sync(dev)
    t0 = time.perf_counter()
    step(*batches[0])  # compiles when compiled
    _sync(dev)
    first_s = time.perf_counter() - t0
    for i in range(warmup):
        step(*batches[i % len(batches)])
    _sync(dev)
    t0 = time.perf_counter()
    for i in range(steps):
        step(*batches[i % len(batches)])
    _sync(dev)
    elapsed = time.perf_counter() - t0
    res = {
        "dtype": dtype,
        "compiled": compiled,
        "channels_last": True,
        "first_step_s": round(first_s, 3),
        "step_ms": 1000 * elapsed / steps,
        "images_per_s": batch_size * steps / elapsed,
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }
    if flops_per_step:
        tflops = flops_per_step * steps / elapsed / 1e12
        res["achieved_tflops"] = tflops
        key = "bf16" if use_bf16 else "fp32"
        p = (peak or {}).get(key)
        res["share_of_peak"] = tflops / p if p else None
        res["peak_tflops"] = p
        if not use_bf16:
            p32 = (peak or {}).get("tf32")
            res["share_of_tf32_peak"] = tflops / p32 if p32 else None
    return res


def bench_loader(*, batch_size: int, workers: int, batches: int, input_size: int, seed: int,
                 device: str = "cuda") -> dict:
    """Shards -> uint8 batches (workers) -> GPU -> to_model_input at input_size; images/s."""
    from toolkit.bench.loader import digits_shards
    from toolkit.data.stream import ShardStream, make_loader
    from toolkit.data.transforms import to_model_input

    with data_root() as (root, _):
        shards = digits_shards(root, seed=seed)
        stream = ShardStream(shards, split="train", mode="train", batching="random", batch_size=batch_size, seed=seed)
        dev = torch.device(device)
        _sync(dev)
        t0 = time.perf_counter()
        n = 0
        loader = make_loader(stream, num_workers=workers).with_epoch(nbatches=batches)
        for _keys, images, _labels in loader:
            x = to_model_input(images.to(dev, non_blocking=True), input_size=input_size, channels_last=True)
            n += x.shape[0]
        _sync(dev)
        elapsed = time.perf_counter() - t0
    return {"data": "digits shards (32×32 grey PNG)", "workers": workers, "batch_size": batch_size, "images": n,
            "seconds": elapsed, "images_per_s": n / elapsed, "startup_included": True,
            "output_shape": [batch_size, 1, input_size, input_size]}


def main(
    *,
    batch_size: int = 128,
    K: int = 4,
    input_size: int = 220,
    warmup: int = 5,
    steps: int = 30,
    compile: bool = True,
    loader: bool = True,
    loader_batches: int = 200,
    workers: int = 0,
    seed: int = 0,
    out: str = "",
) -> dict:
    """Seed network on CUDA: images/s and share of peak FLOP/s (bf16/fp32, eager/compiled), loader images/s.

    Args:
        batch_size: images per training step and per loader batch.
        K: images per class in a training batch (P×K labels).
        input_size: network input side (220 = the seed).
        warmup: untimed steps per configuration (after the first, compiling, step).
        steps: timed steps per configuration.
        compile: also run the torch.compile configurations.
        loader: also time the shard loader with on-device resize.
        loader_batches: batches the loader delivers (startup included in the time).
        workers: loader worker processes (0 = min(8, CPU cores)).
        seed: weights and data seed.
        out: optional JSON output file (written atomically).
    """
    require_ints("gpu", (("batch_size", batch_size, 2), ("K", K, 2), ("input_size", input_size, 1),
                         ("warmup", warmup, 0), ("steps", steps, 1), ("loader_batches", loader_batches, 1),
                         ("workers", workers, 0)))
    report: dict = {"benchmark": "gpu", "torch": torch.__version__}
    if not torch.cuda.is_available():
        report.update(skipped=True, reason="no CUDA device: torch.cuda.is_available() is False")
        _emit(report, out)
        return report

    t_start = time.perf_counter()
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(0)
    peak = peak_for(name)
    report.update(
        skipped=False, gpu=name, capability=list(torch.cuda.get_device_capability(0)), peak_tflops=peak,
        settings={"batch_size": batch_size, "K": K, "input_size": input_size, "warmup": warmup, "steps": steps,
                  "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                  "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                  "float32_matmul_precision": torch.get_float32_matmul_precision()},
    )

    from toolkit.bench.step import make_batches
    from toolkit.models import build_embedder

    dev = torch.device("cuda")
    model = build_embedder(arch="zfnet", in_channels=1, input_size=input_size).to(dev).to(memory_format=torch.channels_last)
    x, y = make_batches(1, batch_size=batch_size, K=K, channels=1, size=32, seed=seed)[0]
    try:
        flops = count_flops(model, x.to(dev), y.to(dev), input_size=input_size)
    except Exception as exc:  # noqa: BLE001 - report, keep timing
        flops = None
        report["flop_count_error"] = f"{type(exc).__name__}: {exc}"
    del model
    report["flops_per_step"] = flops
    report["gflops_per_image"] = flops / batch_size / 1e9 if flops else None

    torch.cuda.reset_peak_memory_stats()
    configs = [(d, c) for c in ((False, True) if compile else (False,)) for d in ("bf16", "fp32")]
    report["train"] = []
    for dtype, compiled in configs:
        try:
            res = bench_train(dtype=dtype, compiled=compiled, batch_size=batch_size, K=K, input_size=input_size,
                              warmup=warmup, steps=steps, seed=seed, flops_per_step=flops, peak=peak)
        except Exception as exc:  # noqa: BLE001 - one failing configuration must not hide the others
            res = {"dtype": dtype, "compiled": compiled, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        report["train"].append(res)
        torch.cuda.empty_cache()  # this configuration's model and optimizer are gone
        torch.cuda.reset_peak_memory_stats()
        log(f"  {dtype} {'compiled' if compiled else 'eager':8s}: "
             + (f"{res['images_per_s']:,.0f} images/s" if "images_per_s" in res else res.get("error", "")))

    if loader:
        w = workers or min(8, os.cpu_count() or 1)
        try:
            report["loader"] = bench_loader(batch_size=batch_size, workers=w, batches=loader_batches,
                                            input_size=input_size, seed=seed)
        except Exception as exc:  # noqa: BLE001
            report["loader"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        best = max((r.get("images_per_s", 0.0) for r in report["train"]), default=0.0)
        if "images_per_s" in report["loader"] and best:
            report["loader"]["vs_best_train_images_per_s"] = report["loader"]["images_per_s"] / best
    report["total_s"] = time.perf_counter() - t_start
    _emit(report, out)
    return report
