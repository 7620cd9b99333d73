"""``toolkit bench loader``: samples/s of the shard stream vs the seed's way of reading.

Two data sets, built once per run (in a temporary folder, or under ``$TOOLKIT_CACHE/bench``
when that is set, so repeated runs reuse them):

* ``camera``: synthetic 1200×900 RGB PNG originals (:func:`write_camera_folder`);
* ``small``: the 62-class 64×64 grey character images (:func:`write_chars_folder`).

Each is sharded the way ``toolkit shard`` does by default (32×32 grey PNGs, 1000 per tar).
Both sides then produce the same thing, ``N`` normalised float tensors of shape
``(B, 1, 32, 32)`` (Normalize(0.5, 0.5)) with labels, from the *train split* images:

* **toolkit**: ``ShardStream(mode="train", batching="random", batch_size=B)`` +
  ``make_loader(num_workers=W)`` cut at ``N / B`` batches; the uint8 batches are converted
  and normalised in the main process (what :func:`toolkit.data.transforms.to_model_input`
  does on the device).
* **seed**: a map-style ``Dataset`` over a pandas manifest (path, label) whose
  ``__getitem__`` does ``Image.open(path).convert("L").resize((32, 32))`` + ``ToTensor`` +
  ``Normalize(0.5, 0.5)`` on the *original* file, in a ``DataLoader(batch_size=B,
  num_workers=W)`` shuffling like ``shuffle=True`` (a ``RandomSampler`` drawing ``N``
  samples: successive permutations, so one loader covers several epochs of a small set).

Timing: the clock starts before the loader is built and stops after the last batch is
consumed, so loader construction and worker start-up are *included*, once, on both sides.
Files are warm in the OS page cache on both sides (they were just written or read). Runs
alternate A B B A ... and each side reports its best run.

Then, per loader worker process (``--per_worker``, on by default): the toolkit loader alone
with 1, 2, ... ``--workers`` workers (:func:`worker_counts`), over the same originals
resharded into at least one train shard per worker (:func:`worker_shards`), delivering the
uint8 batches ``train_step`` receives. Steady samples/s and samples/s per worker; from the
per-worker rate, how many workers a GPU training at ``--gpu_rates`` images/s needs.
"""
from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from toolkit.bench import cores, data_root, log, require_ints, write_json
from toolkit.errors import ConfigError

SIZES = ("camera", "small")
IMAGE_SIZE = 32  # shards and the seed both end at 32×32 grey
VAL_FRACTION = 0.15  # write_shards' default split
# The targets: toolkit / seed samples/s.
TARGETS = {"camera": 10.0, "small": 1.0}
CAMERA_CLASSES, CAMERA_MIN_PER_CLASS = 4, 25
SMALL_PER_CLASS, SMALL_SIDE = 40, 64
# Samples read per side when --images is not given (rounded up to whole batches).
DEFAULT_IMAGES = {"camera": 512, "small": 4096}


# --------------------------------------------------------------------------- side B: the seed


class SeedFolderDataset(Dataset):
    """The seed's reading: pandas manifest, one PIL open + grey + resize per item."""

    def __init__(self, manifest: pd.DataFrame, root: str | Path, *, image_size: int = IMAGE_SIZE):
        from torchvision import transforms as T

        self.paths = [str(Path(root) / p) for p in manifest["path"]]
        self.manifest = manifest.reset_index(drop=True)  # columns: path, label, index
        self.image_size = image_size
        self.transform = T.Compose([T.ToTensor(), T.Normalize((0.5,), (0.5,))])

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self.manifest.iloc[i]
        # Bilinear like torchvision's Resize and the toolkit's shard-time resize.
        img = Image.open(self.paths[i]).convert("L").resize((self.image_size, self.image_size), Image.BILINEAR)
        return self.transform(img), int(row["index"])  # (1, 32, 32) float in [-1, 1], class


def seed_iter(manifest: pd.DataFrame, root: Path, *, batch_size: int, workers: int, num_samples: int, seed: int):
    dataset = SeedFolderDataset(manifest, root)
    sampler = RandomSampler(dataset, num_samples=num_samples, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)
    for x, y in loader:
        yield x, y  # x: (B, 1, 32, 32) float


# --------------------------------------------------------------------------- side A: the toolkit


def toolkit_iter(shards: Path, *, batch_size: int, workers: int, num_batches: int, seed: int):
    from toolkit.data.stream import ShardStream, make_loader

    stream = ShardStream(shards, split="train", mode="train", batching="random", batch_size=batch_size, seed=seed)
    loader = make_loader(stream, num_workers=workers).with_epoch(nbatches=num_batches)
    for _keys, images, labels in loader:
        x = images.float().div_(255.0).sub_(0.5).div_(0.5)  # uint8 (B,1,32,32) -> float in [-1, 1]
        yield x, labels


def time_side(make: Callable[[], Iterable], num_batches: int) -> dict[str, float]:
    """Build the iterator and drain ``num_batches`` batches; start-up is inside the clock."""
    t0 = time.perf_counter()
    samples = batches = 0
    first = None
    it = iter(make())
    for x, _y in it:
        samples += x.shape[0]
        batches += 1
        if first is None:
            first = time.perf_counter() - t0
        if batches == num_batches:
            break
    seconds = time.perf_counter() - t0
    close = getattr(it, "close", None)
    if close is not None:
        close()  # stop the workers now (outside the clock)
    if batches < num_batches:
        raise RuntimeError(f"loader ended after {batches} of {num_batches} batches")
    return {"samples": samples, "seconds": seconds, "first_batch_s": first or 0.0, "samples_per_s": samples / seconds}


# --------------------------------------------------------------------------- per worker process


def loader_rate(shards: Path, *, batch_size: int, workers: int, batches: int, seed: int = 0,
                consume: Callable[[torch.Tensor], Any] | None = None, batching: str = "random") -> dict[str, float]:
    """Steady samples/s of the training loader (``ShardStream`` random batches + ``make_loader``
    with ``workers`` processes): the uint8 batches ``train_step`` receives, each passed to
    ``consume`` (e.g. the move to the GPU) when given.

    The clock starts once every worker has delivered one batch (the loader takes them from
    its workers in turn), so it measures the rate a long epoch runs at; worker start-up is
    reported apart (``startup_s``: loader built to that point).
    """
    from toolkit.data.stream import ShardStream, make_loader

    stream = ShardStream(shards, split="train", mode="train", batching=batching, batch_size=batch_size, seed=seed)
    warm = max(1, workers)
    t0 = time.perf_counter()
    loader = make_loader(stream, num_workers=workers).with_epoch(nbatches=warm + batches)
    samples = seen = 0
    t_warm = t0
    for _keys, images, _labels in loader:
        if consume is not None:
            consume(images)
        seen += 1
        if seen == warm:
            t_warm = time.perf_counter()
        elif seen > warm:
            samples += images.shape[0]
    seconds = time.perf_counter() - t_warm
    if seen < warm + batches:
        raise RuntimeError(f"loader ended after {seen} of {warm + batches} batches")
    return {"workers": workers, "samples": samples, "seconds": seconds, "samples_per_s": samples / seconds,
            "samples_per_s_per_worker": samples / seconds / max(1, workers), "startup_s": t_warm - t0}


def worker_counts(max_workers: int) -> list[int]:
    """1, 2, ... up to ``max_workers``: every count up to 4, then powers of two and the maximum."""
    counts = [w for w in range(1, max_workers + 1) if w <= 4 or (w & (w - 1)) == 0]
    if max_workers >= 1 and counts[-1] != max_workers:
        counts.append(max_workers)
    return counts


def workers_needed(images_per_s: float, per_worker: float) -> int:
    """Loader worker processes that deliver ``images_per_s`` at ``per_worker`` samples/s each."""
    return max(1, math.ceil(images_per_s / per_worker))


def per_worker_view(shards: Path, *, batch_size: int, max_workers: int, seed: int, repeats: int,
                    batches_per_worker: int = 128) -> list[dict]:
    """:func:`loader_rate` for each of :func:`worker_counts` (best of ``repeats`` runs each)."""
    rows = []
    for w in worker_counts(max_workers):
        batches = max(16, batches_per_worker * w)
        runs = [loader_rate(shards, batch_size=batch_size, workers=w, batches=batches, seed=seed) for _ in range(repeats)]
        best = max(runs, key=lambda r: r["samples_per_s"])
        rows.append({**best, "runs": [r["samples_per_s"] for r in runs]})
        log(f"  {w} worker(s): {best['samples_per_s']:,.0f} samples/s ({best['samples_per_s_per_worker']:,.0f} per worker, "
            f"start-up {best['startup_s']:.2f} s)")
    one = rows[0]["samples_per_s"]
    for row in rows:
        row["vs_one_worker"] = row["samples_per_s"] / one
    return rows


def sizing_row(rows: list[dict], nproc: int) -> dict:
    """The row whose per-worker rate sizes the loader: the most workers measured that leave a
    core to the training process (workers + 1 <= nproc); more share cores, and their
    per-worker rate says more about this machine than about the loader."""
    fits = [r for r in rows if r["workers"] <= max(1, nproc - 1)]
    return fits[-1] if fits else rows[0]


def format_per_worker(rows: list[dict], gpu_rates: list[float], *, nproc: int) -> str:
    """The per-worker table and how many workers a GPU training at each of ``gpu_rates``
    images/s needs, at the per-worker rate of :func:`sizing_row`."""
    lines = [
        "| loader workers | samples/s | samples/s per worker | vs 1 worker | start-up s |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['samples_per_s']:,.0f} | {r['samples_per_s_per_worker']:,.0f} | "
                     f"{r['vs_one_worker']:.2f}× | {r['startup_s']:.2f} |")
    last = sizing_row(rows, nproc)
    rate = last["samples_per_s_per_worker"]
    lines.append("")
    for n in gpu_rates:
        need = workers_needed(n, rate)
        spare = max(1, nproc - 1)  # one core stays with the training process
        cores_note = "" if need <= spare else f" (more than the {spare} core(s) this machine has beside the training process)"
        lines.append(f"a GPU at {n:,.0f} images/s needs {need} loader worker(s): {n:,.0f} / {rate:,.0f} samples/s "
                     f"per worker (measured with {last['workers']} worker(s) and the main process on {nproc} core(s)), rounded up{cores_note}")
    return "\n".join(lines)


def as_bool(what: str, name: str, value: Any) -> bool:
    """A boolean option as fire passes it (``--x``, ``--nox``, ``--x false``, ``--x=0`` ...)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"toolkit bench {what}: --{name} must be true or false, got {value!r}")


def _rates(value: Any) -> list[float]:
    """``--gpu_rates 2000,10000`` (fire gives a tuple, an int or a string) as a list of floats."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        rates = [float(v) for v in items if str(v).strip()]
    except ValueError:
        rates = []
    if not rates or any(not math.isfinite(r) or r <= 0 for r in rates):
        raise ConfigError(f"toolkit bench loader: --gpu_rates must be positive numbers (images/s), e.g. 2000,10000; got {value!r}")
    return rates


# --------------------------------------------------------------------------- data


def _train_count(per_class: int, num_classes: int) -> int:
    """Train images per write_shards' stratified split (round(0.15 n) per class to val)."""
    n_val = min(int(round(VAL_FRACTION * per_class)), per_class - 1) if per_class > 1 else 0
    return num_classes * (per_class - n_val)


def _slots(workers: int) -> int:
    return max(1, workers)


def _camera_per_class(batch_size: int, workers: int) -> int:
    """Smallest count ≥ 25 that gives every loader worker at least one batch per pass.

    The random-batching stream drops each worker's remainder at the end of a pass and
    gives up on a worker that cannot fill a single batch, so the camera set must hold at
    least ``workers × batch_size`` train images.
    """
    pc = CAMERA_MIN_PER_CLASS
    while _train_count(pc, CAMERA_CLASSES) // _slots(workers) < batch_size:
        pc += 1
    return pc


def _min_slot_share(lengths: list[int], slots: int) -> int:
    """Fewest samples any loader slot can get in one pass, whatever the shard order."""
    from toolkit.data.reader import assign_shards

    worst = min(lengths) if lengths else 0
    shares = []
    for slot in range(slots):
        positions, stride, offset = assign_shards(len(lengths), slots, slot)
        if stride == 1:
            shares.append(sum(sorted(lengths)[: len(positions)]))  # the smallest shards land here
        else:
            shares.append(len(range(offset, worst, stride)))
    return min(shares)


def _file_stats(folder: Path, paths: list[str]) -> dict[str, Any]:
    sizes = [os.path.getsize(folder / p) for p in paths]
    with Image.open(folder / paths[0]) as im:
        width, height, mode = im.width, im.height, im.mode
    return {
        "count": len(paths),
        "width": width,
        "height": height,
        "mode": mode,
        "format": "PNG",
        "mean_bytes": int(sum(sizes) / len(sizes)),
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _shards_for(folder: Path, out: Path, *, seed: int, samples_per_shard: int = 1000):
    """Shard ``folder`` into ``out`` (32×32 grey), re-using a matching earlier output."""
    from toolkit.data.shards import INFO_NAME, read_info, write_shards

    if (out / INFO_NAME).is_file():
        try:
            info = read_info(out)
            if (
                info.source == str(folder.resolve())
                and info.image_size == IMAGE_SIZE
                and info.seed == seed
                and max(info.splits["train"].shard_lengths or [0]) <= samples_per_shard
            ):
                return info
        except Exception:  # noqa: BLE001 - anything odd: rebuild
            pass
    return write_shards(
        folder, out, image_size=IMAGE_SIZE, grayscale=True, seed=seed, overwrite=out.exists(), progress=False,
        samples_per_shard=samples_per_shard,
    )


def worker_shards(folder: Path, root: Path, *, workers: int, seed: int = 0) -> Path:
    """``folder`` sharded (32×32 grey) into at least ``workers`` train shards, under ``root``.

    With fewer shards than loader workers the reader stripes every shard across the workers:
    each then parses every tar member to decode one in W, which is not how a large data set
    (many shards per worker) is read. The per-worker figures use these shards.
    """
    base = root / f"{folder.name}-shards{IMAGE_SIZE}"
    train = _shards_for(folder, base, seed=seed).splits["train"]
    per_shard = max(1, min(1000, train.num_samples // max(1, workers)))
    if len(train.filenames) >= workers:
        return base
    out = root / f"{folder.name}-shards{IMAGE_SIZE}-x{per_shard}"
    _shards_for(folder, out, seed=seed, samples_per_shard=per_shard)
    return out


def digits_shards(root: Path, *, seed: int = 0) -> Path:
    """The demo's digits shards (32×32 grey) under ``root``, built once and re-used."""
    from toolkit.datasets import write_digits_folder

    folder = write_digits_folder(root / "digits")
    out = root / "digits-shards32"
    _shards_for(folder, out, seed=seed)
    return out


def build_data(kind: str, root: Path, *, per_class: int, seed: int) -> tuple[Path, Path, dict]:
    """(originals folder, shard folder, shard info) for data set ``kind``."""
    from toolkit.datasets import write_camera_folder, write_chars_folder

    t0 = time.perf_counter()
    if kind == "camera":
        n = CAMERA_CLASSES * per_class
        log(f"camera originals: {n} RGB PNGs 1200×900 ...")
        folder = write_camera_folder(
            root / f"camera-{CAMERA_CLASSES}x{per_class}-s{seed}", num_classes=CAMERA_CLASSES, per_class=per_class,
            seed=seed, progress=False,
        )
    else:
        log(f"small originals: {62 * per_class} grey PNGs {SMALL_SIDE}×{SMALL_SIDE} ...")
        folder = write_chars_folder(
            root / f"chars-{per_class}-{SMALL_SIDE}px-s{seed}", per_class=per_class, size=SMALL_SIDE, seed=seed,
            progress=False,
        )
    shards = root / f"{folder.name}-shards{IMAGE_SIZE}"
    info = _shards_for(folder, shards, seed=seed)
    log(f"  ready in {time.perf_counter() - t0:.1f} s ({folder})")
    return folder, shards, info


# --------------------------------------------------------------------------- machine and report


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"nproc": cores(), "cpu": cpu, "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("torchvision", "PIL", "webdataset"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = "?"
    return info


def _originals_cell(o: dict) -> str:
    mode = "RGB" if o["mode"] == "RGB" else "grey"
    return f"{o['count']} {mode} {o['format']} {o['width']}×{o['height']}, {_human_bytes(o['mean_bytes'])} each"


def format_table(results: list[dict]) -> str:
    rows = [
        "| data | originals (size) | toolkit samples/s | seed samples/s | ratio |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for r in results:
        mark = "✓" if r["meets_target"] else "✗"
        rows.append(
            f"| {r['data']} | {_originals_cell(r['originals'])} | {r['toolkit']['samples_per_s']:,.0f} | "
            f"{r['seed']['samples_per_s']:,.0f} | {r['ratio']:.2f}× (target ≥{r['target']:g}× {mark}) |"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------- entry point


def main(
    *,
    size: str = "both",
    batch_size: int = 64,
    workers: int = 2,
    images: int | None = None,
    out: str | None = None,
    per_class: int | None = None,
    seed: int = 0,
    repeats: int = 2,
    per_worker: bool = True,
    gpu_rates: Any = "2000,10000",
) -> dict:
    """Shard stream vs the seed's per-item PIL reading, in samples/s; prints a markdown table.

    Then (``per_worker``) the toolkit loader alone with 1, 2, ... ``workers`` worker
    processes: steady samples/s and samples/s per worker of the uint8 batches training
    receives, and how many workers a GPU at each of ``gpu_rates`` images/s needs.

    Args:
        size: camera (1200×900 RGB originals), small (64×64 grey characters) or both.
        batch_size: samples per batch, both sides.
        workers: data-loader worker processes, both sides (0 = read in the main process).
        images: samples each side reads per run (rounded up to whole batches); default
            512 for camera, 4096 for small (with the data build, about 2-3 min in all on 2 busy cores).
        out: also write the results as JSON to this file (atomically).
        per_class: originals per class; default 40 for small (62 classes) and, for camera
            (4 classes), at least 25 and enough for every worker to fill one batch.
        seed: data generation, split and shuffling seed.
        repeats: timed runs per side, alternating A B B A ...; each side reports its best.
        per_worker: also the per-worker-process view (on the small set when it is built, else
            camera; resharded into at least ``workers`` train shards, one reader per shard).
        gpu_rates: GPU training rates (images/s) to size the loader for, e.g. 2000,10000.
    """
    kinds = list(SIZES) if size == "both" else [size]
    if size not in (*SIZES, "both"):
        raise ConfigError(f"toolkit bench loader: --size must be camera, small or both, got {size!r}")
    require_ints("loader", (("batch_size", batch_size, 1), ("workers", workers, 0), ("repeats", repeats, 1)))
    per_worker = as_bool("loader", "per_worker", per_worker)
    rates = _rates(gpu_rates)
    for name, value in (("images", images), ("per_class", per_class)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"toolkit bench loader: --{name} must be a positive integer, got {value!r}")

    machine = machine_info()
    results = []
    folders: dict[str, Path] = {}
    scaling: list[dict] = []
    with data_root() as (root, temporary):
        for kind in kinds:
            if kind == "camera":
                pc = per_class or _camera_per_class(batch_size, workers)
            else:
                pc = per_class or SMALL_PER_CLASS
            folder, shards, info = build_data(kind, root, per_class=pc, seed=seed)
            folders[kind] = folder
            results.append(
                _bench_one(kind, folder, shards, info, batch_size=batch_size, workers=workers,
                           images=images or DEFAULT_IMAGES[kind], seed=seed, repeats=repeats)
            )
        scaled = "small" if "small" in folders else kinds[0]
        if per_worker and workers >= 1:
            log(f"per worker process ({scaled}, up to {workers} worker(s)):")
            shards = worker_shards(folders[scaled], root, workers=workers, seed=seed)
            scaling = per_worker_view(shards, batch_size=batch_size, max_workers=workers, seed=seed, repeats=repeats)

    num_batches = {r["data"]: r["batches"] for r in results}
    report = {
        "benchmark": "loader",
        "machine": machine,
        "settings": {
            "batch_size": batch_size,
            "workers": workers,
            "repeats": repeats,
            "seed": seed,
            "image_size": IMAGE_SIZE,
            "startup_included": True,
            "data_dir": None if temporary else str(root),
        },
        "results": results,
    }
    if scaling:
        sizing = sizing_row(scaling, machine["nproc"])
        rate = sizing["samples_per_s_per_worker"]
        report["per_worker"] = {
            "data": scaled, "rows": scaling, "samples_per_s_per_worker": rate, "measured_with_workers": sizing["workers"],
            "workers_needed": {f"{n:g}": workers_needed(n, rate) for n in rates},
        }
    print("## toolkit bench loader\n")
    print(
        f"machine: nproc {machine['nproc']}, {machine['cpu']}, torch {machine['torch']}, "
        f"torchvision {machine['torchvision']}, Pillow {machine['PIL']}, webdataset {machine['webdataset']}, "
        f"Python {machine['python']}"
    )
    print(
        f"setup: batch {batch_size}, {workers} loader worker(s) on both sides, "
        + ", ".join(f"{k} {n} batches" for k, n in num_batches.items())
        + f" per run; best of {repeats} run(s) per side, alternating A B B A; the clock includes loader "
        "construction and worker start-up on both sides. Both sides yield normalised float (B, 1, 32, 32) "
        "from the train split."
    )
    print(
        "toolkit = ShardStream(mode=train, batching=random) + make_loader over 32×32 grey PNG shards "
        "(uint8 -> float/Normalize in the main process); seed = pandas manifest + Dataset doing "
        "PIL open -> convert('L') -> resize(32, 32) -> ToTensor -> Normalize(0.5, 0.5) on the originals, "
        "torch DataLoader (shuffled).\n"
    )
    print(format_table(results))
    if scaling:
        print(
            f"\nPer loader worker process ({scaled} set, 32×32 grey PNG shards, at least one train shard per "
            f"worker; batch {batch_size}; best of {repeats} run(s)): the uint8 batches training receives, "
            "nothing done to them in the main process. Steady rate: the clock starts once every worker has "
            "delivered its first batch (start-up shown apart).\n"
        )
        print(format_per_worker(scaling, rates, nproc=machine["nproc"]))
    if out:
        write_json(out, report)
    return report


def _bench_one(kind: str, folder: Path, shards: Path, info, *, batch_size: int, workers: int, images: int,
               seed: int, repeats: int) -> dict:
    train = info.splits["train"]
    share = _min_slot_share(list(train.shard_lengths), _slots(workers))
    if share < batch_size:
        raise ConfigError(
            f"toolkit bench loader: {kind}: each of {_slots(workers)} loader slot(s) gets as few as {share} of the "
            f"{train.num_samples} train images, fewer than --batch_size {batch_size}; raise --per_class or "
            "lower --batch_size/--workers"
        )
    listed = pd.read_csv(shards / "manifest.csv")
    listed = listed[listed["status"] == "ok"]
    manifest = listed[listed["split"] == "train"][["path", "label", "index"]]  # what the seed side reads
    num_batches = math.ceil(images / batch_size)
    num_samples = num_batches * batch_size

    def side_a():
        return toolkit_iter(shards, batch_size=batch_size, workers=workers, num_batches=num_batches, seed=seed)

    def side_b():
        return seed_iter(manifest, folder, batch_size=batch_size, workers=workers, num_samples=num_samples, seed=seed)

    runs: dict[str, list[dict]] = {"toolkit": [], "seed": []}
    order = []
    for r in range(repeats):
        order += [("toolkit", side_a), ("seed", side_b)] if r % 2 == 0 else [("seed", side_b), ("toolkit", side_a)]
    for name, make in order:
        res = time_side(make, num_batches)
        runs[name].append(res)
        log(f"  {kind} {name:7s}: {res['samples']} samples in {res['seconds']:.2f} s "
             f"({res['samples_per_s']:,.0f}/s, first batch after {res['first_batch_s']:.2f} s)")

    def best(name: str) -> dict:
        b = max(runs[name], key=lambda r: r["samples_per_s"])
        return {"samples_per_s": b["samples_per_s"], "seconds": b["seconds"], "first_batch_s": b["first_batch_s"],
                "runs": runs[name]}

    a, b = best("toolkit"), best("seed")
    ratio = a["samples_per_s"] / b["samples_per_s"]
    return {
        "data": kind,
        "originals": _file_stats(folder, listed["path"].tolist()),
        "train_images": train.num_samples,
        "batches": num_batches,
        "samples": num_samples,
        "toolkit": a,
        "seed": b,
        "ratio": ratio,
        "target": TARGETS[kind],
        "meets_target": ratio >= TARGETS[kind],
    }
