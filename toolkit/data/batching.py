"""Samples -> batches: class-balanced P×K, plain random, and eval batches.

Plain generators over ``(key, uint8 image (C, H, W), class index)`` samples: they know
nothing about tars, ranks or loader workers. The training batchers read *passes*, a
callable ``pass_index -> iterable of samples``, and keep asking for the next pass for as long
as batches are wanted: the caller cuts the stream.

P×K batches (:func:`pk_batches`): per-class buffers fill from the stream; as soon as P
classes hold K images, a batch of exactly P classes × K images is emitted (the P classes
with the fullest buffers, random tie-break). Buffers survive from one pass to the next, so a
class with fewer than K images in one pass is completed on the next (its images can then
repeat inside a batch). When ``give_up_after`` passes in a row yield no batch (fewer than P
classes with K images reachable), a clear error is raised instead of spinning.
"""
from __future__ import annotations

import random
from collections import defaultdict, deque
from typing import Callable, Iterable, Iterator

import torch

from toolkit.errors import DataError

Sample = tuple[str, torch.Tensor, int]
Batch = tuple[list[str], torch.Tensor, torch.Tensor]  # keys, uint8 images (B, C, H, W), labels (B,)
Passes = Callable[[int], Iterable[Sample]]


def pk_shape(*, batch_size: int, K: int, P: int = 0, num_classes: int) -> tuple[int, int]:
    """Resolve (P, K): ``P=0`` fills the batch with as many classes as fit (seed-like)."""
    if K < 2:
        raise DataError(f"K must be >= 2 (a class needs a positive pair), got {K}")
    if P <= 0:
        P = min(num_classes, batch_size // K)
    if P < 2:
        raise DataError(f"P×K batching needs at least 2 classes per batch (batch_size={batch_size}, K={K})")
    if P > num_classes:
        raise DataError(f"P={P} classes per batch requested but the shards have only {num_classes}")
    if P * K > batch_size:
        raise DataError(f"P×K = {P}×{K} = {P * K} is larger than batch_size={batch_size}")
    return P, K


def collate(items: list[Sample]) -> Batch:
    """Samples -> (keys, uint8 images (B, C, H, W), int64 labels (B,))."""
    keys = [k for k, _, _ in items]
    images = torch.stack([im for _, im, _ in items])  # (B, C, H, W) uint8
    labels = torch.tensor([c for _, _, c in items], dtype=torch.long)  # (B,)
    return keys, images, labels


def eval_batches(items: Iterable[Sample], batch_size: int) -> Iterator[Batch]:
    """Batches of ``batch_size`` in stream order; the last one may be smaller."""
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) == batch_size:
            yield collate(buf)
            buf = []
    if buf:
        yield collate(buf)


def random_batches(passes: Passes, *, batch_size: int, give_up_after: int, source: str, split: str) -> Iterator[Batch]:
    """Batches of ``batch_size`` in stream order, pass after pass; leftovers carry over.

    The order is the stream's own (a shuffling reader makes these random batches). Raises
    DataError, naming ``source`` and ``split``, once ``give_up_after`` passes in a row gave no
    batch and nothing is left over.
    """
    buf: list = []
    pass_index, idle_passes = 0, 0
    while True:
        emitted = False
        for item in passes(pass_index):
            buf.append(item)
            if len(buf) == batch_size:
                emitted = True
                yield collate(buf)
                buf = []
        idle_passes = 0 if emitted else idle_passes + 1
        if idle_passes >= give_up_after and not buf:
            raise DataError(f"{source} reaches no samples of {split!r}")
        pass_index += 1


def pk_batches(passes: Passes, *, P: int, K: int, rng: random.Random, give_up_after: int, source: str) -> Iterator[Batch]:
    """P classes × K images per batch, pass after pass (see the module docstring).

    ``rng`` breaks ties between equally full class buffers. Raises DataError, naming
    ``source``, once ``give_up_after`` passes in a row gave no batch.
    """
    buffers: dict[int, deque] = defaultdict(deque)
    ready: set[int] = set()
    pass_index, idle_passes = 0, 0
    while True:
        emitted = False
        for item in passes(pass_index):
            label = item[2]
            buffers[label].append(item)
            if len(buffers[label]) >= K:
                ready.add(label)
            if len(ready) >= P:
                # Fullest buffers first keeps memory bounded; random tie-break.
                chosen = sorted(ready, key=lambda c: (-len(buffers[c]), rng.random()))[:P]
                items = []
                for c in chosen:
                    items.extend(buffers[c].popleft() for _ in range(K))
                    if len(buffers[c]) < K:
                        ready.discard(c)
                emitted = True
                yield collate(items)
        idle_passes = 0 if emitted else idle_passes + 1
        if idle_passes >= give_up_after:
            have = sum(1 for b in buffers.values() if len(b) >= K)
            raise DataError(
                f"cannot form P×K={P}×{K} batches: only {have} classes with {K} images reachable "
                f"by {source} (lower P or K, or use fewer workers/ranks)"
            )
        pass_index += 1
