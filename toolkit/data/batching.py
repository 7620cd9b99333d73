"""Samples -> batches: class-balanced P×K, plain random, and eval batches.

Plain generators over ``(key, uint8 image (C, H, W), class index)`` samples: they know
nothing about tars, ranks or loader workers. The training batchers read *passes*, a
callable ``pass_index -> iterable of samples``, and keep asking for the next pass for as long
as batches are wanted: the caller cuts the stream.

P×K batches (:func:`pk_batches`): per-class buffers fill from the stream; as soon as P
classes are ready, a batch of exactly P classes × K images is emitted (the P fullest
buffers, random tie-break). A class is ready when it holds K distinct images, or all of its
images when the class has fewer than K (but at least 2): those are then repeated to K.
Inside a batch no image appears twice unless its class has fewer than K images: a buffer
holds each image (key) once, and an image arriving again while it waits is not added.

Memory bound. The buffers hold at most ``pk_bound(P, K, shuffle_buffer) = max(32·P·K,
shuffle_buffer)`` samples (2,048 for 16×4), for any class mix: a class holds at most
``bound / P`` images (at least 4·K; what arrives beyond that is deferred), so P full classes
fit in the bound and one large class cannot crowd out the others; when the total would pass
the bound, the class fed least recently is deferred whole. A loader slot therefore holds at most that many
decoded samples in the batcher plus the reader's shuffle buffer (``shuffle_buffer``
samples, plus one class run when shards are laid out by class). Deferred images are not
lost: the stream is read pass after pass, and they come again in the next pass.

Class runs. When shards are laid out by class (``class_runs``, see :mod:`toolkit.data.reader`)
the reader hands each class over in consecutive pieces of K images, the last piece holding
the rest: the class is *settled* whenever its piece ends (the label changes). Its images
beyond a multiple of K are deferred at once, a class of fewer than K images is padded, so
nothing waits for images that will not come this pass and the buffers stay near one batch.
The reader shuffles a class's images every pass, so which images are left over changes
from pass to pass. Without class runs (mixed shards) leftovers wait in their buffers, across
passes, until completed or deferred by the bound.

Nothing is dropped silently: :class:`PKStats` counts what came in, went out (distinct images
and padding repeats), was deferred (by reason) or merged as a duplicate, what is buffered
and its peak. ``received == emitted + deferred + duplicates + buffered`` at every batch.
When ``give_up_after`` passes in a row yield no batch (fewer than P classes can be completed),
or a single pass puts less than a quarter of its images into batches because the bound
deferred most of it (classes too spread out over the stream: mixed shards of many small
classes), a clear error is raised instead of spinning or re-reading the data 4+ times.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Callable, ClassVar, Iterable, Iterator, Sequence

import torch

from toolkit.errors import DataError

# The batcher holds at most this many batches' worth of samples (or the shuffle buffer, if
# larger). A mixed stream of C classes needs about 0.55·C·K samples buffered to complete
# classes without deferring any (measured: 2,231 for 1,000 classes at K = 4): 32 batches of
# 16×4 cover about 900 classes; more classes of few images each belong in shards laid out by
# class, where the batcher holds about one batch.
BOUND_BATCHES = 32

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


# Of PKStats' fields, those that combine over loader slots by their largest value, not their sum.
PK_MAX_FIELDS = ("bound", "peak_buffered", "passes")


def pk_bound(P: int, K: int, shuffle_buffer: int = 1000) -> int:
    """Most samples the P×K batcher buffers: ``max(32·P·K, shuffle_buffer)`` (module docstring)."""
    return max(BOUND_BATCHES * P * K, shuffle_buffer)


@dataclass
class PKStats:
    """What the P×K batcher did, counted (plain ints; the stream copies them per loader worker).

    ``received``: samples taken from the passes; ``emitted``: distinct images placed in
    batches; ``padded``: repeats added to fill classes of fewer than K images; deferred, by
    reason: ``deferred_leftover`` (a class run ended with images beyond a multiple of K, or
    with too few to pair), ``deferred_full`` (a class already held ``bound / P`` images),
    ``deferred_room`` (the bound: the least recently fed class set aside); ``duplicates``: an
    image arriving while it already waited (not added twice); ``buffered`` now and
    ``peak_buffered``, against ``bound``; ``passes`` started and ``batches`` emitted.
    """

    bound: int = 0
    received: int = 0
    emitted: int = 0
    padded: int = 0
    deferred_leftover: int = 0
    deferred_full: int = 0
    deferred_room: int = 0
    duplicates: int = 0
    buffered: int = 0
    peak_buffered: int = 0
    passes: int = 0
    batches: int = 0

    FIELDS: ClassVar[tuple[str, ...]] = ()  # set below the class: the counters' names, in order

    @property
    def deferred(self) -> int:
        return self.deferred_leftover + self.deferred_full + self.deferred_room

    def values(self) -> list[int]:
        return [getattr(self, f) for f in self.FIELDS]


PKStats.FIELDS = tuple(f.name for f in fields(PKStats))  # the counters, in order (one row of PKLog)


def pk_batches(
    passes: Passes,
    *,
    P: int,
    K: int,
    rng: random.Random,
    give_up_after: int,
    source: str,
    bound: int | None = None,
    class_sizes: Sequence[int] | None = None,
    class_runs: bool = False,
    stats: PKStats | None = None,
    hint: str = "",
) -> Iterator[Batch]:
    """P classes × K images per batch, pass after pass (see the module docstring).

    ``rng`` breaks ties between equally full class buffers. ``bound``: most samples buffered
    (default :func:`pk_bound` with a 1000-sample shuffle buffer). ``class_sizes[c]``: images of
    class c in the split (None: unknown, no class is padded). ``class_runs``: the stream
    delivers each class's images of a pass together. ``stats`` (a :class:`PKStats`) is
    updated in place before each batch is yielded. Raises DataError, naming ``source`` (and
    ending with ``hint``), once ``give_up_after`` passes in a row gave no batch.
    """
    bound = pk_bound(P, K) if bound is None else max(int(bound), P * K)
    cap = max(4 * K, bound // P)  # most images one class holds: P full classes fit in the bound
    st = stats if stats is not None else PKStats()
    st.bound = bound
    # label -> {key: sample}, least recently fed class first.
    buffers: OrderedDict[int, dict[str, Sample]] = OrderedDict()
    short: set[int] = set()  # classes of fewer than K images, all of them buffered: padded when emitted
    ready: set[int] = set()

    def few(c: int) -> bool:  # a class with fewer than K images in the split, at least a pair
        return class_sizes is not None and 0 <= c < len(class_sizes) and 2 <= class_sizes[c] < K

    def drop(c: int, n: int, reason: str) -> None:
        """Defer the newest ``n`` images of class ``c`` (all of them: the class leaves)."""
        buf = buffers[c]
        n = min(n, len(buf))
        for _ in range(n):
            buf.popitem()
        setattr(st, reason, getattr(st, reason) + n)
        st.buffered -= n
        if not buf:
            del buffers[c]
        if len(buf) < K:
            ready.discard(c)
            short.discard(c)

    def settle(c: int) -> None:
        """Class ``c``'s run ended: keep whole groups of K (or a padded short class), defer the rest."""
        buf = buffers.get(c)
        if not buf:
            return
        n = len(buf)
        if n >= K:
            if n % K:
                drop(c, n % K, "deferred_leftover")
        elif few(c) and n >= 2:
            short.add(c)
            ready.add(c)
        else:
            drop(c, n, "deferred_leftover")

    def add(item: Sample) -> None:
        key, _, c = item
        st.received += 1
        buf = buffers.get(c)
        if buf is None:
            buf = buffers[c] = {}
        else:
            buffers.move_to_end(c)
        if key in buf:
            st.duplicates += 1
            return
        if len(buf) >= cap:
            st.deferred_full += 1
            return
        buf[key] = item
        st.buffered += 1
        if len(buf) >= K:
            ready.add(c)
            short.discard(c)
        elif not class_runs and few(c) and len(buf) >= class_sizes[c]:
            short.add(c)
            ready.add(c)
        while st.buffered > bound:
            victim = next(iter(buffers))
            if victim == c and len(buffers) > 1:  # never the class just fed while others wait
                buffers.move_to_end(c)
                victim = next(iter(buffers))
            drop(victim, len(buffers[victim]), "deferred_room")
        st.peak_buffered = max(st.peak_buffered, st.buffered)

    def emit() -> Batch:
        # Fullest buffers first keeps memory bounded (a short class counts as full); random tie-break.
        chosen = sorted(ready, key=lambda c: (-max(len(buffers[c]), K if c in short else 0), rng.random()))[:P]
        items: list[Sample] = []
        for c in chosen:
            buf = buffers[c]
            group = [buf.pop(next(iter(buf))) for _ in range(min(K, len(buf)))]
            st.emitted += len(group)
            st.buffered -= len(group)
            st.padded += K - len(group)
            items.extend(group[i % len(group)] for i in range(K))
            if not buf:
                del buffers[c]
            if len(buf) < K:
                ready.discard(c)
                short.discard(c)
        st.batches += 1
        return collate(items)

    pass_index, idle_passes = 0, 0
    while True:
        emitted = False
        st.passes += 1
        last = None
        received, room, out = st.received, st.deferred_room, st.emitted
        for item in passes(pass_index):
            label = item[2]
            if class_runs and last is not None and label != last:
                settle(last)
            last = label
            add(item)
            if len(ready) >= P:
                emitted = True
                yield emit()
        if class_runs and last is not None:
            settle(last)
            if len(ready) >= P:
                emitted = True
                yield emit()
        idle_passes = 0 if emitted else idle_passes + 1
        received, room, out = st.received - received, st.deferred_room - room, st.emitted - out
        if received > bound and 2 * room >= received and 4 * out < received:
            # The bound, not the data, starved a whole pass (less than a quarter of it reached a
            # batch): classes too spread out to complete K within `bound` samples. Every pass
            # is alike, so the loader would re-read the data 4+ times per epoch: say it now.
            raise DataError(
                f"cannot form P×K={P}×{K} batches by {source}: a whole pass of {received} images put only {out} "
                f"into batches within the {bound}-sample buffer bound ({room} deferred for lack of room); the "
                f"bound is max({BOUND_BATCHES}·P·K, shuffle_buffer): a larger shuffle_buffer raises it{hint}"
            )
        if idle_passes >= give_up_after:
            have = len(ready)
            raise DataError(
                f"cannot form P×K={P}×{K} batches: only {have} classes with {K} images reachable "
                f"by {source} (lower P or K, or use fewer workers/ranks; {st.deferred} images deferred, "
                f"buffers capped at {bound} samples){hint}"
            )
        pass_index += 1
