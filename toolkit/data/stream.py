"""Streaming loader over WebDataset shards, for any number of ranks and workers.

:class:`ShardStream` is the per-rank dataset: in each data-loader worker it builds the slot's
:class:`~toolkit.data.reader.SlotReader` (which shards this slot reads, decoding, skipped
data) and feeds its passes to a batcher of :mod:`toolkit.data.batching`. Two modes:

* ``train``: each slot streams its shards *forever* (pass after pass, reshuffled per pass),
  builds batches (class-balanced P×K by default, or random), and the loader is cut at exactly
  ``steps_per_epoch`` batches. Every rank therefore yields the same number of batches
  whatever the shard sizes -- DDP never waits on a rank that ran dry.
  P×K batches hold a bounded number of samples whatever the class mix
  (:func:`~toolkit.data.batching.pk_bound`); what the batcher deferred, padded and buffered
  is counted per loader worker (:meth:`ShardStream.pk_stats`). Over shards laid out by class
  (``toolkit shard --group_by_class``, chosen automatically for many small classes) each slot
  reads whole classes, so a class of a few images fills its K in one pass.
* ``eval``: one pass, fixed order, each sample of the split seen exactly once across all
  ranks and workers, with its key; ranks may yield different batch counts (the validator
  gathers results once at the end, it does not step in lockstep).
"""
from __future__ import annotations

import math
import numbers
import random
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import get_worker_info

from toolkit.data.batching import PK_MAX_FIELDS, PKStats, eval_batches, pk_batches, pk_bound, random_batches
from toolkit.data.batching import pk_shape  # noqa: F401 - also imported from here by the training code: the one re-export
from toolkit.data.reader import SkipLog, SlotReader
from toolkit.data.location import shard_url
from toolkit.data.shards import choose_layout, read_info
from toolkit.data.tario import DEFAULT_READ_TIMEOUT_S
from toolkit.errors import ConfigError, DataError

__all__ = ["ShardStream", "make_loader", "pk_shape"]

Mode = Literal["train", "eval"]


class ShardStream(torch.utils.data.IterableDataset):
    """The per-rank dataset. Iterate it through :func:`make_loader` (a WebLoader).

    ``read_timeout_s``: a ``pipe:`` or http shard whose source sends no byte for this many
    seconds stops the reader with :class:`~toolkit.data.tario.StalledRead` (a DataError,
    never skipped as damaged data); 0: wait forever. Local files are not affected.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        split: str = "train",
        mode: Mode = "train",
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 64,
        P: int = 0,
        K: int = 4,
        batching: Literal["pk", "random"] = "pk",
        shuffle_buffer: int = 1000,
        seed: int = 0,
        strict: bool = False,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ):
        super().__init__()
        if isinstance(read_timeout_s, bool) or not isinstance(read_timeout_s, numbers.Real) or not (
                0 <= read_timeout_s < math.inf):
            raise ConfigError(f"read_timeout_s must be a number of seconds >= 0 (0: no timeout), got {read_timeout_s!r}")
        self.read_timeout_s = float(read_timeout_s)
        info = read_info(folder, read_timeout_s=self.read_timeout_s)
        sinfo = info.split(split, folder=folder)
        if sinfo.num_samples == 0:
            raise DataError(f"{folder}: split {split!r} is empty")
        self.folder = str(folder)
        self.urls = [shard_url(folder, f) for f in sinfo.filenames]
        # Expected samples per shard, for the reader's truncation check.
        lengths = sinfo.shard_lengths
        self.shard_lengths = dict(zip(self.urls, lengths)) if len(lengths) == len(self.urls) else {}
        self.num_samples = sinfo.num_samples
        self.classes = list(info.classes)  # the known classes (the model's)
        self.all_classes = info.all_classes  # what a label indexes: known, then held-out classes
        # Train and val hold only known classes; any other split (the test split of held-out
        # classes) may hold every class. A label beyond that is counted as bad_label.
        self.num_labels = len(self.classes) if split in ("train", "val") else len(self.all_classes)
        self.split, self.mode = split, mode
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.batching = batch_size, batching
        if mode == "train" and batching == "pk":
            self.P, self.K = pk_shape(batch_size=batch_size, K=K, P=P, num_classes=len(self.classes))
        else:
            self.P, self.K = 0, 0
        self.shuffle_buffer, self.seed, self.strict = shuffle_buffer, seed, strict
        self.layout = sinfo.layout
        # Images per class (label order), for padding classes of fewer than K; None when not recorded.
        counts = sinfo.class_counts
        names = self.all_classes[: self.num_labels]
        self.class_sizes = [int(counts.get(name, 0)) for name in names] if counts is not None else None
        self.epoch = 0
        self._skips = SkipLog(strict=strict)
        self._pk_log = PKLog()
        if self.P and self.layout == "mixed" and self.class_sizes and choose_layout("auto", self.class_sizes) == "by_class":
            warnings.warn(
                f"{folder}: {split!r} has {len(self.class_sizes)} classes of a few images each in shards that mix "
                f"classes: P×K batches will defer most images and re-read the data; re-shard with "
                f"`toolkit shard --group_by_class`", stacklevel=2,
            )
        if self.P and self.mode == "train" and self.layout == "by_class" and self.class_sizes:
            sizes = sorted(n for n in self.class_sizes if n > 0)
            median = sizes[len(sizes) // 2] if sizes else 0
            if median and shuffle_buffer / median < 4 * self.P:  # the reader's pool holds whole classes a few at a time
                warnings.warn(
                    f"{folder}: {split!r} is laid out by class with classes of {median} images (median): a loader "
                    f"slot's {shuffle_buffer}-sample shuffle pool holds about {max(1, shuffle_buffer // median)} classes, "
                    f"too few for batches of P={self.P} classes (slow, most images deferred); re-shard with "
                    f"`toolkit shard --group_by_class false` (grouping is for many classes of a few images each)",
                    stacklevel=2,
                )

    # --- sizing ---------------------------------------------------------------------------
    @property
    def train_batch_size(self) -> int:
        return self.P * self.K if self.batching == "pk" else self.batch_size

    @property
    def pk_bound(self) -> int:
        """Most samples a loader slot's P×K batcher buffers (its reader adds ``shuffle_buffer``)."""
        return pk_bound(self.P, self.K, self.shuffle_buffer) if self.P else 0

    def steps_per_epoch(self) -> int:
        """Batches per rank per epoch: one pass over the split by all ranks together."""
        return max(1, self.num_samples // (self.world_size * self.train_batch_size))

    # --- skip accounting ------------------------------------------------------------------
    def reset_skip_counts(self, *, num_workers: int) -> None:
        """Zero the skip counters, one row per loader worker, in shared memory (see SkipLog).

        :func:`make_loader` calls this per epoch.
        """
        self._skips.reset(num_workers=num_workers)

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped since the last reset, by kind, summed over this rank's workers."""
        return self._skips.counts()

    def reset_pk_stats(self, *, num_workers: int) -> None:
        """Zero the P×K batcher's counters, one row per loader worker (:func:`make_loader` calls this per epoch)."""
        self._pk_log.reset(num_workers=num_workers)

    def pk_stats(self) -> dict[str, int]:
        """What this rank's P×K batchers did since the last reset (:class:`~toolkit.data.batching.PKStats`):
        counts summed over loader workers; ``peak_buffered``, ``bound`` and ``passes`` the
        largest of any worker. A worker's row is written as it forms each batch, so batches
        it prefetched beyond the loader's cut are included."""
        return self._pk_log.totals()

    def set_epoch(self, epoch: int) -> None:
        # Workers are started afresh each epoch with a copy of this object, so the epoch
        # travels with it and seeds shard order and shuffle in every worker.
        self.epoch = epoch

    # --- iteration ------------------------------------------------------------------------
    def _slot(self) -> tuple[int, int]:
        wi = get_worker_info()
        workers, worker = (wi.num_workers, wi.id) if wi is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self):
        slot, num_slots = self._slot()
        reader = SlotReader(
            urls=self.urls, shard_lengths=self.shard_lengths, num_classes=self.num_labels, skips=self._skips,
            slot=slot, num_slots=num_slots, shuffle=self.mode == "train", shuffle_buffer=self.shuffle_buffer,
            seed=self.seed, epoch=self.epoch, by_class=self.layout == "by_class", chunk=self.K,
            read_timeout_s=self.read_timeout_s,
        )
        if self.mode == "eval":
            yield from eval_batches(reader.read_pass(0), self.batch_size)
            return
        source = f"loader slot {slot}/{num_slots}"
        # Shard order is reshuffled every pass, so a slot dealt only tiny shards for a few
        # passes gets bigger ones later: give up only after ~3 passes per shard.
        give_up_after = 3 * len(self.urls)
        if self.batching == "pk":
            rng = random.Random(f"{self.seed}/{self.epoch}/pk/{slot}")
            hint = "" if self.layout == "by_class" else "; classes of a few images each need shards laid out by class (`toolkit shard --group_by_class`)"
            stats, row = PKStats(), self._pk_log.row()
            try:
                for batch in pk_batches(
                    reader.read_pass, P=self.P, K=self.K, rng=rng, give_up_after=give_up_after, source=source,
                    bound=self.pk_bound, class_sizes=self.class_sizes, class_runs=reader.class_runs, stats=stats, hint=hint,
                ):
                    row.copy_(torch.tensor(stats.values()))
                    yield batch
            finally:  # also when the batcher gives up: the counts say why
                row.copy_(torch.tensor(stats.values()))
        else:
            yield from random_batches(
                reader.read_pass, batch_size=self.batch_size, give_up_after=give_up_after, source=source, split=self.split
            )


class PKLog:
    """The P×K batchers' :class:`~toolkit.data.batching.PKStats`, one row per loader worker.

    Like :class:`~toolkit.data.reader.SkipLog`: a shared (workers, fields) tensor that each
    worker process overwrites in its own row, read by the main process without a lock.
    """

    def __init__(self, num_workers: int = 0):
        self.reset(num_workers=num_workers)

    def reset(self, *, num_workers: int) -> None:
        self._rows = torch.zeros(max(1, num_workers), len(PKStats.FIELDS), dtype=torch.int64).share_memory_()

    def row(self) -> torch.Tensor:
        wi = get_worker_info()
        return self._rows[wi.id if wi is not None and wi.id < len(self._rows) else 0]

    def totals(self) -> dict[str, int]:
        out = {}
        for j, name in enumerate(PKStats.FIELDS):
            column = self._rows[:, j]
            out[name] = int(column.max() if name in PK_MAX_FIELDS else column.sum())
        out["deferred"] = out["deferred_leftover"] + out["deferred_full"] + out["deferred_room"]
        return out


def loader_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's loader generator (its workers' torch seeds): fixed by (seed, epoch)."""
    return (int(seed) * 1_000_003 + int(epoch)) % (1 << 63)


def make_loader(stream: ShardStream, *, num_workers: int = 2, epoch: int = 0):
    """A WebLoader over ``stream`` for one epoch.

    In train mode the loader yields exactly ``stream.steps_per_epoch()`` batches on every
    rank. Batches are already formed in the workers (``batch_size=None``). Never pass this
    loader to ``accelerator.prepare``: it is split by rank already, and
    Accelerate would dispatch or re-shard it (data lost, unequal batch counts).
    """
    import webdataset as wds

    stream.set_epoch(epoch)
    stream.reset_skip_counts(num_workers=num_workers)
    stream.reset_pk_stats(num_workers=num_workers)
    loader = wds.WebLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,  # workers must see the new epoch
        prefetch_factor=4 if num_workers > 0 else None,
        # Each iterator draws its workers' base seed from this generator, not from torch's
        # global RNG: a loader started on resume would otherwise shift every later random
        # draw (augmentation) and a resumed run would diverge from the uninterrupted one.
        generator=torch.Generator().manual_seed(loader_seed(stream.seed, epoch)),
    )
    if stream.mode == "train":
        loader = loader.with_epoch(nbatches=stream.steps_per_epoch())
    return loader
