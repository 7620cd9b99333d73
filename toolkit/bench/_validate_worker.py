"""One process of ``toolkit bench validate``: score synthetic embeddings the old way or sharded.

Run directly (one process) or under ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu
--num_processes 2``. Every rank builds its share of a fixed data set (rows ``i`` with
``i % W == rank``, the same rows whatever W, generated block by block from the seed):
``--references`` train embeddings and ``--queries`` val embeddings, 128-d unit vectors around
``--classes`` centres, with keys. Then, on the clock:

* ``--mode gather`` (before): ``gather_to_main`` of train and val, rank 0 alone runs
  ``evaluate_embeddings`` (kNN(13) + ranking metrics) and ``calibrated_unknown``; the other
  ranks wait at a barrier;
* ``--mode sharded``: ``sharded_val_metrics`` (each rank searches its references, rank 0 merges).

Rank 0 writes one JSON file (``--out``): wall seconds, every rank's RSS before scoring and
peak RSS, and the metrics.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BLOCK = 1 << 16


def make_share(n: int, *, classes: int, dim: int, seed: int, rank: int, world: int, tag: str):
    """(keys, (n_r, dim) float32 unit rows, (n_r,) labels) of the rows i % world == rank."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
    keys, embs, labels = [], [], []
    for start in range(0, n, BLOCK):
        gb = torch.Generator().manual_seed(seed * 1_000_003 + (start + 1) * (2 if tag == "val" else 1))
        m = min(BLOCK, n - start)
        y = torch.randint(0, classes, (m,), generator=gb)
        e = F.normalize(centres[y] + (1.1 / dim**0.5) * torch.randn(m, dim, generator=gb), dim=1)  # noise norm ~1.1
        first = (rank - start) % world
        idx = torch.arange(first, m, world)
        embs.append(e[idx])
        labels.append(y[idx])
        keys.extend(f"{tag}/{start + int(i):09d}" for i in idx)
    return keys, torch.cat(embs), torch.cat(labels)


def run(args) -> None:
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs

    from toolkit import distributed
    from toolkit.bench import lifetime_peak_rss, rss_bytes
    from toolkit.evaluation import calibrated_unknown, evaluate_embeddings, gather_to_main, sharded_val_metrics

    if args.threads:
        torch.set_num_threads(args.threads)
    # the gathered side's other ranks wait at a barrier while rank 0 scores alone: at 1M x 150k
    # that is longer than the process group's default 30 min timeout
    wait = InitProcessGroupKwargs(timeout=timedelta(seconds=args.collective_timeout))
    accelerator = Accelerator(cpu=True, mixed_precision="no", kwargs_handlers=[wait])
    rank, world = accelerator.process_index, accelerator.num_processes
    common = dict(classes=args.classes, dim=args.dim, rank=rank, world=world)
    train = make_share(args.references, seed=args.seed, tag="train", **common)
    val = make_share(args.queries, seed=args.seed, tag="val", **common)
    accelerator.wait_for_everyone()
    before = rss_bytes()
    t0 = time.perf_counter()
    if args.mode == "gather":
        full_train, full_val = gather_to_main(*train), gather_to_main(*val)
        del train, val
        result = None
        if rank == 0:
            metrics = evaluate_embeddings(full_train, full_val, k=13)
            unknown = calibrated_unknown(full_train, full_val, fmr=0.01)
            result = (metrics, unknown)
        accelerator.wait_for_everyone()  # the other ranks wait here, as in the validator
    else:
        scored = sharded_val_metrics(train, val, k=13, unknown_fmr=0.01)
        result = None if scored is None else scored[:2]
        accelerator.wait_for_everyone()
    wall = time.perf_counter() - t0
    local = {"rank": rank, "rss_before": before, "peak_rss": lifetime_peak_rss()}
    ranks = distributed.all_gather_object(local)
    if rank == 0:
        metrics, unknown = result
        Path(args.out).write_text(json.dumps({
            "mode": args.mode, "processes": world, "references": args.references, "queries": args.queries,
            "wall_s": wall, "ranks": ranks, "metrics": metrics, "unknown": unknown,
        }))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=("gather", "sharded"), required=True)
    p.add_argument("--references", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=150_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--collective_timeout", type=float, default=7200.0, help="seconds a rank may wait in a collective")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse())
