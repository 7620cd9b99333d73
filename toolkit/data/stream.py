"""Streaming loader over WebDataset shards, for any number of ranks and workers.

:class:`ShardStream` is the per-rank dataset: in each data-loader worker it builds the slot's
:class:`~toolkit.data.reader.SlotReader` (which shards this slot reads, decoding, skipped
data) and feeds its passes to a batcher of :mod:`toolkit.data.batching`. Two modes:

* ``train``: each slot streams its shards *forever* (pass after pass, reshuffled per pass),
  builds batches (class-balanced P×K by default, or random), and the loader is cut at exactly
  ``steps_per_epoch`` batches. Every rank therefore yields the same number of batches
  whatever the shard sizes -- DDP never waits on a rank that ran dry.
* ``eval``: one pass, fixed order, each sample of the split seen exactly once across all
  ranks and workers, with its key; ranks may yield different batch counts (the validator
  gathers results once at the end, it does not step in lockstep).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import get_worker_info

from toolkit.data.batching import eval_batches, pk_batches, random_batches
from toolkit.data.batching import pk_shape  # noqa: F401 - also imported from here by the training code: the one re-export
from toolkit.data.reader import SkipLog, SlotReader
from toolkit.data.location import shard_url
from toolkit.data.shards import read_info
from toolkit.errors import DataError

__all__ = ["ShardStream", "make_loader", "pk_shape"]

Mode = Literal["train", "eval"]


class ShardStream(torch.utils.data.IterableDataset):
    """The per-rank dataset. Iterate it through :func:`make_loader` (a WebLoader)."""

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
    ):
        super().__init__()
        info = read_info(folder)
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
        self.epoch = 0
        self._skips = SkipLog(strict=strict)

    # --- sizing ---------------------------------------------------------------------------
    @property
    def train_batch_size(self) -> int:
        return self.P * self.K if self.batching == "pk" else self.batch_size

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
            seed=self.seed, epoch=self.epoch,
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
            yield from pk_batches(reader.read_pass, P=self.P, K=self.K, rng=rng, give_up_after=give_up_after, source=source)
        else:
            yield from random_batches(
                reader.read_pass, batch_size=self.batch_size, give_up_after=give_up_after, source=source, split=self.split
            )


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
    loader = wds.WebLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,  # workers must see the new epoch
        prefetch_factor=4 if num_workers > 0 else None,
    )
    if stream.mode == "train":
        loader = loader.with_epoch(nbatches=stream.steps_per_epoch())
    return loader
