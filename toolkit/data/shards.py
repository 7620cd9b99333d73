"""Write an image folder as WebDataset tar shards plus ``_info.json``.

Layout of the output folder (written to a temporary sibling, moved into place when complete)::

    OUT/train-000000.tar ...  OUT/val-000000.tar ...  (OUT/test-000000.tar ... with held-out classes)
    OUT/_info.json            classes, per-split counts, shard names/lengths/sha256, preprocessing,
                              warnings (problems found while sharding); with held-out classes also
                              holdout_classes, holdout (the settings) and the test split's roles
    OUT/manifest.csv          every listed image: path, label, index, split, key, status (+ is_query,
                              is_gallery with held-out classes)
    OUT/skipped.csv           unreadable images with the reason (also counted on screen)
    OUT/ignored.csv           every other file under SRC with the reason it is not an image

Layout of a split (``layout`` in ``_info.json``, :func:`plan_shards`): ``mixed`` shuffles the
split once so every shard mixes all classes; ``by_class`` keeps each class whole and
contiguous in one shard (a class larger than a shard fills as few shards as possible),
classes in random order. P×K batching needs K images of a class in one loader slot: with
many classes of a few images each, a mixed layout spreads a class over every slot (it cannot
reach K without re-reading the data many times, or buffering every class), while a slot
dealt a ``by_class`` shard reads each of its classes whole. ``group_by_class="auto"`` (the
default) lays the train split out by class when it has many small classes
(:func:`choose_layout`); val and test are always mixed.

Each sample: ``<key>.png`` (the preprocessed image), ``<key>.cls`` (class index) and
``<key>.json`` (original relative path, class name). Keys are ``s<8-digit manifest row>``:
dot-free (WebDataset splits on the first dot) and unable to escape the folder.

Open-set splits (``holdout_classes``): the held-out classes go whole into a ``test`` split,
the known ones are split train/val exactly as without a holdout. ``classes`` stays the
known classes (the model's); ``holdout_classes`` lists the held-out ones, and every label
(``.cls``, manifest ``index``) indexes ``classes + holdout_classes``. Each test image is a
query, a gallery image or both (open-metric-learning's ``is_query`` / ``is_gallery``):
``_info.json`` lists only the exceptions, ``not_query`` and ``not_gallery`` (sample keys).

``--overwrite`` replaces only what this module wrote: an empty folder or a shard folder
holding nothing but the files above. ``_info.json`` may come from a remote location, so
its content is data to check (:func:`read_info`), never text to paste into a command.
"""
from __future__ import annotations

import bisect
import dataclasses
import io
import itertools
import json
import math
import multiprocessing
import numbers
import os
import random
import re
import shutil
import signal
import time
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from toolkit.data.folder import NOT_AN_IMAGE, class_disjoint_split, list_image_folder, parse_holdout
from toolkit.errors import DataError
from toolkit.data.location import is_remote, shard_url
from toolkit.files import OwnedFolder, check_apart, check_replaceable, move_into_place, new_temp_folder, sha256_file
from toolkit.progress import progress as progress_bar

INFO_NAME = "_info.json"
FORMAT_VERSION = 1
SIDE_FILES = frozenset({INFO_NAME, "manifest.csv", "skipped.csv", "ignored.csv"})
# What the writer names a shard: "<split>-<6+ digits>.tar". Nothing else is accepted from an
# _info.json: no "/", no shell metacharacters, so a name is safe in a path, URL or command.
SHARD_NAME = re.compile(r"[A-Za-z0-9_]+-\d{6,}\.tar")
SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")
SAMPLE_KEY = re.compile(r"s\d{8,}")  # what the writer names a sample: s<8+ digit manifest row>
TEST_SPLIT = "test"  # the split of the held-out classes
LAYOUTS = ("mixed", "by_class")
# group_by_class="auto" lays a train split out by class when it has at least this many classes
# and its median class has fewer than GROUP_BELOW_MEDIAN images (see choose_layout).
GROUP_MIN_CLASSES = 1000
GROUP_BELOW_MEDIAN = 64


def preprocess_image(img: Image.Image, *, image_size: int | None, grayscale: bool) -> Image.Image:
    """The one preprocessing used at shard time *and* at predict time.

    EXIF rotation is applied; palette/alpha/CMYK/16-bit modes are converted; the image is
    resized to ``image_size``×``image_size`` (bilinear, like the seed's Resize) unless
    ``image_size`` is None/0 (keep the original size).
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits instead of clipping (PIL's convert('L') clips).
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.max() > 255 else 255.0
        img = Image.fromarray((arr * (255.0 / hi)).round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white, the usual background of scanned characters.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    img = img.convert("L" if grayscale else "RGB")
    if image_size:
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return img


def load_and_preprocess(path: str | Path, *, image_size: int | None, grayscale: bool) -> Image.Image:
    with Image.open(path) as im:
        im.load()  # force decoding now so truncated files fail here
        return preprocess_image(im, image_size=image_size, grayscale=grayscale)


def _encode_one(args: tuple[str, int | None, bool]) -> tuple[bytes | None, str | None]:
    """Worker: read, preprocess, encode PNG. Returns (png_bytes, None) or (None, reason)."""
    path, image_size, grayscale = args
    try:
        if os.path.getsize(path) == 0:
            return None, "empty file (0 bytes)"
        with warnings.catch_warnings():
            # A DecompressionBombWarning becomes an error: we skip, we don't OOM.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = load_and_preprocess(path, image_size=image_size, grayscale=grayscale)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue(), None
    except Exception as exc:  # noqa: BLE001 - any decode failure is reported, not raised
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return None, reason[:300]


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _names(items: list, limit: int = 10) -> str:
    """``a, b, c`` (the first ``limit``, then `` ...``), for one-line messages."""
    return ", ".join(map(str, items[:limit])) + (" ..." if len(items) > limit else "")


# ----------------------------------------------------------------------------- decoding


@dataclass
class _Worker:
    """One decoder process, its current chunk and where in the chunk it is."""

    process: Any  # multiprocessing Process
    conn: Connection
    progress: Any  # shared doubles [position in the chunk, time.monotonic() that image started]
    todo: list[int] = field(default_factory=list)  # job indices of the chunk not answered yet

    def started(self) -> float:
        return self.progress[1]


def _decoder_loop(conn: Connection, progress: Any, encode: Callable) -> None:
    """Worker process: answer each chunk of jobs with the list of ``encode(job)``.

    Before each image it records its position and start time in ``progress`` (shared
    memory, no message), so the parent can name the image it died or hangs on. Ctrl-C is
    left to the parent, which kills its workers. The loop also ends when the parent is gone:
    EOF alone cannot tell, sibling workers forked later hold copies of the pipe.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    while os.getppid() == parent:
        if not conn.poll(1.0):
            continue
        try:
            chunk = conn.recv()
        except EOFError:
            return
        results = []
        for position, job in enumerate(chunk):
            progress[1] = time.monotonic()
            progress[0] = position
            results.append(encode(job))
        conn.send(results)


def _death_reason(exitcode: int | None) -> str:
    """skipped.csv's reason for an image whose decoder process died (exit code as multiprocessing gives it)."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"decoder crashed (signal {-exitcode}, {signal.Signals(-exitcode).name})"
        except ValueError:
            return f"decoder crashed (signal {-exitcode})"
    return f"decoder crashed (exit code {exitcode})"


class _DecoderPool:
    """Decode images in worker processes, so a crash or a hang costs one image, not the run.

    Jobs go out in chunks and come back as one message per chunk (cheap on IPC); the worker
    records in shared memory which image it is on and since when. When a worker dies, that
    image is re-run alone in a fresh process (the death may have had another cause, e.g. the
    OOM killer) and skipped if it dies again; when an image takes longer than ``timeout_s``
    its worker is killed and the image skipped. The rest of the chunk goes back to the queue.
    Workers that keep failing before any chunk was answered point at the environment, not
    at an image: the run stops with one line instead of starting a process per image.
    """

    MAX_FAILURES_BEFORE_ANY_ANSWER = 50  # each bad image costs two (a try and a retry alone)

    def __init__(self, jobs: list, *, workers: int, timeout_s: float, encode: Callable, on_result: Callable[[int], Any]):
        self.jobs, self.workers, self.timeout_s = jobs, workers, timeout_s
        self.encode, self.on_result = encode, on_result
        self.results: list[tuple[bytes | None, str | None] | None] = [None] * len(jobs)
        size = max(1, min(64, len(jobs) // (4 * workers)))
        self.queue: deque[list[int]] = deque(_chunks(list(range(len(jobs))), size))
        self.retried: set[int] = set()
        self.pool: list[_Worker] = []
        self.answers = self.failures = 0
        self.ctx = multiprocessing.get_context()

    def run(self) -> list[tuple[bytes | None, str | None]]:
        """``encode(job)`` for every job, in job order; every worker is gone on return."""
        try:
            while True:
                self._feed()
                busy = [w for w in self.pool if w.todo]
                if not busy:
                    return self.results
                deadline = min(w.started() for w in busy) + self.timeout_s
                handles = [w.conn for w in busy] + [w.process.sentinel for w in busy]
                ready = set(wait(handles, max(0.0, deadline - time.monotonic())))
                for w in busy:
                    self._check(w, ready)
        finally:
            for w in self.pool:
                _stop(w)

    def _feed(self) -> None:
        for w in [w for w in self.pool if not w.todo]:
            if self.queue:
                self._assign(w, self.queue.popleft())
        while self.queue and len(self.pool) < self.workers:
            parent_end, child_end = self.ctx.Pipe()
            progress = self.ctx.RawArray("d", 2)
            process = self.ctx.Process(target=_decoder_loop, args=(child_end, progress, self.encode))
            process.start()
            child_end.close()  # else the parent would never see EOF when the worker dies
            self.pool.append(_Worker(process, parent_end, progress))
            self._assign(self.pool[-1], self.queue.popleft())

    def _assign(self, w: _Worker, chunk: list[int]) -> None:
        w.progress[0], w.progress[1] = 0, time.monotonic()  # the worker is idle: no race
        try:
            w.conn.send([self.jobs[i] for i in chunk])
        except OSError:  # the idle worker died: only the process is lost
            self._drop(w)
            self.queue.appendleft(chunk)
            return
        w.todo = chunk

    def _check(self, w: _Worker, ready: set) -> None:
        """Take ``w``'s answer if ``wait`` found one (``ready``); deal with its death or with
        its current image's timeout."""
        if w.conn in ready or w.process.sentinel in ready:
            try:
                results = w.conn.recv() if w.conn.poll() else None
            except (EOFError, OSError):
                results = None
            if results is not None:
                self.answers += 1
                for index, result in zip(w.todo, results):
                    self._done(index, result)
                w.todo = []
            elif w.process.sentinel in ready or not w.process.is_alive():
                self._drop(w)
                self._fail(w, _death_reason(w.process.exitcode), retry=True)
        elif time.monotonic() - w.started() > self.timeout_s:
            self._drop(w)
            self._fail(w, f"decoder timed out after {self.timeout_s:g} s", retry=False)

    def _fail(self, w: _Worker, reason: str, *, retry: bool) -> None:
        """The image ``w`` was on failed: retry it alone once, or record it skipped."""
        position = int(w.progress[0])
        if position > 0:
            self.answers += 1  # images before the culprit were decoded: the environment works
        culprit, rest = w.todo[position], w.todo[:position] + w.todo[position + 1 :]
        if rest:
            self.queue.appendleft(rest)
        if retry and culprit not in self.retried:
            self.retried.add(culprit)
            self.queue.appendleft([culprit])
        else:
            self._done(culprit, (None, reason))
        self.failures += 1
        if not self.answers and self.failures >= self.MAX_FAILURES_BEFORE_ANY_ANSWER:
            raise DataError(f"image decoder processes failed {self.failures} times before decoding any image (last: {reason})")

    def _done(self, index: int, result: tuple[bytes | None, str | None]) -> None:
        self.results[index] = result
        self.on_result(1)

    def _drop(self, w: _Worker) -> None:
        _stop(w)
        self.pool.remove(w)


def _stop(w: _Worker) -> None:
    """Kill (if still running) and reap a worker: no process outlives the pool."""
    if w.process.is_alive():
        w.process.kill()
    w.process.join()
    w.conn.close()


# ----------------------------------------------------------------------------- writing


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_args(
    *, val_fraction: Any, seed: Any, image_size: Any, samples_per_shard: Any, workers: Any, image_timeout_s: Any,
    query_fraction: Any = 0.0,
) -> None:
    """One line for the first bad argument, before any work: late, a bad value fails once per
    image or not at all (a negative image_size made every image 'unreadable')."""
    if not _is_int(seed) or seed < 0:
        raise DataError(f"seed must be an int >= 0, got {seed}")
    if image_size is not None and (not _is_int(image_size) or image_size < 0):
        raise DataError(f"image_size must be an int >= 1 (0 or None keeps the original size), got {image_size}")
    if not _is_int(samples_per_shard) or samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if workers is not None and (not _is_int(workers) or workers < 1):
        raise DataError(f"workers must be an int >= 1 (None: one per CPU core, at most 8), got {workers}")
    if (
        isinstance(image_timeout_s, bool)
        or not isinstance(image_timeout_s, numbers.Real)
        or not (0 < image_timeout_s and math.isfinite(image_timeout_s))
    ):
        raise DataError(f"image_timeout_s must be a number of seconds > 0, got {image_timeout_s}")
    if isinstance(query_fraction, bool) or not isinstance(query_fraction, numbers.Real) or not 0.0 <= query_fraction < 1.0:
        raise DataError(f"query_fraction must be in [0, 1) (0: every test image is query and gallery), got {query_fraction}")


def _is_shard_info(path: Path) -> bool:
    """``path`` parses as the writer's ``_info.json``: an object with format_version and splits."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "format_version" in info and isinstance(info.get("splits"), dict)


# What --overwrite may replace: an empty folder or one holding nothing but regular files named
# as write_shards names them, with its _info.json (the rules: toolkit.files, "output folders").
SHARD_FOLDER = OwnedFolder(
    what="a shard folder",
    writer="`toolkit shard`",
    marker=INFO_NAME,
    is_marker=_is_shard_info,
    owns=lambda name: name in SIDE_FILES or bool(SHARD_NAME.fullmatch(name)),
    writing="the shards were being written",
    previous="the previous output",
    overwrite_hint="--overwrite",
    brief=lambda names: _names(names, 5),
)


def write_shards(
    src: str | Path,
    out: str | Path,
    *,
    val_fraction: float = 0.15,
    seed: int = 0,
    image_size: int | None = 32,
    grayscale: bool = True,
    samples_per_shard: int = 1000,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    image_timeout_s: float = 60.0,
    holdout_classes: Any = None,
    query_fraction: float = 0.0,
    group_by_class: bool | str = "auto",
    _encode: Callable[[tuple[str, int | None, bool]], tuple[bytes | None, str | None]] = _encode_one,
) -> "ShardInfo":
    """Shard ``src`` (image folder) into ``out``. Returns its :class:`ShardInfo`.

    Arguments are checked first (one line each), then that ``out`` lies outside ``src`` and
    is absent, or with ``overwrite`` an empty folder or a shard folder holding only files
    this function writes; nothing else is ever replaced or deleted.

    ``holdout_classes`` (None: none) makes a class-disjoint (open-set) split: those classes
    go whole into a ``test`` split, the others are split train/val as without a holdout. It
    is what :func:`~toolkit.data.folder.parse_holdout` takes: a fraction in (0, 1) of the
    classes, a count, class names (list or comma string); a fraction or count picks classes
    seeded by ``seed``. ``query_fraction`` sets the test images' roles: 0 (default) makes
    every one both query and gallery (leave-one-out); ``f`` in (0, 1) makes ``round(f*n)``
    images of each held-out class (at least 1, at most n-1; seeded) queries only and the
    rest gallery only (a class with a single readable image: gallery only).

    ``group_by_class`` sets the train split's layout (see the module docstring): True keeps
    each class in one shard (``by_class``), False mixes the classes in every shard, ``"auto"``
    decides by :func:`choose_layout` from the train images per class.

    Images are decoded in ``workers`` processes (None: one per CPU core, at most 8). An image
    that crashes its decoder, or takes longer than ``image_timeout_s`` seconds, is skipped
    and listed in skipped.csv like an unreadable one. ``_encode`` is for tests: the function
    the workers run on each ``(path, image_size, grayscale)`` job, default
    :func:`_encode_one`; it must be importable at module top level.

    Problems that make the shards weak or unusable for training (a class left without
    training or validation images, an empty split) are warned about, listed under
    ``warnings`` in ``_info.json`` and refused at training time by :func:`check_trainable`.
    Returns what :func:`read_info` would read back, with ``skipped_files`` (``[(path,
    reason)]``) filled in; the ignored files are listed in ignored.csv.
    """
    src, out = Path(src), Path(out)
    _check_args(
        val_fraction=val_fraction, seed=seed, image_size=image_size, samples_per_shard=samples_per_shard,
        workers=workers, image_timeout_s=image_timeout_s, query_fraction=query_fraction,
    )
    if group_by_class not in (True, False, "auto"):
        raise DataError(f"group_by_class must be true, false or auto, got {group_by_class!r}")
    check_apart(src, out, what_src="image folder", advice="write the shards somewhere else")
    check_replaceable(out, SHARD_FOLDER, overwrite=overwrite)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest, ignored = list_image_folder(src)
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]  # class folders without images
    for w in caught:
        if not issubclass(w.category, UserWarning):  # not about the data: passed on as it came
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    holdout = parse_holdout(holdout_classes, sorted(manifest["label"].unique().tolist()), seed=seed)
    if query_fraction and not holdout:
        raise DataError(f"query_fraction={query_fraction} sets the roles of held-out test images: give holdout_classes too")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes left without val images are reported from the shards below
        manifest, classes, holdout = class_disjoint_split(manifest, holdout, val_fraction=val_fraction, seed=seed)
    manifest["key"] = [f"s{i:08d}" for i in range(len(manifest))]

    jobs = [(str(src / p), image_size or None, grayscale) for p in manifest["path"]]
    bar = progress_bar(total=len(jobs), desc=f"shard {src.name}", enabled=progress, unit="img")
    pool = _DecoderPool(
        jobs, workers=workers or min(os.cpu_count() or 1, 8), timeout_s=image_timeout_s, encode=_encode,
        on_result=bar.update,
    )
    encoded = pool.run()
    bar.close()
    manifest["status"] = ["ok" if png is not None else "skipped" for png, _ in encoded]
    skipped = [
        (manifest.at[i, "path"], reason) for i, (png, reason) in enumerate(encoded) if png is None
    ]
    if holdout:
        manifest["is_query"], manifest["is_gallery"] = _test_roles(manifest, query_fraction=query_fraction, seed=seed)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_folder(out)
    try:
        info = _write_split_shards(
            manifest, encoded, tmp, classes=classes, seed=seed, samples_per_shard=samples_per_shard, holdout=holdout,
            group_by_class=group_by_class,
        )
        notes += _shard_problems(info["splits"], classes, val_fraction=val_fraction, holdout=holdout)
        info.update(
            format_version=FORMAT_VERSION,
            source=str(src.resolve()),
            classes=classes,
            num_classes=len(classes),
        )
        if holdout:
            spec = list(holdout_classes) if isinstance(holdout_classes, (list, tuple)) else holdout_classes
            info.update(
                holdout_classes=holdout,
                holdout={"spec": spec if isinstance(spec, (str, list)) else _plain_number(spec),
                         "query_fraction": float(query_fraction)},
            )
        info.update(
            val_fraction=val_fraction,
            seed=seed,
            preprocess={"image_size": image_size or None, "grayscale": grayscale, "format": "png"},
            skipped=len(skipped),
            ignored=dict(Counter(reason for _, reason in ignored)),
            ignored_non_images=sum(reason == NOT_AN_IMAGE for _, reason in ignored),
            warnings=notes,
        )
        manifest.to_csv(tmp / "manifest.csv", index=False)
        pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(tmp / "skipped.csv", index=False)
        pd.DataFrame(ignored, columns=["path", "reason"]).to_csv(tmp / "ignored.csv", index=False)
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2))
        move_into_place(tmp, out, SHARD_FOLDER, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return dataclasses.replace(ShardInfo.from_json(info, str(out / INFO_NAME)), skipped_files=skipped)


def _plain_number(x: Any) -> int | float:
    """A numpy or other numbers.Real as a plain JSON number."""
    return int(x) if _is_int(x) else float(x)


def _test_roles(manifest: pd.DataFrame, *, query_fraction: float, seed: int) -> tuple[list, list]:
    """``(is_query, is_gallery)`` per manifest row: booleans for the written test images, None
    for every other row (train/val rows have no role; skipped images are in no shard).

    ``query_fraction`` 0: every test image is both (leave-one-out). Otherwise, per held-out
    class of n readable images, ``round(f*n)`` (at least 1, at most n-1) seeded ones are
    queries only and the rest gallery only; a single readable image is gallery only (no
    other image of its class could answer it as a query).
    """
    is_query: list = [None] * len(manifest)
    is_gallery: list = [None] * len(manifest)
    written = (manifest["split"] == TEST_SPLIT).to_numpy() & (manifest["status"] == "ok").to_numpy()
    for label, rows in manifest[written].groupby("label", sort=True).indices.items():
        rows = manifest.index[written][rows].tolist()
        n = len(rows)
        if not query_fraction:
            queries = set(rows)
        elif n < 2:
            queries = set()
        else:
            n_query = min(max(int(round(query_fraction * n)), 1), n - 1)
            queries = set(random.Random(f"{seed}-query-{label}").sample(sorted(rows), n_query))
        for i in rows:
            is_query[i] = i in queries
            is_gallery[i] = not query_fraction or i not in queries
    return is_query, is_gallery


def _shard_problems(
    splits: dict, classes: list[str], *, val_fraction: float, holdout: list[str] | None = None
) -> list[str]:
    """Warning lines for what the written shards lack: a whole split, the training images of
    a class (the split leaves every class one, so they were all unreadable), the validation
    images of a class (too few images to spare one, or unreadable); with held-out classes,
    an empty test split and held-out classes with no or a single readable image (a single
    one cannot be retrieved: no other gallery image of its class). Held-out classes have no
    train or val images by design: not a problem."""
    train, val = splits["train"], splits["val"]
    notes = []
    if train["num_samples"] == 0:
        notes.append("the train split is empty: no image was readable (see skipped.csv)")
    else:
        untrained = [c for c in classes if train["class_counts"][c] == 0]
        if untrained:
            notes.append(
                f"{len(untrained)} class(es) without any training image, all unreadable (see skipped.csv): {_names(untrained)}"
            )
    if val["num_samples"] == 0:
        notes.append(
            f"the val split is empty (val_fraction={val_fraction} spares no class a validation image, or those are "
            "unreadable): validation needs some"
        )
    else:
        unvalidated = [c for c in classes if val["class_counts"][c] == 0 and train["class_counts"][c] > 0]
        if unvalidated:
            notes.append(
                f"{len(unvalidated)} class(es) without a validation image (too few images to spare one, or it is "
                f"unreadable): {_names(unvalidated)}"
            )
    if holdout:
        test = splits[TEST_SPLIT]
        if test["num_samples"] == 0:
            notes.append("the test split is empty: no image of the held-out classes was readable (see skipped.csv)")
        else:
            missing = [c for c in holdout if test["class_counts"][c] == 0]
            if missing:
                notes.append(
                    f"{len(missing)} held-out class(es) without any readable image, absent from the test split "
                    f"(see skipped.csv): {_names(missing)}"
                )
        single = [c for c in holdout if test["class_counts"][c] == 1]
        if single:
            notes.append(
                f"{len(single)} held-out class(es) with a single readable image, which cannot be retrieved "
                f"(no other gallery image of its class): {_names(single)}"
            )
    return notes


def choose_layout(group_by_class: bool | str, class_sizes: list[int]) -> str:
    """The train split's layout: ``"by_class"`` or ``"mixed"``; ``class_sizes``: images per class.

    True / False force it. ``"auto"`` groups by class when the split has at least
    GROUP_MIN_CLASSES classes with a median below GROUP_BELOW_MEDIAN images. Why: over mixed
    shards a loader slot's P×K batcher must hold partial classes of every class at once,
    about 0.55·C·K samples for C classes (measured), which passes its bound (2,048 samples at
    16×4) from about 900 classes on, and a slot sees only 1/slots of each class per pass;
    over shards grouped by class a slot reads whole classes a few at a time, which works
    while the reader's shuffle pool (1,000 samples by default) holds many more than P
    classes, i.e. for small classes. Few or large classes stay mixed (a shard of one or two
    classes cannot give a batch P of them).
    """
    if group_by_class == "auto":
        sizes = sorted(n for n in class_sizes if n > 0)
        many_small = len(sizes) >= GROUP_MIN_CLASSES and sizes[len(sizes) // 2] < GROUP_BELOW_MEDIAN
        return "by_class" if many_small else "mixed"
    return "by_class" if group_by_class else "mixed"


def plan_shards(labels: list[int], *, layout: str, samples_per_shard: int, rng: random.Random) -> list[list[int]]:
    """Which samples (positions in ``labels``) go into each shard, in order.

    ``mixed``: one shuffle, then consecutive chunks of ``samples_per_shard``. ``by_class``:
    classes in random order, each class's samples contiguous, cut into as many shards as the
    mixed layout (n = ceil(N / samples_per_shard)) at the class boundary nearest each multiple
    of N / n: each cut is within half a class of its mark, so a shard holds N / n images give
    or take one class and ranks × workers share the shards as evenly as mixed ones (packing
    whole classes greedily leaves a short last shard, and one slot a pass short). A class
    larger than ``samples_per_shard`` is first cut into pieces of that size, placed like
    classes; no other class straddles two shards.
    """
    if layout not in LAYOUTS:
        raise DataError(f"unknown shard layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    positions = list(range(len(labels)))
    rng.shuffle(positions)
    if layout == "mixed" or not labels:
        return list(_chunks(positions, samples_per_shard))
    by_class: dict[int, list[int]] = {}
    for p in positions:  # random order of first appearance: the classes' order
        by_class.setdefault(labels[p], []).append(p)
    pieces = [piece for members in by_class.values() for piece in _chunks(members, samples_per_shard)]
    n = -(-len(labels) // samples_per_shard)
    ends = list(itertools.accumulate(len(piece) for piece in pieces))  # samples up to and including piece i
    cuts = [0]  # shard j holds pieces[cuts[j]:cuts[j + 1]]
    for j in range(1, n):
        target = j * len(labels) / n
        i = bisect.bisect_left(ends, target)  # the piece that reaches the target
        b = i + 1 if i == 0 or ends[i] - target < target - ends[i - 1] else i  # cut after it, or before it
        cuts.append(min(max(b, cuts[-1] + 1), len(pieces) - (n - j)))  # every shard gets a piece
    cuts.append(len(pieces))
    return [[p for piece in pieces[a:b] for p in piece] for a, b in zip(cuts, cuts[1:])]


def _write_split_shards(
    manifest: pd.DataFrame,
    encoded: list,
    folder: Path,
    *,
    classes: list[str],
    seed: int,
    samples_per_shard: int,
    holdout: list[str] | None = None,
    group_by_class: bool | str = "auto",
) -> dict:
    import webdataset as wds

    splits = {}
    for split in ("train", "val", TEST_SPLIT) if holdout else ("train", "val"):
        rows = [i for i in np.flatnonzero((manifest["split"] == split).to_numpy()) if encoded[i][0] is not None]
        labels = [int(manifest.at[i, "index"]) for i in rows]
        layout = choose_layout(group_by_class, list(Counter(labels).values())) if split == "train" else "mixed"
        chunks = [[rows[j] for j in chunk] for chunk in plan_shards(
            labels, layout=layout, samples_per_shard=samples_per_shard, rng=random.Random(f"{seed}-{split}"))]
        split_classes = holdout if split == TEST_SPLIT else classes
        filenames, lengths, sums, counts = [], [], [], {c: 0 for c in split_classes}
        for n, chunk in enumerate(chunks):
            name = f"{split}-{n:06d}.tar"
            # An int mtime: a float one makes tarfile add a PAX header to every member,
            # which costs ~30 % of read throughput on small images.
            with wds.TarWriter(str(folder / name), encoder=False, mtime=0) as sink:
                for i in chunk:
                    label = manifest.at[i, "label"]
                    counts[label] += 1
                    meta = {"path": manifest.at[i, "path"], "label": label}
                    sink.write(
                        {
                            "__key__": manifest.at[i, "key"],
                            "png": encoded[i][0],
                            "cls": str(int(manifest.at[i, "index"])).encode(),
                            "json": json.dumps(meta, ensure_ascii=False).encode(),
                        }
                    )
            filenames.append(name)
            lengths.append(len(chunk))
            sums.append(sha256_file(folder / name))
        splits[split] = {
            "name": split,  # timm's reader_wds understands name/num_samples/filenames/shard_lengths
            "num_samples": len(rows),
            "filenames": filenames,
            "shard_lengths": lengths,
            "sha256": sums,
            "class_counts": counts,
            "layout": layout,
        }
        if split == TEST_SPLIT:
            written = sorted(rows)
            not_query = [manifest.at[i, "key"] for i in written if not manifest.at[i, "is_query"]]
            not_gallery = [manifest.at[i, "key"] for i in written if not manifest.at[i, "is_gallery"]]
            splits[split].update(
                num_queries=len(rows) - len(not_query),
                num_gallery=len(rows) - len(not_gallery),
                not_query=not_query,
                not_gallery=not_gallery,
            )
    return {"splits": splits}


def shard_report_lines(info: ShardInfo, out: str | Path, *, seconds: float | None = None) -> list[str]:
    """The summary to print after :func:`write_shards` returned ``info`` for ``out``.

    Lines: what was written (``seconds`` appended when given); with held-out classes, the
    test split (images, classes, shards, queries and gallery images); the skipped images
    (the first 10 with their reason); the ignored files counted per reason; one ``warning:
    ...`` line per problem found while sharding. Works on what :func:`read_info` returns too
    (without the names of the skipped images).
    """
    out = Path(out)
    tr, va = info.splits["train"], info.splits["val"]
    took = f" ({seconds:.1f} s)" if seconds is not None else ""
    held = f" (+{len(info.holdout_classes)} held out)" if info.holdout_classes else ""
    lines = [
        f"wrote {out}: {info.num_classes} classes{held}, train {tr.num_samples} images in "
        f"{len(tr.filenames)} shards{', grouped by class' if tr.layout == 'by_class' else ''}, "
        f"val {va.num_samples} in {len(va.filenames)} shards{took}"
    ]
    test = info.splits.get(TEST_SPLIT)
    if info.holdout_classes and test is not None:
        qf = info.holdout.get("query_fraction")
        if qf:
            how = f"query_fraction {qf:g}"
        else:
            how = "roles as listed in _info.json" if test.not_query or test.not_gallery else "leave-one-out"
        lines.append(
            f"{TEST_SPLIT} {test.num_samples} images of {len(info.holdout_classes)} held-out classes "
            f"({_names(info.holdout_classes)}) in {len(test.filenames)} shards: {test.num_queries} queries, "
            f"{test.num_gallery} gallery ({how})"
        )
    if info.skipped:
        lines.append(f"skipped {info.skipped} unreadable images (reasons in {out / 'skipped.csv'}):")
        listed = info.skipped_files[:10]
        lines += [f"  {path}: {reason}" for path, reason in listed]
        if info.skipped > len(listed):
            lines.append(f"  ... and {info.skipped - len(listed)} more")
    if info.ignored:
        per_reason = ", ".join(f"{reason}: {n}" for reason, n in sorted(info.ignored.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"ignored {sum(info.ignored.values())} files (listed in {out / 'ignored.csv'}): {per_reason}")
    lines += [f"warning: {note}" for note in info.warnings]
    return lines


def check_trainable(info: ShardInfo, *, folder: str | Path) -> None:
    """Refuse, in one line, shards a training run cannot use.

    Refused: an empty train split; a class with no training sample (it is a class of the
    model, yet could never be learnt); an empty val split (validation needs it). A class
    with training but no validation images only weakens validation: allowed (write_shards
    warned). ``class_counts`` are optional (hand-made shards): without them, per-class
    counts are not checked. Held-out classes (``holdout_classes``, in the test split only)
    are not classes of the model: they have no train or val images by design.
    """
    problems = []
    train, val = info.splits.get("train"), info.splits.get("val")
    if train is None or not train.num_samples:
        problems.append("the train split is empty")
    elif train.class_counts is not None:
        untrained = [c for c in info.classes if not train.class_counts.get(c)]
        if untrained:
            problems.append(f"{len(untrained)} class(es) without training images: {_names(untrained)}")
    if val is None or not val.num_samples:
        problems.append("the val split is empty (validation needs images: re-shard with a larger --val_fraction)")
    if problems:
        raise DataError(f"{folder}: cannot train on these shards: " + "; ".join(problems))


@dataclass(frozen=True)
class SplitInfo:
    """One split of a shard folder, as ``_info.json`` records it (checked)."""

    name: str
    num_samples: int
    filenames: list[str]  # shard names, <split>-NNNNNN.tar
    shard_lengths: list[int] = field(default_factory=list)  # samples per shard ([] in hand-made folders)
    sha256: list[str] = field(default_factory=list)
    class_counts: dict[str, int] | None = None  # None: not recorded
    # Roles of a test split's images (open-metric-learning's is_query / is_gallery): every
    # image is both, except the keys listed here. Empty for train/val (and leave-one-out).
    not_query: list[str] = field(default_factory=list)
    not_gallery: list[str] = field(default_factory=list)
    layout: str = "mixed"  # "by_class": each class whole in one shard (see plan_shards)

    @property
    def num_queries(self) -> int:
        return self.num_samples - len(self.not_query)

    @property
    def num_gallery(self) -> int:
        return self.num_samples - len(self.not_gallery)

    def roles(self, keys: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(is_query, is_gallery)``: bool arrays, one entry per sample key in ``keys``."""
        keys = list(keys)
        not_query, not_gallery = set(self.not_query), set(self.not_gallery)
        is_query = np.fromiter((k not in not_query for k in keys), dtype=bool, count=len(keys))
        is_gallery = np.fromiter((k not in not_gallery for k in keys), dtype=bool, count=len(keys))
        return is_query, is_gallery


@dataclass(frozen=True)
class ShardInfo:
    """A shard folder's ``_info.json``, checked and typed (what :func:`read_info` returns).

    ``skipped_files`` is filled only by :func:`write_shards` (on disk the list is skipped.csv).
    ``classes`` are the known classes (the model's); ``holdout_classes`` the held-out ones,
    found only in the test split; labels index :attr:`all_classes`.
    """

    classes: list[str]
    splits: dict[str, SplitInfo]
    image_size: int | None = None  # shard-time resize; None: originals kept
    grayscale: bool = True
    warnings: list[str] = field(default_factory=list)  # problems found while sharding
    skipped: int = 0
    ignored: dict[str, int] = field(default_factory=dict)  # files that are not images, per reason
    source: str | None = None
    seed: int | None = None
    val_fraction: float | None = None
    format_version: int | None = None
    skipped_files: list[tuple[str, str]] = field(default_factory=list, compare=False)  # (path, reason)
    holdout_classes: list[str] = field(default_factory=list)  # held out whole into the test split (sorted)
    holdout: dict[str, Any] = field(default_factory=dict)  # {"spec": ..., "query_fraction": f} when classes are held out

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def all_classes(self) -> list[str]:
        """What a label indexes: the known classes, then the held-out ones."""
        return [*self.classes, *self.holdout_classes]

    @property
    def preprocess(self) -> dict:
        """The shard-time preprocessing, as recorded with a model: ``{"image_size", "grayscale", "format"}``."""
        return {"image_size": self.image_size, "grayscale": self.grayscale, "format": "png"}

    @classmethod
    def from_json(cls, info: Any, where: str) -> "ShardInfo":
        """Check ``info`` (parsed ``_info.json`` read from ``where``) and type it."""
        info = _check_info(info, where)
        pre = info.get("preprocess", {})
        ignored = info.get("ignored") or ({NOT_AN_IMAGE: info["ignored_non_images"]} if info.get("ignored_non_images") else {})
        return cls(
            classes=list(info["classes"]),
            splits={name: SplitInfo(
                name=name, num_samples=int(sp["num_samples"]), filenames=list(sp["filenames"]),
                shard_lengths=list(sp.get("shard_lengths", [])), sha256=list(sp.get("sha256", [])),
                class_counts=dict(sp["class_counts"]) if "class_counts" in sp else None,
                not_query=list(sp.get("not_query", [])), not_gallery=list(sp.get("not_gallery", [])),
                layout=sp.get("layout", "mixed"),
            ) for name, sp in info["splits"].items()},
            image_size=pre.get("image_size") or None, grayscale=pre.get("grayscale", True),
            warnings=[str(w) for w in info.get("warnings", []) if isinstance(w, str)],
            skipped=int(info["skipped"]) if _is_count(info.get("skipped")) else 0,
            ignored={str(k): int(v) for k, v in ignored.items() if _is_count(v)} if isinstance(ignored, dict) else {},
            source=info.get("source") if isinstance(info.get("source"), str) else None,
            seed=info.get("seed") if _is_int(info.get("seed")) else None,
            val_fraction=info.get("val_fraction") if isinstance(info.get("val_fraction"), float) else None,
            format_version=info.get("format_version") if _is_int(info.get("format_version")) else None,
            holdout_classes=list(info.get("holdout_classes", [])),
            holdout=dict(info.get("holdout", {})),
        )

    def split(self, name: str, *, folder) -> SplitInfo:
        """Split ``name``, or a one-line DataError naming the ones there are."""
        if name not in self.splits:
            raise DataError(f"{folder}: no split {name!r} (have {', '.join(self.splits)})")
        return self.splits[name]


def read_info(folder: str | Path, *, read_timeout_s: float | None = None) -> ShardInfo:
    """Load and check ``_info.json`` of a shard folder (one-line error when missing or bad).

    The content is untrusted (it may come from a remote location): :func:`_check_info`
    type-checks it here, the one place every consumer goes through. A remote one is read
    as the shards are: a ``pipe:``/http source silent for ``read_timeout_s`` seconds (default
    :data:`~toolkit.data.tario.DEFAULT_READ_TIMEOUT_S`; 0: wait forever) is killed with one
    line (:class:`~toolkit.data.tario.StalledRead`), and more than :data:`MAX_INFO_BYTES` is refused.
    """
    if is_remote(folder):
        import webdataset as wds

        from toolkit.data.tario import DEFAULT_READ_TIMEOUT_S, close_quietly, with_read_timeout

        url = shard_url(folder, INFO_NAME)
        timeout = DEFAULT_READ_TIMEOUT_S if read_timeout_s is None else read_timeout_s
        stream = None
        try:
            stream = with_read_timeout(wds.gopen(url), url, timeout)
            data = stream.read(MAX_INFO_BYTES + 1)
            if len(data) > MAX_INFO_BYTES:
                raise DataError(f"{url}: more than {MAX_INFO_BYTES >> 20} MiB: not an {INFO_NAME} `toolkit shard` wrote")
            info = json.loads(data)
        except DataError:  # StalledRead, the size limit: one line already
            raise
        except Exception as exc:  # noqa: BLE001 - any transport error becomes one line
            raise DataError(f"cannot read {url}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        finally:
            close_quietly(stream)
        return ShardInfo.from_json(info, url)
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"shard folder not found: {folder}")
    path = folder / INFO_NAME
    if not path.is_file():
        raise DataError(f"{folder}: no {INFO_NAME} (was it written by `toolkit shard`?)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    return ShardInfo.from_json(info, str(path))


# An _info.json lists every shard with its length and sha256: about 200 bytes a shard, so
# 64 MiB is room for ~300,000 shards; a larger one is not a file `toolkit shard` wrote.
MAX_INFO_BYTES = 64 << 20


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_count(x: Any) -> bool:
    return _is_int(x) and x >= 0


def _check_info(info: Any, where: str) -> dict:
    """``info`` if it has the shape consumers rely on, else DataError naming the bad entry.

    Required: ``classes`` (list of str) and ``splits`` ({name: split}); per split
    ``num_samples`` (int >= 0) and ``filenames`` (shard names as the writer writes them,
    ``<split>-NNNNNN.tar``). Optional, checked when present: ``num_classes``; per split
    ``shard_lengths`` (ints >= 0), ``sha256`` (hex digests), ``class_counts`` ({class: int
    >= 0}), ``not_query`` / ``not_gallery`` (distinct sample keys ``sNNNNNNNN``, none in both,
    at most ``num_samples``), ``num_queries`` / ``num_gallery`` (agreeing with them) and
    ``layout`` (``mixed`` or ``by_class``); ``preprocess.image_size`` (None or int >= 0) and
    ``preprocess.grayscale`` (bool); ``holdout_classes`` (distinct class names, none of them in ``classes``) and ``holdout``
    (an object; its ``query_fraction`` a number in [0, 1)).
    """

    def bad(key: str, value: Any, expected: str) -> DataError:
        return DataError(f"{where}: bad {key} = {_short(value)} (expected {expected})")

    if not isinstance(info, dict):
        raise bad("content", info, "a JSON object")
    classes = info.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise bad("classes", classes, "a list of class names")
    if "num_classes" in info and not _is_count(info["num_classes"]):
        raise bad("num_classes", info["num_classes"], "an int >= 0")
    holdout = info.get("holdout_classes", [])
    if not isinstance(holdout, list) or not all(isinstance(c, str) for c in holdout):
        raise bad("holdout_classes", holdout, "a list of class names")
    if len(set(holdout)) != len(holdout):
        raise bad("holdout_classes", holdout, "distinct class names")
    overlap = sorted(set(holdout) & set(classes))
    if overlap:
        raise bad("holdout_classes", holdout, f"names not in classes; {_names(overlap, 3)} is in both")
    settings = info.get("holdout", {})
    if not isinstance(settings, dict):
        raise bad("holdout", settings, "an object")
    qf = settings.get("query_fraction", 0.0)
    if isinstance(qf, bool) or not isinstance(qf, (int, float)) or not 0.0 <= qf < 1.0:
        raise bad("holdout.query_fraction", qf, "a number in [0, 1)")
    splits = info.get("splits")
    if not isinstance(splits, dict):
        raise bad("splits", splits, "an object of splits")
    for name, split in splits.items():
        if not SPLIT_NAME.fullmatch(name):
            raise bad("split name", name, "letters, digits and _")
        if not isinstance(split, dict):
            raise bad(f"splits.{name}", split, "an object")
        _check_split(split, f"splits.{name}", bad)
    preprocess = info.get("preprocess", {})
    if not isinstance(preprocess, dict):
        raise bad("preprocess", preprocess, "an object")
    if preprocess.get("image_size") is not None and not _is_count(preprocess["image_size"]):
        raise bad("preprocess.image_size", preprocess["image_size"], "null or an int >= 0")
    if "grayscale" in preprocess and not isinstance(preprocess["grayscale"], bool):
        raise bad("preprocess.grayscale", preprocess["grayscale"], "true or false")
    return info


_SPLIT_LISTS = (  # per split: list field, check of one item, what is expected
    ("filenames", lambda v: isinstance(v, str) and bool(SHARD_NAME.fullmatch(v)), "shard names like train-000000.tar"),
    ("shard_lengths", _is_count, "ints >= 0"),
    ("sha256", lambda v: isinstance(v, str) and bool(re.fullmatch(r"[0-9a-f]{64}", v)), "sha256 hex digests"),
)


def _check_split(split: dict, key: str, bad: Callable[[str, Any, str], DataError]) -> None:
    if not _is_count(split.get("num_samples")):
        raise bad(f"{key}.num_samples", split.get("num_samples"), "an int >= 0")
    if "filenames" not in split:
        raise bad(f"{key}.filenames", None, "a list of shard names")
    for name, ok, expected in _SPLIT_LISTS:
        values = split.get(name, [])
        if not isinstance(values, list):
            raise bad(f"{key}.{name}", values, f"a list of {expected}")
        for i, v in enumerate(values):
            if not ok(v):
                raise bad(f"{key}.{name}[{i}]", v, expected)
    if split.get("layout", "mixed") not in LAYOUTS:
        raise bad(f"{key}.layout", split.get("layout"), " or ".join(LAYOUTS))
    counts = split.get("class_counts", {})
    if not isinstance(counts, dict) or not all(isinstance(c, str) and _is_count(n) for c, n in counts.items()):
        raise bad(f"{key}.class_counts", counts, "an object of class name: int >= 0")
    roles = {}
    for name in ("not_query", "not_gallery"):
        keys = split.get(name, [])
        if not isinstance(keys, list):
            raise bad(f"{key}.{name}", keys, "a list of sample keys like s00000012")
        for i, k in enumerate(keys):
            if not (isinstance(k, str) and SAMPLE_KEY.fullmatch(k)):
                raise bad(f"{key}.{name}[{i}]", k, "a sample key like s00000012")
        if len(set(keys)) != len(keys):
            raise bad(f"{key}.{name}", keys, "distinct sample keys")
        if len(keys) > split["num_samples"]:
            raise bad(f"{key}.{name}", keys, f"at most num_samples = {split['num_samples']} keys")
        roles[name] = set(keys)
    both = sorted(roles["not_query"] & roles["not_gallery"])
    if both:
        raise bad(f"{key}.not_gallery", split["not_gallery"], f"keys not also in not_query ({_names(both, 3)} is in both)")
    for name, listed in (("num_queries", "not_query"), ("num_gallery", "not_gallery")):
        if name in split and split[name] != split["num_samples"] - len(roles[listed]):
            raise bad(f"{key}.{name}", split[name], f"num_samples - len({listed}) = {split['num_samples'] - len(roles[listed])}")


def verify_shards(folder: str | Path) -> list[str]:
    """Return the shard files whose sha256 differs from ``_info.json`` (empty list = all good).

    A shard without a recorded digest cannot be verified and is listed too. Local folders only.
    """
    if is_remote(folder):
        raise DataError(f"{folder}: verify_shards reads a local shard folder, not a URL or template")
    folder = Path(folder)
    info = read_info(folder)
    bad = []
    for split in info.splits.values():
        digests = split.sha256
        for i, name in enumerate(split.filenames):
            p = folder / name
            if i >= len(digests) or not p.is_file() or sha256_file(p) != digests[i]:
                bad.append(name)
    return bad
