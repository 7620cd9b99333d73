"""Benchmarks behind ``toolkit bench WHAT --opt ...``: each prints both sides and their ratio.

A benchmark is a module ``toolkit/bench/<name>.py`` with ``main(*, opt=default, ...)``
(keyword-only options; the command line's ``--opt`` flags map onto them). Register it in
:data:`BENCHMARKS` with one line. :func:`run_bench` checks the name and every option against
``main``'s signature *before* importing anything heavy or doing any work, and reports a bad
one in a single :class:`~toolkit.config.ConfigError` line (the CLI prints it and exits 2).
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from toolkit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]  # the checkout: launch/ and configs/

# name -> module holding ``main(**options)``; one line per benchmark.
BENCHMARKS: dict[str, str] = {
    "loader": "toolkit.bench.loader",  # shard stream vs the seed's per-item PIL reading
    "step": "toolkit.bench.step",  # embed train step images/s: toolkit (Accelerate) vs a plain loop
    "mining": "toolkit.bench.mining",  # semi-hard mining: toolkit vs pytorch-metric-learning
    "knn": "toolkit.bench.knn",  # validation kNN(13): faiss-screened, raw faiss, torch and scikit-learn side by side
    "scaling": "toolkit.bench.scaling",  # one vs two gloo processes: ms per step phase, images/s
    "validate": "toolkit.bench.validate",  # validation gathered on rank 0 vs sharded: wall time, busiest rank's memory
    "openset": "toolkit.bench.openset",  # unseen classes: raw pixels vs a 5-minute embedder, retrieval metrics
    "accuracy": "toolkit.bench.accuracy",  # recipes on the hard character set: raw pixels, seed, fast.yaml before/after
    "fonts": "toolkit.bench.fonts",  # the hard set's ~150 fonts: list what is usable, --install them (apt-get)
    "classes": "toolkit.bench.classes",  # P×K streaming, 62 vs 20,000 classes: layouts, batchers, memory bound, views per image
    "gpu": "toolkit.bench.gpu",  # seed net at 220 on CUDA: images/s, share of peak FLOP/s (skips on CPU)
}


def rss_bytes() -> int:
    """This process's resident set size now, in bytes."""
    return _status_kb("VmRSS") * 1024


def start_peak_rss() -> tuple[int, bool]:
    """Start measuring this process's peak RSS: (RSS now in bytes, whether the kernel's high-water
    mark was reset to it). Linux resets VmHWM on ``5`` written to /proc/self/clear_refs; without
    that, the lifetime peak (``ru_maxrss``) is the baseline, and a transient peak from before
    (imports, building the data) can hide the growth being measured."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return rss_bytes(), True
    except OSError:
        return lifetime_peak_rss(), False


def peak_rss_growth(start: tuple[int, bool]) -> int:
    """Bytes the peak RSS rose above ``start`` (:func:`start_peak_rss`'s result)."""
    base, reset = start
    return max(0, (_status_kb("VmHWM") * 1024 if reset else lifetime_peak_rss()) - base)


def lifetime_peak_rss() -> int:
    """This process's peak RSS since it started (``ru_maxrss``), in bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _flag(name: str) -> str:
    return "--" + name


def _suggest(name: str, known: list[str], fmt: Callable[[str], str] = repr) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {fmt(close[0])}?)" if close else ""


def get_bench(what: str) -> Callable[..., Any]:
    """The ``main`` function of benchmark ``what`` (ConfigError naming the known ones if unknown)."""
    if not isinstance(what, str) or what not in BENCHMARKS:
        known = ", ".join(sorted(BENCHMARKS))
        raise ConfigError(f"toolkit bench: unknown benchmark {what!r}{_suggest(str(what), list(BENCHMARKS))} (known: {known})")
    return importlib.import_module(BENCHMARKS[what]).main


def check_options(what: str, fn: Callable[..., Any], options: dict[str, Any]) -> None:
    """Every option must be a keyword-only parameter of ``fn``; required ones must be given."""
    params = inspect.signature(fn).parameters
    known = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for name in options:
        if name not in known:
            raise ConfigError(
                f"toolkit bench {what}: unknown option {_flag(name)}{_suggest(name, known, _flag)} "
                f"(known: {', '.join(map(_flag, known))})"
            )
    missing = [n for n in known if params[n].default is inspect.Parameter.empty and n not in options]
    if missing:
        raise ConfigError(f"toolkit bench {what}: missing option(s) {', '.join(map(_flag, missing))}")


def run_bench(what: str, **options: Any) -> None:
    """Run benchmark ``what`` with ``options`` (validated first; nothing runs on a bad one)."""
    fn = get_bench(what)
    check_options(what, fn, options)
    fn(**options)


__all__ = ["BENCHMARKS", "check_options", "get_bench", "run_bench"]


def require_ints(what: str, specs) -> None:
    """``specs``: (name, value, lowest allowed) triples; a bad one is one ConfigError line."""
    for name, value, low in specs:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"toolkit bench {what}: --{name} must be an integer >= {low}, got {value!r}")


def log(msg: str) -> None:
    """Progress lines go to stderr, so stdout holds only the table (or JSON)."""
    print(msg, file=sys.stderr, flush=True)


def cores() -> int:
    """CPU cores this process may use (what `nproc` prints)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def write_json(out: str, report: dict) -> None:
    """Writes ``report`` to ``out`` atomically and says so on stdout."""
    from toolkit.files import atomic_write_json

    atomic_write_json(out, report)
    print(f"\nwrote {out}")


@contextlib.contextmanager
def data_root():
    """``with data_root() as (folder, temporary):`` a benchmark's data folder: ``$TOOLKIT_CACHE/bench``,
    reused across runs, or a temporary folder, removed when the block ends (whatever ends it)."""
    import os
    import shutil
    import tempfile

    cache = os.environ.get("TOOLKIT_CACHE")
    if cache:
        root = Path(cache).expanduser() / "bench"
        root.mkdir(parents=True, exist_ok=True)
        yield root, False
        return
    root = Path(tempfile.mkdtemp(prefix="toolkit-bench-"))
    try:
        yield root, True
    finally:
        shutil.rmtree(root, ignore_errors=True)


def launch_embed(what: str, config, overrides: list[str], *, run_dir, processes: int = 2) -> float:
    """Train an embedder the way the README starts one and return the wall minutes it took.

    ``accelerate launch --config_file configs/accelerate/cpu2.yaml launch/embed.py --config
    CONFIG key=value...`` for two processes (``--cpu --num_processes 1`` for one, ``--multi_gpu
    --num_processes N`` above two), tracker off, ``run_dir`` replaced if it holds an earlier run.
    The validation lines and the last line go to stderr; a failed run raises with its output.
    """
    import os
    import subprocess
    import time

    script = ROOT / "launch" / "embed.py"
    if not script.is_file():
        raise ConfigError(f"toolkit bench {what}: needs a checkout (launch/embed.py not found under {ROOT})")
    launcher = ["--config_file", str(ROOT / "configs" / "accelerate" / "cpu2.yaml")] if processes == 2 else (
        ["--cpu", "--num_processes", "1"] if processes == 1 else
        ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(script), "--config", str(config),
           *overrides, f"run_dir={run_dir}", "tracker=none", "overwrite=true", "progress=false"]
    log("training: " + " ".join(cmd[3:]))
    t0 = time.time()
    done = subprocess.run(cmd, env=dict(os.environ, ACCELERATE_USE_CPU="1"), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        raise RuntimeError(f"training failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
    for line in done.stdout.splitlines():
        if "kNN@" in line or line.startswith("done:"):
            log("  " + line.strip())
    return (time.time() - t0) / 60


def raw_pixel_metrics(closed, open_, *, verification: bool = True) -> tuple[dict, dict]:
    """The baseline every embedder must beat, each image's pixels as its embedding: (closed-set
    metrics of val vs train in ``closed``: kNN(13) accuracy and ranking; retrieval metrics inside
    the test split of ``open_``, leave-one-out by its query/gallery roles)."""
    from toolkit.data.shards import read_info
    from toolkit.evaluation import evaluate_embeddings, raw_pixel_embeddings, split_retrieval, split_roles

    closed_set = evaluate_embeddings(raw_pixel_embeddings(str(closed), "train"), raw_pixel_embeddings(str(closed), "val"), k=13)
    keys, emb, labels = raw_pixel_embeddings(str(open_), "test")
    roles = split_roles(read_info(open_), "test", keys)
    return closed_set, dict(split_retrieval(emb, labels, *roles, verification=verification).metrics)


def shards_fresh(shards, folder, *, size: int, seed: int, holdout: int) -> bool:
    """True when ``shards`` were written from ``folder`` (a generated one, with its marker)
    after it was last rendered, at ``size`` with ``seed`` and ``holdout`` classes held out:
    a benchmark then reuses them instead of sharding again."""
    from toolkit.data.shards import INFO_NAME, read_info
    from toolkit.datasets import MARKER_NAME

    info_file = Path(shards) / INFO_NAME
    if not info_file.is_file():
        return False
    info = read_info(shards)
    return info.source is not None and Path(info.source) == Path(folder).resolve() and \
        info_file.stat().st_mtime >= (Path(folder) / MARKER_NAME).stat().st_mtime and \
        info.image_size == size and info.seed == seed and len(info.holdout_classes) == holdout
