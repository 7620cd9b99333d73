"""Run by ``accelerate launch`` from tests/test_sharded_validation.py: one process per rank.

Each rank holds an uneven share of a fixed train and val set (as ``embed_split`` leaves them)
and calls ``sharded_val_metrics``; rank 0 also assembles both splits the old way
(``gather_to_main``) and scores them with ``evaluate_embeddings`` and ``calibrated_unknown``.
Rank 0 writes both results to OUT.

    accelerate launch --multi_gpu --num_processes 2 sharded_val.py OUT
"""
from __future__ import annotations

import sys

import torch
from accelerate import Accelerator


def data(n_train: int = 157, n_val: int = 41, classes: int = 8, seed: int = 0):
    """Clustered unit vectors; keys shuffled so that no rank holds a contiguous key range; one
    val class (classes) has no train image."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes + 1, 16, generator=g), dim=1)

    def split(n, tag, labels):
        emb = torch.nn.functional.normalize(centres[labels] + 0.6 * torch.randn(n, 16, generator=g), dim=1)
        keys = [f"{tag}/{int(i):05d}" for i in torch.randperm(n, generator=g)]
        return keys, emb, labels

    train = split(n_train, "train", torch.randint(0, classes, (n_train,), generator=g))
    val_labels = torch.randint(0, classes, (n_val,), generator=g)
    val_labels[0] = classes
    return train, split(n_val, "val", val_labels)


def share(part, rank: int, world: int):
    """Rank 0 takes about two thirds, the others the rest (uneven shares)."""
    keys, emb, labels = part
    mine = [i for i in range(len(keys)) if (i % 3 != 0) == (rank == 0)] if world == 2 else list(range(len(keys)))
    idx = torch.tensor(mine, dtype=torch.long)
    return [keys[i] for i in mine], emb[idx], labels[idx]


def main(out: str) -> None:
    from toolkit.evaluation import calibrated_unknown, evaluate_embeddings, gather_to_main, sharded_val_metrics

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    train, val = data()
    train_local, val_local = share(train, rank, world), share(val, rank, world)
    sharded = sharded_val_metrics(train_local, val_local, k=13, unknown_fmr=0.05)
    # a rank that read no train sample (all its shards unreadable, or fewer samples than ranks)
    empty = (train[0][:0], torch.zeros(0, 0), train[2][:0])
    lopsided = sharded_val_metrics(train if rank == 0 else empty, val_local, k=13, unknown_fmr=0.05)
    full_train, full_val = gather_to_main(*train_local), gather_to_main(*val_local)
    if rank == 0:
        reference = evaluate_embeddings(full_train, full_val, k=13)
        unknown = calibrated_unknown(full_train, full_val, fmr=0.05)
        torch.save({"sharded": sharded, "lopsided": lopsided, "reference": (reference, unknown), "world": world,
                    "share_sizes": [len(share(train, r, world)[0]) for r in range(world)]}, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
