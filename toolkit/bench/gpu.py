"""``toolkit bench gpu``: the seed recipe on a CUDA GPU, as one JSON object (a few minutes).

Training images/s per GPU of the seed network (ZFNet at 220×220, one grey channel, batch
128, semi-hard triplet loss, Adam; uint8 32×32 batches upsampled on the device by
``to_model_input``, as ``train_step`` does) in a matrix of configurations: dtype (bf16
autocast; fp32 with ``--dtypes bf16,fp32``) × ``channels_last`` on/off × ``torch.compile``
on/off (``--channels_last true`` or ``--compile false`` shrink it). The model is compiled
alone, as ``compile=true`` does in training. For each: images/s, step time, the achieved
TFLOP/s, its share of the GPU's dense bf16 peak and of the peak of its own dtype. FLOPs of
one forward + backward are counted once with ``torch.utils.flop_counter.FlopCounterMode``;
the peaks come from a small table of dense (non-sparse) data-sheet figures by GPU name
(an unknown GPU: "unknown"). fp32 convolutions run on TF32 tensor cores when
``torch.backends.cudnn.allow_tf32`` is on (PyTorch's default), so fp32 rows also carry their
share of the TF32 peak.

Then the loader: the demo's digits shards (32×32 grey PNG), resharded into at least one
train shard per worker, streamed by ``ShardStream`` + ``make_loader`` with 1 and ``W``
workers (default: min(16, CPU cores)); each uint8 batch is moved to the GPU and turned into
the (128, 1, 220, 220) model input there. Steady samples/s, samples/s per worker, and how
many workers the fastest configuration's images/s needs.

Without CUDA it prints one line, ``{"benchmark": "gpu", "skipped": true, ...}``, and exits 0.
With ``--out`` the JSON is rewritten after every configuration, so a run stopped part-way
(``--budget_s``, or a ``timeout``) still leaves what it measured.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any

import torch

from toolkit.bench import cores, log, require_ints
from toolkit.errors import ConfigError

# Dense peak TFLOP/s per GPU (vendor data sheets; SXM parts unless named). Matched by
# substring of torch.cuda.get_device_name(), first match wins (so "H100 PCIe" before "H100").
PEAK_TFLOPS: list[tuple[str, dict[str, float | None]]] = [
    ("H200 NVL", {"bf16": 835.0, "fp32": 60.0, "tf32": 418.0}),
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
UNKNOWN = "unknown"
DTYPES = ("bf16", "fp32")


def peak_for(name: str) -> dict[str, float | None] | None:
    """Dense peak TFLOP/s of GPU ``name`` by dtype, or None for a GPU not in the table."""
    for key, peak in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return dict(peak)
    return None


def _share(tflops: float, peak: dict | None, key: str) -> float | str:
    p = (peak or {}).get(key)
    return tflops / p if p else UNKNOWN


def _emit(report: dict, out: str, *, final: bool = True) -> None:
    if final:
        print(json.dumps(report, indent=None if report.get("skipped") else 2))
    if out:
        from toolkit.files import atomic_write_json

        atomic_write_json(out, report)


def _choices(name: str, value: Any) -> tuple[bool, ...]:
    """``--compile both|true|false`` (fire passes bools or strings) -> the values to run."""
    if isinstance(value, bool):
        return (value,)
    text = str(value).strip().lower()
    if text == "both":
        return (False, True)
    if text in ("1", "true", "yes", "on"):
        return (True,)
    if text in ("0", "false", "no", "off"):
        return (False,)
    raise ConfigError(f"toolkit bench gpu: --{name} must be both, true or false, got {value!r}")


def _dtypes(value: Any) -> tuple[str, ...]:
    """``--dtypes bf16`` or ``bf16,fp32`` (fire passes a tuple for the latter)."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = tuple(str(v).strip().lower() for v in items if str(v).strip())
    if not names or any(n not in DTYPES for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"toolkit bench gpu: --dtypes must list bf16 and/or fp32 (e.g. bf16,fp32), got {','.join(names)!r}")
    return names


def configurations(dtypes: tuple[str, ...], channels_last: tuple[bool, ...], compiled: tuple[bool, ...]) -> list[dict]:
    """The matrix, eager before compiled (compiling is the slow part), then by dtype and layout."""
    return [{"dtype": d, "channels_last": cl, "compiled": c} for c in compiled for d in dtypes for cl in channels_last]


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
                steps: int, seed: int, flops_per_step: int | None, peak: dict | None, device: str = "cuda",
                channels_last: bool = True, compile_mode: str = "default") -> dict:
    """One configuration: images/s, achieved TFLOP/s and shares of peak (runs on CPU too, for tests)."""
    from toolkit.bench.step import make_batches
    from toolkit.data.transforms import to_model_input
    from toolkit.losses import triplet_loss
    from toolkit.models import build_embedder

    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build_embedder(arch="zfnet", in_channels=1, input_size=input_size).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    net = torch.compile(model, mode=None if compile_mode == "default" else compile_mode) if compiled else model
    batches = [(x.to(dev), y.to(dev)) for x, y in make_batches(4, batch_size=batch_size, K=K, channels=1, size=32,
                                                                seed=seed)]
    use_bf16 = dtype == "bf16"

    def step(x, y):
        inp = to_model_input(x, input_size=input_size, channels_last=channels_last)
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
        "channels_last": channels_last,
        "compiled": compiled,
        "first_step_s": round(first_s, 3),
        "step_ms": 1000 * elapsed / steps,
        "images_per_s": batch_size * steps / elapsed,  # one process on one GPU: images/s per GPU
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }
    if flops_per_step:
        tflops = flops_per_step * steps / elapsed / 1e12
        res["achieved_tflops"] = tflops
        res["share_of_bf16_peak"] = _share(tflops, peak, "bf16")
        res["share_of_peak"] = _share(tflops, peak, "bf16" if use_bf16 else "fp32")  # of its own dtype
        p = (peak or {}).get("bf16" if use_bf16 else "fp32")
        res["peak_tflops"] = p if p else UNKNOWN
        if not use_bf16:
            res["share_of_tf32_peak"] = _share(tflops, peak, "tf32")
    return res


def bench_loader(*, batch_size: int, workers: int, batches: int, input_size: int, seed: int,
                 device: str = "cuda") -> dict:
    """Shards -> uint8 batches (workers) -> GPU -> to_model_input at input_size: steady samples/s."""
    from toolkit.bench import data_root
    from toolkit.bench.loader import digits_shards, loader_rate, sizing_row, worker_shards
    from toolkit.data.transforms import to_model_input

    dev = torch.device(device)

    def to_gpu(images):
        to_model_input(images.to(dev, non_blocking=True), input_size=input_size, channels_last=True)

    with data_root() as (root, _):
        digits_shards(root, seed=seed)
        shards = worker_shards(root / "digits", root, workers=workers, seed=seed)
        rows = []
        for w in sorted({1, max(1, workers // 2), workers}):
            res = loader_rate(shards, batch_size=batch_size, workers=w, batches=max(batches, 4 * w), seed=seed,
                              consume=to_gpu)
            _sync(dev)
            rows.append(res)
            log(f"  loader, {w} worker(s): {res['samples_per_s']:,.0f} samples/s "
                f"({res['samples_per_s_per_worker']:,.0f} per worker)")
    most, sizing = rows[-1], sizing_row(rows, cores())
    return {"data": "digits shards (32×32 grey PNG), at least one train shard per worker", "batch_size": batch_size,
            "output_shape": [batch_size, 1, input_size, input_size], "cores": cores(), "rows": rows,
            "workers": most["workers"], "samples_per_s": most["samples_per_s"],
            # the loader is sized at the per-worker rate of the most workers that leave a core to training
            "samples_per_s_per_worker": sizing["samples_per_s_per_worker"], "sized_with_workers": sizing["workers"],
            "steady_state": True}


def format_table(report: dict) -> str:
    """The matrix as a markdown table (printed to stderr; stdout holds the JSON)."""
    def pct(v):
        return f"{100 * v:.1f} %" if isinstance(v, float) else UNKNOWN

    lines = [f"GPU: {report.get('gpu')}, torch {report['torch']}, batch {report['settings']['batch_size']} "
             f"at {report['settings']['input_size']}×{report['settings']['input_size']}, "
             f"{report.get('gflops_per_image') or 0:.2f} GFLOP per image (forward + backward)", "",
             "| dtype | channels_last | torch.compile | images/s per GPU | step ms | TFLOP/s | share of bf16 peak | "
             "first step s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in report.get("train", []):
        head = f"| {r['dtype']} | {'yes' if r['channels_last'] else 'no'} | {'yes' if r['compiled'] else 'no'} |"
        if "images_per_s" not in r:
            lines.append(f"{head} {r.get('error') or r.get('skipped', '')} | | | | |")
            continue
        lines.append(f"{head} {r['images_per_s']:,.0f} | {r['step_ms']:.1f} | {r.get('achieved_tflops', 0):.{1 if r.get('achieved_tflops', 0) >= 10 else 2}f} | "
                     f"{pct(r.get('share_of_bf16_peak'))} | {r['first_step_s']:.1f} |")
    ld = report.get("loader") or {}
    if "samples_per_s" in ld:
        lines += ["", "| loader workers | samples/s | samples/s per worker |", "| ---: | ---: | ---: |"]
        lines += [f"| {r['workers']} | {r['samples_per_s']:,.0f} | {r['samples_per_s_per_worker']:,.0f} |" for r in ld["rows"]]
        lines += ["", f"loader on {ld['cores']} cores, uint8 batches to the GPU + to_model_input there; sized at "
                      f"{ld['samples_per_s_per_worker']:,.0f} samples/s per worker (with {ld['sized_with_workers']} worker(s))"]
        if ld.get("workers_for_best_train"):
            lines.append(f"the fastest configuration ({ld['best_train_images_per_s']:,.0f} images/s) needs "
                         f"{ld['workers_for_best_train']} loader worker(s) at that per-worker rate")
    return "\n".join(lines)


def main(
    *,
    batch_size: int = 128,
    K: int = 4,
    input_size: int = 220,
    warmup: int = 5,
    steps: int = 30,
    dtypes: Any = "bf16",
    channels_last: Any = "both",
    compile: Any = "both",
    compile_mode: str = "default",
    loader: Any = True,
    loader_batches: int = 200,
    workers: int = 0,
    budget_s: float = 0.0,
    seed: int = 0,
    device: str = "cuda",
    out: str = "",
) -> dict:
    """Seed network on CUDA: images/s per GPU and share of the bf16 peak, over dtype × channels_last
    × torch.compile; the loader's samples/s.

    Args:
        batch_size: images per training step and per loader batch.
        K: images per class in a training batch (P×K labels).
        input_size: network input side (220 = the seed).
        warmup: untimed steps per configuration (after the first, compiling, step).
        steps: timed steps per configuration.
        dtypes: bf16 (autocast, as precision=bf16 trains), fp32, or bf16,fp32.
        channels_last: both, true or false.
        compile: torch.compile the model: both, true or false.
        compile_mode: torch.compile mode (default, reduce-overhead, max-autotune, ...).
        loader: also time the shard loader feeding the GPU (on-device resize included).
        loader_batches: timed loader batches (after each worker's first).
        workers: loader worker processes (0 = min(16, CPU cores)); 1 worker is timed too.
        budget_s: skip the configurations that would start after this many seconds (0 = no limit).
        seed: weights and data seed.
        device: cuda (without CUDA: one "skipped" line, exit 0), or cpu: a dry run of the same
            code, for tests and small sizes (``--input_size 32``; no peak figures).
        out: optional JSON output file (written atomically, after every configuration).
    """
    require_ints("gpu", (("batch_size", batch_size, 2), ("K", K, 2), ("input_size", input_size, 1),
                         ("warmup", warmup, 0), ("steps", steps, 1), ("loader_batches", loader_batches, 1),
                         ("workers", workers, 0)))
    from toolkit.bench.loader import as_bool

    configs = configurations(_dtypes(dtypes), _choices("channels_last", channels_last), _choices("compile", compile))
    loader = as_bool("gpu", "loader", loader)
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not math.isfinite(budget_s) or budget_s < 0:
        raise ConfigError(f"toolkit bench gpu: --budget_s must be a number >= 0, got {budget_s!r}")
    if not isinstance(compile_mode, str) or not compile_mode:
        raise ConfigError(f"toolkit bench gpu: --compile_mode must be a torch.compile mode, got {compile_mode!r}")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"toolkit bench gpu: --device must be cuda or cpu, got {device!r}")

    report: dict = {"benchmark": "gpu", "torch": torch.__version__}
    if device == "cuda" and not torch.cuda.is_available():
        report.update(skipped=True, reason="no CUDA device: torch.cuda.is_available() is False")
        _emit(report, out)
        return report

    t_start = time.perf_counter()
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({cores()} cores), dry run"
    peak = peak_for(name) if cuda else None
    report.update(
        skipped=False, gpu=name, gpus_visible=torch.cuda.device_count() if cuda else 0, per_gpu="one process on GPU 0",
        capability=list(torch.cuda.get_device_capability(0)) if cuda else None, peak_tflops=peak or UNKNOWN,
        settings={"batch_size": batch_size, "K": K, "input_size": input_size, "warmup": warmup, "steps": steps,
                  "compile_mode": compile_mode, "cudnn_benchmark": True,
                  "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                  "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                  "float32_matmul_precision": torch.get_float32_matmul_precision()},
    )

    from toolkit.bench.step import make_batches
    from toolkit.models import build_embedder

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

    def free() -> None:  # the last configuration's model and optimizer are gone
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    free()
    report["train"] = []

    def over_budget() -> bool:
        return bool(budget_s) and time.perf_counter() - t_start > budget_s

    def run_loader() -> None:
        w = workers or min(16, cores())
        if over_budget():
            report["loader"] = {"skipped": f"time budget of {budget_s:g} s spent"}
            return
        try:
            report["loader"] = bench_loader(batch_size=batch_size, workers=w, batches=loader_batches,
                                            input_size=input_size, seed=seed, device=device)
        except Exception as exc:  # noqa: BLE001
            report["loader"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        _emit(report, out, final=False)

    for i, cfg in enumerate(configs):
        if loader and cfg["compiled"] and "loader" not in report:
            run_loader()  # after the eager rows, before the slow compiles
        if over_budget():
            res = {**cfg, "skipped": f"time budget of {budget_s:g} s spent"}
        else:
            try:
                res = bench_train(**cfg, batch_size=batch_size, K=K, input_size=input_size, warmup=warmup, steps=steps,
                                  seed=seed, flops_per_step=flops, peak=peak, compile_mode=compile_mode, device=device)
            except Exception as exc:  # noqa: BLE001 - one failing configuration must not hide the others
                res = {**cfg, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        report["train"].append(res)
        free()
        label = f"{cfg['dtype']} {'channels_last' if cfg['channels_last'] else 'contiguous'} " \
                f"{'compiled' if cfg['compiled'] else 'eager'}"
        log(f"  [{i + 1}/{len(configs)}] {label}: "
            + (f"{res['images_per_s']:,.0f} images/s" if "images_per_s" in res else res.get("error") or res.get("skipped")))
        _emit(report, out, final=False)
    if loader and "loader" not in report:
        run_loader()

    timed = [r for r in report["train"] if "images_per_s" in r]
    if timed:
        best = max(timed, key=lambda r: r["images_per_s"])
        report["best"] = {k: best[k] for k in ("dtype", "channels_last", "compiled", "images_per_s")}
        ld = report.get("loader") or {}
        if "samples_per_s_per_worker" in ld:
            from toolkit.bench.loader import workers_needed

            ld["best_train_images_per_s"] = best["images_per_s"]
            ld["vs_best_train_images_per_s"] = ld["samples_per_s"] / best["images_per_s"]
            ld["workers_for_best_train"] = workers_needed(best["images_per_s"], ld["samples_per_s_per_worker"])
    report["total_s"] = time.perf_counter() - t_start
    log(format_table(report))
    _emit(report, out)
    return report
