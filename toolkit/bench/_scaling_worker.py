"""One process of ``toolkit bench scaling``: timed embed steps, split by phase.

Run directly (one process) or under ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu
--num_processes 2`` (two gloo processes). Every rank trains the same ZFNet with the
toolkit's step, unrolled so that each phase gets its own clock:

    forward   uint8 -> to_model_input -> model(x)            (local batch)
    wait      barrier: time spent waiting for the slowest rank's forward (0 with one process)
    gather    gather_sum_grad(embeddings) + gather_labels   (the all-gathers of the step)
    mining    semi-hard triplet loss of this rank's anchors over the global batch (as in the toolkit)
    backward  accelerator.backward (with DDP, includes the gradient all-reduce it overlaps)
    optimizer optimizer.step + scheduler.step + zero_grad

The barrier sits only before the gather, so that the gather's clock holds the collective
and not another rank's lateness. Rank 0 writes one JSON file (``--out``) with every rank's
mean ms per phase and the wall time of the timed steps.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

PHASES = ("forward", "wait", "gather", "mining", "backward", "optimizer")


def _batches(args, rank: int, world: int):
    """A few (uint8 images, labels) batches of this rank, loaded before any timing."""
    if args.data == "synthetic":
        from toolkit.bench.step import make_batches

        return make_batches(4, batch_size=args.batch_size, K=args.K, channels=1, size=args.image_size,
                            seed=args.seed + 1000 * rank)
    from toolkit.data.stream import ShardStream, make_loader

    stream = ShardStream(args.shards, split="train", mode="train", rank=rank, world_size=world,
                         batch_size=args.batch_size, K=args.K, seed=args.seed)
    out = []
    for _keys, images, labels in make_loader(stream, num_workers=0):
        out.append((images, labels))
        if len(out) == 4:
            break
    if not out:
        raise RuntimeError(f"rank {rank}: the digits shards gave no batch")
    return out


def run(args) -> dict | None:
    from accelerate import Accelerator

    from toolkit.data.transforms import to_model_input
    from toolkit.engine.embed import build_scheduler
    from toolkit.losses import gather_labels, gather_sum_grad, own_anchor_loss
    from toolkit.models import build_embedder

    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    rank, world = accelerator.process_index, accelerator.num_processes
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    torch.manual_seed(args.seed)
    model = build_embedder(arch="zfnet", in_channels=1, input_size=args.input_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = build_scheduler(optimizer, schedule="constant", warmup_steps=0, total_steps=0)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    device = accelerator.device
    batches = _batches(args, rank, world)

    def step(images, labels) -> dict[str, float]:
        t0 = time.perf_counter()
        x = to_model_input(images.to(device), input_size=args.input_size)
        labels = labels.to(device)
        with accelerator.autocast():
            emb = model(x)  # (B, 128)
        t1 = time.perf_counter()
        if distributed:
            dist.barrier()
        t2 = time.perf_counter()
        all_emb = gather_sum_grad(emb.float())  # (W·B, 128); backward sums the ranks' gradients
        all_labels = gather_labels(labels)
        t3 = time.perf_counter()
        b = emb.shape[0]
        loss, _stats = own_anchor_loss(all_emb, all_labels, slice(rank * b, (rank + 1) * b), margin=0.2)
        t4 = time.perf_counter()
        accelerator.backward(loss)
        t5 = time.perf_counter()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        t6 = time.perf_counter()
        return dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)))

    for i in range(args.warmup):
        step(*batches[i % len(batches)])
    accelerator.wait_for_everyone()
    records = []
    start = time.perf_counter()
    for i in range(args.steps):
        records.append(step(*batches[i % len(batches)]))
    accelerator.wait_for_everyone()
    wall = time.perf_counter() - start
    local = {
        "rank": rank,
        "threads": torch.get_num_threads(),
        "batch": int(batches[0][0].shape[0]),
        "wall_s": wall,
        "ms": {p: 1000.0 * sum(r[p] for r in records) / len(records) for p in PHASES},
    }
    backend = dist.get_backend() if distributed else None
    ranks = [None] * world
    if distributed:
        dist.all_gather_object(ranks, local)
        # every rank leaves together and tears the group down: a rank that exits while its
        # peer's gloo pair still reads the socket makes the peer abort ("connection closed")
        accelerator.wait_for_everyone()
    else:
        ranks = [local]
    accelerator.end_training()
    if rank != 0:
        return None
    wall0 = ranks[0]["wall_s"]
    global_batch = sum(r["batch"] for r in ranks)
    result = {
        "processes": world,
        "backend": backend,
        "steps": args.steps,
        "warmup": args.warmup,
        "data": args.data,
        "input_size": args.input_size,
        "global_batch": global_batch,
        "step_ms": 1000.0 * wall0 / args.steps,
        "images_per_s": global_batch * args.steps / wall0,
        "ranks": ranks,
        "ms": {p: sum(r["ms"][p] for r in ranks) / len(ranks) for p in PHASES},  # mean over ranks
    }
    Path(args.out).write_text(json.dumps(result))
    return result


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file rank 0 writes")
    p.add_argument("--data", choices=("digits", "synthetic"), default="digits")
    p.add_argument("--shards", default="", help="digits shard folder (with --data digits)")
    p.add_argument("--batch_size", type=int, default=160)
    p.add_argument("--K", type=int, default=16)
    p.add_argument("--input_size", type=int, default=32)
    p.add_argument("--image_size", type=int, default=32, help="stored side of synthetic images")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse())
