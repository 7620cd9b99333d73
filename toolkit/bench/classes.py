"""``toolkit bench classes``: P×K streaming over many classes of a few images each.

Stanford Online Products has 22,634 classes of ~5 images. This benchmark streams P×K batches
over two synthetic train splits of the same size, written straight into tar shards (tiny
8×8 grey PNGs, one of 512 random images per sample, so decoding costs what a real small
image costs; no image folder is written):

* ``62``: 62 classes sharing the images evenly (the character set's shape);
* ``many``: 20,000 classes of 3 to 6 images each (uniform, seeded), ~90,000 images.

Each split is written in both layouts of :func:`toolkit.data.shards.plan_shards` (``mixed``:
every shard mixes the classes; ``by_class``: each class whole in one shard), 1000 samples
per shard. Rows: data × layout × batcher, where the batcher is ``new`` (the toolkit's
:func:`~toolkit.data.batching.pk_batches`: bounded, counted) or ``old`` (the P×K batcher
before the bound, kept here as :func:`old_pk_batches` for the comparison: buffers carried
over passes without limit, images may repeat inside a batch). Each row runs one epoch
(``steps_per_epoch`` batches per rank) for 1 rank × 0 workers and for 2 ranks × 2 workers
(the ranks one after the other in this process, as the tests simulate them), cut at
``--max_seconds`` per rank; then per row:

* samples/s: batches consumed per second (loader start included);
* peak buffered samples of any loader slot, against the bound ``max(32·P·K, shuffle_buffer)``;
* repeats: images appearing twice in one batch although their class has at least K images;
* views per image over the epoch: min / mean / max, the share seen exactly once and never;
* passes per epoch: samples read by all slots / train samples (1.0: each image read once);
* deferred: images the batcher set aside (counted; they come again next pass).
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import random
import signal
import time
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.bench import data_root, log, require_ints, write_json
from toolkit.errors import ConfigError

IMAGE_SIDE = 8
SAMPLES_PER_SHARD = 1000
DATASETS = ("62", "many")
LAYOUTS = ("mixed", "by_class")
# (data, layout, batcher): the rows, in table order.
ROWS = (
    ("62", "mixed", "old"), ("62", "mixed", "new"), ("62", "by_class", "new"),
    ("many", "mixed", "old"), ("many", "mixed", "new"), ("many", "by_class", "new"),
)
TOPOLOGIES = ((1, 0), (2, 2))  # (ranks, loader workers per rank)


# --------------------------------------------------------------------------- data


def class_sizes(num_classes: int, low: int, high: int, *, seed: int = 0) -> list[int]:
    """Images per class, uniform in [low, high] (seeded)."""
    rng = random.Random(f"sizes-{seed}")
    return [rng.randint(low, high) for _ in range(num_classes)]


def even_sizes(num_classes: int, total: int) -> list[int]:
    """``total`` images over ``num_classes`` classes, as evenly as possible."""
    return [total // num_classes + (c < total % num_classes) for c in range(num_classes)]


def _tar_member(name: str, data: bytes) -> bytes:
    """One ustar member (header + data padded to 512 bytes): what tarfile writes, ~10× faster."""
    header = bytearray(512)
    header[0:len(name)] = name.encode()
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % len(data)
    header[136:148] = b"00000000000\0"
    header[148:156] = b"        "
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header) + data + b"\0" * (-len(data) % 512)


def write_synthetic_shards(folder: str | Path, sizes: list[int], *, layout: str, seed: int = 0,
                           samples_per_shard: int = SAMPLES_PER_SHARD, side: int = IMAGE_SIDE) -> Path:
    """A train split of ``sizes[c]`` images for each class c, as ``toolkit shard`` lays it out.

    Samples are ``s<8 digits>`` keys with an 8×8 grey PNG (one of 512 random images), the
    class index and a small JSON, in the shard order of :func:`~toolkit.data.shards.plan_shards`
    for ``layout``; ``_info.json`` records classes, counts per class, shard lengths and the
    layout. Returns ``folder``.
    """
    from PIL import Image

    from toolkit.data.shards import FORMAT_VERSION, INFO_NAME, plan_shards

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pngs = []
    for _ in range(512):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8), mode="L").save(buf, format="PNG")
        pngs.append(buf.getvalue())
    classes = [f"c{c:05d}" for c in range(len(sizes))]
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    filenames, lengths = [], []
    plan = plan_shards(labels, layout=layout, samples_per_shard=samples_per_shard, rng=random.Random(f"{seed}-train"))
    for n, chunk in enumerate(plan):
        name = f"train-{n:06d}.tar"
        parts = []
        for i in chunk:
            key, c = f"s{i:08d}", labels[i]
            parts += [_tar_member(f"{key}.png", pngs[i % 512]), _tar_member(f"{key}.cls", str(c).encode()),
                      _tar_member(f"{key}.json", json.dumps({"label": classes[c]}).encode())]
        (folder / name).write_bytes(b"".join(parts) + b"\0" * 1024)
        filenames.append(name)
        lengths.append(len(chunk))
    info = {
        "format_version": FORMAT_VERSION, "classes": classes, "num_classes": len(classes),
        "splits": {"train": {"name": "train", "num_samples": len(labels), "filenames": filenames, "shard_lengths": lengths,
                             "class_counts": dict(zip(classes, sizes)), "layout": layout}},
        "preprocess": {"image_size": side, "grayscale": True, "format": "png"}, "seed": seed,
    }
    (folder / INFO_NAME).write_text(json.dumps(info))
    return folder


# --------------------------------------------------------------------------- the old batcher


def old_pk_batches(passes, *, P: int, K: int, rng: random.Random, give_up_after: int, source: str, stats=None):
    """The P×K batcher before the memory bound (verbatim but for the counting of ``stats``).

    Per-class buffers fill from the stream and survive from one pass to the next without a
    limit; a batch takes the P fullest ready classes. A class with fewer than K images in a
    slot's pass is completed on a later pass, with the same images again.
    """
    from toolkit.data.batching import PKStats, collate
    from toolkit.errors import DataError

    st = stats if stats is not None else PKStats()
    buffers: dict[int, deque] = defaultdict(deque)
    ready: set[int] = set()
    pass_index, idle_passes = 0, 0
    while True:
        emitted = False
        st.passes += 1
        for item in passes(pass_index):
            label = item[2]
            buffers[label].append(item)
            st.received += 1
            st.buffered += 1
            st.peak_buffered = max(st.peak_buffered, st.buffered)
            if len(buffers[label]) >= K:
                ready.add(label)
            if len(ready) >= P:
                chosen = sorted(ready, key=lambda c: (-len(buffers[c]), rng.random()))[:P]
                items = []
                for c in chosen:
                    items.extend(buffers[c].popleft() for _ in range(K))
                    if len(buffers[c]) < K:
                        ready.discard(c)
                emitted = True
                st.buffered -= P * K
                st.emitted += P * K
                st.batches += 1
                yield collate(items)
        idle_passes = 0 if emitted else idle_passes + 1
        if idle_passes >= give_up_after:
            raise DataError(f"cannot form P×K={P}×{K} batches by {source}")
        pass_index += 1


def _old_stream_class():
    """A ShardStream whose P×K batches come from :func:`old_pk_batches` over the old reader."""
    from toolkit.data.batching import PKStats
    from toolkit.data.reader import SlotReader
    from toolkit.data.stream import ShardStream

    class OldStream(ShardStream):
        def __iter__(self):
            slot, num_slots = self._slot()
            reader = SlotReader(
                urls=self.urls, shard_lengths=self.shard_lengths, num_classes=self.num_labels, skips=self._skips,
                slot=slot, num_slots=num_slots, shuffle=True, shuffle_buffer=self.shuffle_buffer,
                seed=self.seed, epoch=self.epoch,
            )
            rng = random.Random(f"{self.seed}/{self.epoch}/pk/{slot}")
            stats, row = PKStats(bound=0), self._pk_log.row()
            for batch in old_pk_batches(reader.read_pass, P=self.P, K=self.K, rng=rng, give_up_after=3 * len(self.urls),
                                        source=f"slot {slot}", stats=stats):
                row.copy_(torch.tensor(stats.values()))
                yield batch

    return OldStream


# --------------------------------------------------------------------------- one row


class _OutOfTime(BaseException):  # not an Exception: the readers skip those
    pass


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise _OutOfTime in this (main) thread after ``seconds``, wherever it is waiting."""
    def expire(_signum, _frame):
        raise _OutOfTime()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_row(shards: Path, *, batcher: str, ranks: int, workers: int, batch_size: int, K: int, seed: int,
            max_seconds: float) -> dict[str, Any]:
    """One epoch of P×K batches over ``shards`` for ``ranks`` ranks × ``workers`` workers, measured."""
    import warnings

    from toolkit.data.stream import ShardStream, make_loader

    cls = _old_stream_class() if batcher == "old" else ShardStream
    views: Counter = Counter()
    repeats = batches = samples = received = 0
    peak = bound = passes = deferred = padded = 0
    seconds, complete, error = 0.0, True, ""
    sizes = None
    num_samples = steps = 0
    for rank in range(ranks):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the many-small-classes warning over mixed shards: the row says it
            stream = cls(shards, split="train", mode="train", rank=rank, world_size=ranks, batch_size=batch_size, K=K, seed=seed)
        sizes, num_samples, steps = stream.class_sizes, stream.num_samples, stream.steps_per_epoch()
        t0 = time.perf_counter()
        loader = make_loader(stream, num_workers=workers, epoch=0)
        it = iter(loader)
        got = 0
        try:
            with _deadline(max_seconds):  # also when no batch comes at all
                for keys, _images, labels in it:
                    got += 1
                    samples += len(keys)
                    views.update(keys)
                    for key, n in Counter(keys).items():
                        if n > 1 and sizes[int(labels[list(keys).index(key)])] >= K:
                            repeats += n - 1
        except _OutOfTime:
            pass
        except Exception as exc:  # noqa: BLE001 - the loader gave up: the row says why
            error = str(exc).strip().splitlines()[-1]
        finally:
            seconds += time.perf_counter() - t0
            close = getattr(it, "close", None)
            if close is not None:
                close()  # stop the workers now, in this process
            del it, loader
            gc.collect()  # before the next rank forks its workers
            stats = stream.pk_stats()
        batches += got
        complete = complete and got >= steps
        received += stats["received"]
        peak, bound, passes = max(peak, stats["peak_buffered"]), max(bound, stats["bound"]), max(passes, stats["passes"])
        deferred += stats["deferred"]
        padded += stats["padded"]
    counts = np.array([views.get(f"s{i:08d}", 0) for i in range(num_samples)])
    return {
        "batcher": batcher, "ranks": ranks, "workers": workers, "batches": batches, "steps": steps * ranks,
        "complete_epoch": complete, "seconds": seconds, "samples_per_s": samples / seconds if seconds else 0.0,
        "peak_buffered": peak, "bound": bound, "repeats_in_batches": repeats,
        "views_min": int(counts.min()), "views_mean": float(counts.mean()), "views_max": int(counts.max()),
        "seen_once": float((counts == 1).mean()), "seen_never": float((counts == 0).mean()),
        "passes_per_epoch": received / num_samples, "max_passes_started": passes, "deferred": deferred, "padded": padded,
        "error": error,
    }


# --------------------------------------------------------------------------- table


def _fmt_rate(r: dict) -> str:
    if r["error"]:
        return f"fails after {r['batches']} batches, {r['seconds']:.0f} s: {r['error'][:60]}..."
    rate = f"{r['samples_per_s']:,.0f}"
    return rate if r["complete_epoch"] else f"{rate} ({r['batches']}/{r['steps']} batches in {r['seconds']:.0f} s)"


def format_table(rows: list[dict]) -> str:
    lines = [
        "| classes | layout | batcher | ranks × workers | samples/s | vs 62 | peak buffered (bound) | repeats in batches | "
        "views per image min / mean / max | seen once | never seen | passes per epoch | deferred |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    base = {(r["ranks"], r["workers"]): r["samples_per_s"] for r in rows if r["data"] == "62" and r["layout"] == "mixed"
            and r["batcher"] == "new"}
    for r in rows:
        ref = base.get((r["ranks"], r["workers"]))
        vs = f"{r['samples_per_s'] / ref:.2f}×" if ref else "-"
        bound = f"{r['bound']:,}" if r["bound"] else "none"
        lines.append(
            f"| {r['classes']:,} | {r['layout']} | {r['batcher']} | {r['ranks']} × {r['workers']} | {_fmt_rate(r)} | {vs} | "
            f"{r['peak_buffered']:,} ({bound}) | {r['repeats_in_batches']:,} | {r['views_min']} / {r['views_mean']:.2f} / "
            f"{r['views_max']} | {r['seen_once']:.0%} | {r['seen_never']:.0%} | {r['passes_per_epoch']:.2f} | {r['deferred']:,} |"
        )
    return "\n".join(lines)


def _pick(value: Any, known: tuple, name: str) -> list[str]:
    items = [str(v).strip() for v in (value if isinstance(value, (list, tuple)) else str(value).split(",")) if str(v).strip()]
    bad = [v for v in items if v not in known]
    if not items or bad:
        raise ConfigError(f"toolkit bench classes: --{name} takes a comma list of {', '.join(known)}; got {value!r}")
    return items


def main(*, classes: int = 20000, low: int = 3, high: int = 6, batch_size: int = 64, K: int = 4, data: str = "62,many",
         topologies: str = "1x0,2x2", max_seconds: float = 30.0, seed: int = 0, out: str = "") -> dict:
    """Print the table (see the module docstring); ``--out FILE.json`` also writes every number."""
    require_ints("classes", [("classes", classes, 2), ("low", low, 1), ("high", high, low), ("batch_size", batch_size, 4),
                             ("K", K, 2), ("seed", seed, 0)])
    wanted = _pick(data, DATASETS, "data")
    topo = []
    for t in _pick(topologies, ("1x0", "1x2", "2x2", "2x1", "4x1"), "topologies"):
        r, w = t.split("x")
        topo.append((int(r), int(w)))
    many = class_sizes(classes, low, high, seed=seed)
    sets = {"many": many, "62": even_sizes(62, sum(many))}
    report: dict[str, Any] = {"classes": classes, "images": sum(many), "batch_size": batch_size, "K": K, "rows": []}
    with data_root() as (root, _temporary):
        folders = {}
        for name in wanted:
            for layout in LAYOUTS:
                if any(d == name and lay == layout for d, lay, _ in ROWS):
                    t0 = time.perf_counter()
                    folders[name, layout] = write_synthetic_shards(root / f"classes-{name}-{layout}-{seed}", sets[name],
                                                                   layout=layout, seed=seed)
                    log(f"wrote {name} classes, {layout}: {sum(sets[name]):,} images in {time.perf_counter() - t0:.1f} s")
        for name, layout, batcher in ROWS:
            if name not in wanted:
                continue
            for ranks, workers in topo:
                r = run_row(folders[name, layout], batcher=batcher, ranks=ranks, workers=workers, batch_size=batch_size,
                            K=K, seed=seed, max_seconds=max_seconds)
                r.update(data=name, classes=len(sets[name]), layout=layout)
                report["rows"].append(r)
                log(f"{name} {layout} {batcher} {ranks}x{workers}: {r['samples_per_s']:,.0f} samples/s, peak {r['peak_buffered']:,}, "
                    f"repeats {r['repeats_in_batches']}, passes {r['passes_per_epoch']:.2f}")
    print(f"P×K streaming, batch {batch_size} (K = {K}), {sum(many):,} train images of {IMAGE_SIDE}×{IMAGE_SIDE} grey: "
          f"62 classes vs {classes:,} classes of {low}-{high}")
    print(format_table(report["rows"]))
    if out:
        write_json(out, report)
    return report
