"""``toolkit bench step``: training images/s of the toolkit's embed step vs a plain PyTorch loop.

Both sides train the same network (ZFNet, ``--input_size`` 32 by default; same initial
weights) with Adam on the same pre-generated uint8 batches of P×K labels, in the same
process, at the same precision; no data loading on either side.

* **toolkit**: :func:`toolkit.engine.embed.train_step` through an ``accelerate.Accelerator``
  (``cpu=True`` without CUDA) with the model and optimizer prepared, the constant LR
  scheduler of :func:`~toolkit.engine.embed.build_scheduler`: device move, ``to_model_input``,
  autocast context, cross-process gather (a no-op with one process), semi-hard mining with
  its stats, ``accelerator.backward``, optimizer and scheduler steps.
* **plain**: the loop one would write by hand: uint8 -> float, normalise (and resize if the
  stored size differs), ``model(x)``, :func:`toolkit.losses.triplet_loss` (the same semi-hard
  loss), ``loss.backward()``, ``optimizer.step()``, ``optimizer.zero_grad()``.

Each side first runs ``--warmup`` steps; then timed blocks of ``--steps`` steps alternate
A B B A ... for ``--repeats`` rounds and each side reports its best block; the ratio of the
best blocks is the headline, the median of the back-to-back pairs' ratios is printed beside
it (it resists load swings on a shared machine). Target: toolkit ≥ 0.95× plain on CPU.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from toolkit.bench import log, require_ints, write_json
from toolkit.errors import ConfigError

TARGET = 0.95


def make_batches(count: int, *, batch_size: int, K: int, channels: int, size: int, seed: int):
    """``count`` (uint8 images (B, C, size, size), labels (B,)) pairs with P×K labels."""
    g = torch.Generator().manual_seed(seed)
    P = batch_size // K
    out = []
    for _ in range(count):
        images = torch.randint(0, 256, (batch_size, channels, size, size), dtype=torch.uint8, generator=g)
        labels = torch.arange(P).repeat_interleave(K)
        labels = torch.cat([labels, torch.arange(batch_size - P * K)])  # a remainder: singletons
        out.append((images, labels[torch.randperm(batch_size, generator=g)]))
    return out


def main(
    *,
    batch_size: int = 128,
    K: int = 4,
    input_size: int = 32,
    image_size: int = 32,
    arch: str = "zfnet",
    precision: str = "fp32",
    warmup: int = 3,
    steps: int = 4,
    repeats: int = 8,
    seed: int = 0,
    device: str = "auto",
    out: str = "",
) -> dict:
    """Train-step images/s: toolkit's train_step (Accelerate) vs a plain PyTorch loop.

    Args:
        batch_size: images per step (P×K labels, P = batch_size // K).
        K: images per class in a batch.
        input_size: side of the network input (32 = native CPU config, 220 = the seed).
        image_size: side of the stored uint8 images (resized to input_size on both sides).
        arch: zfnet, resnet18 or resnet34.
        precision: fp32 or bf16 (autocast on both sides).
        warmup: untimed steps per side before timing.
        steps: steps per timed block.
        repeats: timed blocks per side, alternating A B B A; each side's best is reported.
        seed: weights and data seed.
        device: auto (cuda if present), cpu or cuda.
        out: optional JSON output file (written atomically).
    """
    require_ints("step", (("batch_size", batch_size, 2), ("K", K, 2), ("input_size", input_size, 1),
                          ("image_size", image_size, 1), ("warmup", warmup, 0), ("steps", steps, 1),
                          ("repeats", repeats, 1)))
    if K > batch_size:
        raise ConfigError(f"toolkit bench step: --K {K} is larger than --batch_size {batch_size}")
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"toolkit bench step: --precision must be fp32 or bf16, got {precision!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"toolkit bench step: --device must be auto, cpu or cuda, got {device!r}")

    from accelerate import Accelerator

    from toolkit.engine.embed import build_scheduler, train_step
    from toolkit.losses import triplet_loss
    from toolkit.objectives import TripletObjective
    from toolkit.models import build_embedder

    use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=use_cpu, mixed_precision="no" if precision == "fp32" else "bf16")
    dev = accelerator.device
    lr, margin = 1e-3, 0.2
    objective = TripletObjective(margin=margin, mining="semihard")

    torch.manual_seed(seed)
    model_a = build_embedder(arch=arch, in_channels=1, input_size=input_size)
    model_b = copy.deepcopy(model_a).to(dev)  # same initial weights
    opt_a = torch.optim.Adam(model_a.parameters(), lr=lr)
    sched_a = build_scheduler(opt_a, schedule="constant", warmup_steps=0, total_steps=0)
    model_a, opt_a = accelerator.prepare(model_a, opt_a)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=lr)
    model_a.train()
    model_b.train()

    batches = make_batches(4, batch_size=batch_size, K=K, channels=1, size=image_size, seed=seed)
    autocast_b = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step_toolkit(images, labels):
        train_step(model_a, opt_a, sched_a, accelerator, images, labels, objective=objective, input_size=input_size)

    def step_plain(images, labels):
        x = images.to(dev, non_blocking=True).float().div_(255.0).sub_(0.5).div_(0.5)
        if x.shape[-1] != input_size:
            x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
        labels = labels.to(dev, non_blocking=True)
        with autocast_b:
            emb = model_b(x)
        loss, _ = triplet_loss(emb.float(), labels, margin=margin, strategy="semihard")
        loss.backward()
        opt_b.step()
        opt_b.zero_grad(set_to_none=True)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def block(fn, n):
        sync()
        t = time.perf_counter()
        for i in range(n):
            fn(*batches[i % len(batches)])
        sync()
        return time.perf_counter() - t

    sides = {"toolkit": step_toolkit, "plain": step_plain}
    for name, fn in sides.items():
        block(fn, warmup)
    times: dict[str, list[float]] = {"toolkit": [], "plain": []}
    for r in range(repeats):
        for name in (("toolkit", "plain") if r % 2 == 0 else ("plain", "toolkit")):
            times[name].append(block(sides[name], steps))
            log(f"  {name:7s}: {steps * batch_size / times[name][-1]:,.1f} images/s")

    rate = {name: steps * batch_size / min(t) for name, t in times.items()}
    ratio = rate["toolkit"] / rate["plain"]
    # Blocks run back to back in pairs (A B, then B A): both blocks of a pair see about the
    # same machine load, so the median of the per-pair ratios resists load swings.
    pairs = sorted(b / a for a, b in zip(times["toolkit"], times["plain"]))
    paired = (pairs[(len(pairs) - 1) // 2] + pairs[len(pairs) // 2]) / 2
    threads = torch.get_num_threads()
    lines = [
        "## toolkit bench step",
        "",
        f"{arch} at input {input_size} (stored {image_size}×{image_size} uint8, 1 channel), batch {batch_size} "
        f"(P={batch_size // K} × K={K}), semi-hard triplet loss margin {margin}, Adam, {precision}, device {dev.type}"
        + (f", torch threads {threads}" if dev.type == "cpu" else "")
        + f"; {warmup} warm-up steps per side, then best of {repeats} blocks of {steps} steps, alternating A B B A.",
        "toolkit = toolkit.engine.embed.train_step through accelerate.Accelerator (model + optimizer prepared); "
        "plain = hand-written loop on the same model, loss, batches.",
        "",
        "| toolkit images/s | plain images/s | ratio | median paired ratio |",
        "|---:|---:|---|---:|",
        f"| {rate['toolkit']:,.1f} | {rate['plain']:,.1f} | {ratio:.3f}× (target ≥{TARGET}× {'✓' if ratio >= TARGET else '✗'}) "
        f"| {paired:.3f}× |",
        "",
        "ratio = toolkit / plain of each side's best block; median paired ratio = median over the back-to-back "
        "block pairs (robust when the machine's load changes during the run).",
    ]
    print("\n".join(lines))
    report = {
        "benchmark": "step", "arch": arch, "input_size": input_size, "image_size": image_size,
        "batch_size": batch_size, "K": K, "precision": precision, "device": dev.type, "threads": threads,
        "warmup": warmup, "steps": steps, "repeats": repeats,
        "toolkit": {"images_per_s": rate["toolkit"], "block_s": times["toolkit"]},
        "plain": {"images_per_s": rate["plain"], "block_s": times["plain"]},
        "ratio": ratio, "median_paired_ratio": paired, "target": TARGET, "meets_target": ratio >= TARGET,
    }
    if out:
        write_json(out, report)
    return report
