"""Run by ``accelerate launch`` from tests/test_stream_distributed.py: one process per rank.

Streams a shard folder the way the training loop does -- ShardStream split by this
process's rank, a two-worker WebLoader, a collective after every batch (as DDP's gradient
all-reduce would do, so a rank with fewer batches hangs or fails the run) -- and writes what
this rank saw to OUT/rank<r>.json: world size, per-epoch batch count and batch contents,
and the keys of one eval pass.

    accelerate launch --multi_gpu --num_processes 2 loader_ranks.py SHARDS OUT [--P 2 --K 2 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from toolkit.data.stream import ShardStream, make_loader


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("out")
    ap.add_argument("--split", default="train")
    ap.add_argument("--P", type=int, default=2)
    ap.add_argument("--K", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-batch-size", type=int, default=5)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--timeout-s", type=int, default=60)
    args = ap.parse_args()

    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.timeout_s))])
    rank, world = accelerator.process_index, accelerator.num_processes
    common = dict(rank=rank, world_size=world, seed=args.seed, split=args.split)
    train = ShardStream(args.shards, mode="train", batch_size=args.batch_size, P=args.P, K=args.K, **common)

    report = {
        "rank": rank,
        "world_size": world,
        "distributed_type": str(accelerator.distributed_type),
        "pid": os.getpid(),
        "steps_per_epoch": train.steps_per_epoch(),
        "P": train.P,
        "K": train.K,
        "epochs": [],
    }
    for epoch in range(args.epochs):
        batches, total = [], 0.0
        for keys, images, labels in make_loader(train, num_workers=args.num_workers, epoch=epoch):
            assert images.dtype == torch.uint8 and images.shape[0] == len(keys) == labels.shape[0]
            batches.append({"keys": list(keys), "labels": labels.tolist()})
            # the collective every training step performs; unequal batch counts hang/fail here
            total += accelerator.reduce(torch.tensor([float(len(keys))]), reduction="sum").item()
        report["epochs"].append({"epoch": epoch, "num_batches": len(batches), "batches": batches, "reduced_total": total})

    # eval: one pass, each sample once across all ranks and workers; no per-batch collective
    ev = ShardStream(args.shards, mode="eval", batch_size=args.eval_batch_size, **common)
    seen = []
    for keys, images, labels in make_loader(ev, num_workers=args.num_workers):
        seen.extend(zip(keys, labels.tolist()))
    report["eval"] = seen

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training() if hasattr(accelerator, "end_training") else None
    print(f"rank {rank}/{world} done: {[e['num_batches'] for e in report['epochs']]} batches", file=sys.stderr)


if __name__ == "__main__":
    main()
