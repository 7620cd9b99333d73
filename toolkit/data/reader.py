"""Reading one loader slot's share of a split: shard files in, decoded samples out, one pass at a time.

Who reads what. Every (rank, data-loader worker) pair is one *slot*; there are
``world_size * num_workers`` slots. Shards are dealt to slots round-robin
(:func:`assign_shards`) in an order that depends on (seed, epoch, pass) only, so all ranks
agree without talking. When there are fewer shards than slots, slots share a shard and each
keeps every m-th sample of it (m = number of sharers) -- nothing is read twice, nothing is
lost, and "1 shard, 2 ranks × 2 workers" is not an error.

Shards laid out by class (``layout: by_class`` in ``_info.json``, see
:func:`toolkit.data.shards.plan_shards`) keep every class whole in one shard. A training
reader (``by_class=True``) keeps them whole: a shard shared by several slots is dealt by
class (each slot keeps every m-th class of it, not every m-th sample), and the shuffle moves
whole classes (:func:`shuffle_runs`), so a slot's P×K batcher receives each class's images
together and can settle a class as soon as it has passed.

How. WebDataset's ``url_opener`` (paths, URLs, ``pipe:``) and ``group_by_keys`` around
:mod:`toolkit.data.tario`'s tar stage, which reads members 5-8× faster than ``tarfile``;
PNGs are decoded by :func:`decode_png`. On 32×32 shards these two changes took one process
from ~2,900 to ~4,000 samples/s. A shuffling reader also reshuffles the shard order every
pass and passes the samples through a shuffle buffer.

Damage. An unreadable sample or tar member, a label outside the class list and a shard
shorter than ``_info.json`` says are skipped, counted by kind and warned about once per
distinct problem (:class:`SkipLog`), or stop the run with one line when strict. A member
over :data:`~toolkit.data.tario.MAX_MEMBER_BYTES` or a compressed shard expanding past
:data:`~toolkit.data.tario.MAX_DECOMPRESSED_BYTES` is damage too (a TarError). A ``pipe:``
or http shard whose source sends nothing for ``read_timeout_s`` seconds is not: it raises
:class:`~toolkit.data.tario.StalledRead`, which is never skipped.
"""
from __future__ import annotations

import io
import random
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch.utils.data import get_worker_info

from toolkit.data.tario import DEFAULT_READ_TIMEOUT_S, SHARD_NAME, StalledRead, tar_samples
from toolkit.errors import DataError

Sample = tuple[str, torch.Tensor, int]  # (key, uint8 image (C, H, W), class index)

# What a skipped item was: an unreadable sample or tar member, a label outside the class list,
# a shard shorter than _info.json says (counted once per short shard per pass).
SKIP_KINDS = ("unreadable", "bad_label", "short_shard")


def assign_shards(num_shards: int, num_slots: int, slot: int) -> tuple[list[int], int, int]:
    """Which shard positions a slot reads, and which of their samples it keeps.

    Returns ``(positions, stride, offset)``: the slot keeps samples ``i`` of those shards
    with ``i % stride == offset``. With at least as many shards as slots, stride is 1.
    """
    if num_shards >= num_slots:
        return list(range(slot, num_shards, num_slots)), 1, 0
    position = slot % num_shards
    sharers = [s for s in range(num_slots) if s % num_shards == position]
    return [position], len(sharers), sharers.index(slot)


def decode_sample(sample: dict) -> Sample:
    """Raw WebDataset sample -> (key, uint8 image (C, H, W), class index)."""
    return sample["__key__"], decode_png(sample["png"]), int(sample["cls"])


def decode_png(data: bytes) -> torch.Tensor:
    """PNG bytes -> uint8 (C, H, W) tensor.

    8-bit grey and RGB PNGs (what ``toolkit shard`` writes) are opened with Pillow's PNG
    plugin directly, skipping format detection and the numpy round trip: about 0.7x the
    time of ``np.array(Image.open(...))`` on 32×32 images. Anything else takes the general
    path, which also produces the error message for a damaged image.
    """
    # IHDR: bit depth at byte 24, colour type at 25 (0 grey, 2 RGB).
    if data[:8] == _PNG_SIGNATURE and len(data) > 25 and data[24] == 8 and data[25] in (0, 2):
        try:
            with PngImagePlugin.PngImageFile(io.BytesIO(data)) as im:
                im.load()
                c = 1 if im.mode == "L" else 3
                pixels = bytearray(im.tobytes())  # writable: torch refuses read-only buffers
                if im.mode in ("L", "RGB") and len(pixels) == c * im.width * im.height:
                    return torch.frombuffer(pixels, dtype=torch.uint8).view(im.height, im.width, c).permute(2, 0, 1).contiguous()
        except Exception:  # noqa: BLE001 - damaged: the general path names the problem
            pass
    with Image.open(io.BytesIO(data)) as im:
        arr = np.array(im)  # a writable copy
    if arr.ndim == 2:
        arr = arr[:, :, None]  # (H, W) -> (H, W, 1)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (C, H, W) uint8


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"



class SkipLog:
    """Skipped data, counted by kind per loader worker; also the tar stage's error handler.

    Loader workers are separate processes holding copies of this object; the counts live in
    a shared (workers, kinds) tensor, so the main process reads every worker's counts without
    a lock (each worker writes only its own row). Warnings are remembered per process, in
    ``warned``.
    """

    def __init__(self, *, strict: bool, num_workers: int = 0):
        self.strict = strict
        self.warned: set = set()  # (where, what) already warned about
        self.reset(num_workers=num_workers)

    def reset(self, *, num_workers: int) -> None:
        """Zero the counters, one row per loader worker (one row for the main process)."""
        self._counts = torch.zeros(max(1, num_workers), len(SKIP_KINDS), dtype=torch.int64).share_memory_()

    def counts(self) -> dict[str, int]:
        """Items skipped since the last reset, by kind, summed over the workers."""
        return dict(zip(SKIP_KINDS, self._counts.sum(0).tolist()))

    def skip(self, exn: Exception, url: str | None = None, key: str | None = None, kind: str = "unreadable") -> bool:
        """Count and warn about ``exn`` (or raise it as a DataError when strict); True: keep going.

        A :class:`~toolkit.data.tario.StalledRead` (a shard's source stopped sending) is not
        damaged data: it is re-raised as it is, strict or not, and stops the reader.
        """
        if isinstance(exn, StalledRead):
            raise exn
        # Name the shard (webdataset appends its URL or open file to exn.args; decode errors
        # pass it in) and count the skips, so a damaged shard is found from one line of the log.
        found = (SHARD_NAME.search(str(a)) for a in ([url] if url else reversed(exn.args)))
        shard = next((m.group(1) for m in found if m), url or "unknown shard")  # also in URLs, pipe: commands
        where = shard + (f", sample {key}" if key else "")
        first = str(exn.args[0]) if exn.args else ""
        first = re.sub(r" <[^>]* at 0x[0-9a-f]+>", "", first.split(" @ ", 1)[0])  # drop object reprs
        what = f"{type(exn).__name__}: {first.splitlines()[0] if first else ''}"[:200]
        if self.strict:
            raise DataError(f"corrupt shard data in {where} ({what}); strict_data is on") from exn
        # Train mode re-reads the same damage every pass: count every skip, warn once per
        # distinct problem (per worker); the loop totals the counts over workers and ranks.
        wi = get_worker_info()
        row = self._counts[wi.id if wi is not None and wi.id < len(self._counts) else 0]
        row[SKIP_KINDS.index(kind)] += 1
        if (where, what) not in self.warned:
            self.warned.add((where, what))
            warnings.warn(f"skipping unreadable data in {where} ({int(row.sum())} skipped so far by this loader worker): {what}", stacklevel=2)
        return True


@dataclass
class SlotReader:
    """One slot's share of a split's shards, read one pass at a time (see the module docstring).

    ``shuffle`` (train mode): the shard order is reshuffled by (seed, epoch, pass) and the
    samples go through a shuffle buffer seeded by (seed, epoch, pass, slot). Without it
    (eval mode) every pass reads the shards in their listed order.
    """

    urls: list[str]
    shard_lengths: dict[str, int]  # url -> samples _info.json promises; a missing url is not checked
    num_classes: int  # labels 0..num_classes-1 are valid (known + held-out classes where the split has them)
    skips: SkipLog
    slot: int = 0
    num_slots: int = 1
    shuffle: bool = False
    shuffle_buffer: int = 1000
    seed: int = 0
    epoch: int = 0
    by_class: bool = False  # the shards hold whole classes: deal and shuffle by class (train mode only)
    chunk: int = 0  # by_class: a class leaves the shuffle pool this many images at a time (the P×K batcher's K); 0: whole
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S  # a pipe:/http shard silent this long: StalledRead; 0: no timeout

    @property
    def class_runs(self) -> bool:
        """True when each class's images of a pass reach the batcher together (one run)."""
        return self.by_class and self.shuffle

    def read_pass(self, pass_index: int = 0) -> Iterator[Sample]:
        """The decoded samples of pass ``pass_index`` over this slot's share."""
        if not self.shuffle:
            return self._decoded(pass_index)
        from webdataset.filters import _shuffle

        rng = random.Random(f"{self.seed}/{self.epoch}/{pass_index}/{self.slot}")
        # Start yielding once a tenth of the buffer is full: workers restart every epoch and
        # a full 1000-sample fill stalls each epoch's first batch by seconds on small data.
        initial = max(1, self.shuffle_buffer // 10)
        if self.class_runs:
            return shuffle_runs(self._decoded(pass_index), bufsize=self.shuffle_buffer, initial=initial, rng=rng,
                                chunk=self.chunk)
        return _shuffle(self._decoded(pass_index), bufsize=self.shuffle_buffer, initial=initial, rng=rng)

    def _decoded(self, pass_index: int) -> Iterator[Sample]:
        """One pass over this slot's shards, decoded and checked, in shard order."""
        order = list(range(len(self.urls)))
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}/{pass_index}").shuffle(order)
        positions, stride, offset = assign_shards(len(order), self.num_slots, self.slot)
        urls = [{"url": self.urls[order[p]]} for p in positions]
        # Only the image and the label are read into memory; the .json metadata is for people.
        raw = tar_samples(iter(urls), handler=self.skips.skip, select_files=_needed_member,
                          read_timeout_s=self.read_timeout_s)
        seen: dict[str, int] = defaultdict(int)  # samples found per shard, decodable or not
        by_run = self.class_runs and stride > 1
        run, last_cls = -1, None
        for i, sample in enumerate(raw):
            seen[sample.get("__url__")] += 1
            # Samples of a shared shard are dealt by position inside the shard (by class run
            # when the shard holds whole classes); the counters run over one shard because
            # `positions` has one shard whenever stride > 1.
            if by_run:
                cls = sample.get("cls")
                if run < 0 or cls != last_cls:
                    run, last_cls = run + 1, cls
                if run % stride != offset:
                    continue
            elif i % stride != offset:
                continue
            try:
                item = decode_sample(sample)
            except Exception as exn:  # noqa: BLE001
                self.skips.skip(exn, sample.get("__url__"), sample.get("__key__"))
                continue
            if not 0 <= item[2] < self.num_classes:  # an index no class of _info.json has
                bad = DataError(f"class index {item[2]} outside the shard folder's {self.num_classes} classes")
                self.skips.skip(bad, sample.get("__url__"), sample.get("__key__"), kind="bad_label")
                continue
            yield item
        # Reached only after a complete pass (a loader cut mid-pass closes this generator).
        # Python's tarfile reads a tar cut at a member boundary as a shorter archive without
        # any error, so truncation is only visible against the promised counts.
        for u in urls:
            expected = self.shard_lengths.get(u["url"])
            if expected is not None and seen[u["url"]] < expected:
                self.skips.skip(DataError(f"only {seen[u['url']]} of {expected} samples found (truncated shard?)"), u["url"], kind="short_shard")


def shuffle_runs(items: Iterable[Sample], *, bufsize: int, initial: int, rng: random.Random,
                 chunk: int = 0) -> Iterator[Sample]:
    """Shuffle a stream of class runs, keeping each run's samples together.

    A *run* is consecutive samples with the same label (a class of a ``by_class`` shard),
    cut at ``bufsize`` samples; its samples are shuffled as it enters a pool. Once the pool
    holds ``initial`` samples, a random run gives out ``chunk`` of its samples (all of them
    when ``chunk`` is 0 or more than it has left) and stays in the pool while it has more;
    while the pool is below ``bufsize`` samples two runs come in for each piece that leaves
    (webdataset's shuffle, per run), then pieces leave until it holds at most ``bufsize``. The
    pool therefore never holds more than ``bufsize`` samples plus one run, and a run is at
    most ``bufsize`` samples. With ``chunk`` = K, a P×K batcher receives K images of a class
    at a time from up to as many classes as the pool holds, instead of a whole large class.
    """
    def runs() -> Iterator[list]:
        run: list = []
        for item in items:
            if run and (item[2] != run[-1][2] or len(run) >= bufsize):
                yield run
                run = []
            run.append(item)
        if run:
            yield run

    pool: list[list] = []
    held = 0

    def add(run: list) -> None:
        nonlocal held
        rng.shuffle(run)
        pool.append(run)
        held += len(run)

    def take() -> list:
        nonlocal held
        j = rng.randrange(len(pool))
        run = pool[j]
        if 0 < chunk < len(run):
            piece = run[-chunk:]
            del run[-chunk:]
        else:
            pool[j] = pool[-1]
            pool.pop()
            piece = run
        held -= len(piece)
        return piece

    source = runs()
    for run in source:
        add(run)
        if held < bufsize:
            extra = next(source, None)
            if extra is not None:
                add(extra)
        if held < initial:
            continue
        yield from take()
        while held > bufsize:
            yield from take()
    while pool:
        yield from take()


def _needed_member(fname: str) -> bool:
    return fname.endswith((".png", ".cls"))
