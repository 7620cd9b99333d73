"""Train a metric-learning embedder. The same command on CPU, one GPU, many GPUs, many machines.

    accelerate launch launch/embed.py --config configs/embed/digits.yaml [key=value | --key=value ...]

Story: resolve config (unknown keys fail here, before any work) -> Accelerator -> the run
folder made this job's (RUN/.lock; overwrite=true moves the previous run aside) -> tracker on
rank 0 -> fit() -> summary. ``launch/embed.py`` runs this module's :func:`main`;
the pieces it calls live in toolkit/engine, toolkit/rundir.py and toolkit/tracking.py.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from toolkit.config import EmbedConfig, config_from_argv, config_help, to_dict, wants_help
from toolkit.errors import ConfigError, DataError


def main(argv: list[str]) -> int:
    # 1. Config: fail fast, before processes sync or data is read.
    if wants_help(argv):
        print(config_help(EmbedConfig, "usage: accelerate launch launch/embed.py --config configs/embed/digits.yaml [key=value | --key=value ...]"))
        return 0
    try:
        cfg = config_from_argv(EmbedConfig, argv)
        from toolkit.data.shards import check_trainable, read_info
        from toolkit.data.stream import pk_shape
        from toolkit.engine.embed import check_run_dir, check_select_by
        from toolkit.sweep import trial_run_dir

        cfg.run_dir = trial_run_dir(cfg.run_dir)  # before the check: a sweep trial gets its own folder
        info = read_info(cfg.shards, read_timeout_s=cfg.read_timeout_s)
        check_trainable(info, folder=cfg.shards)  # e.g. a class without train images: refused now, not after an epoch
        check_run_dir(cfg)
        check_select_by(cfg, info)
        if cfg.batching == "pk":
            pk_shape(batch_size=cfg.batch_size, K=cfg.K, P=cfg.P, num_classes=info.num_classes)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # 2. Accelerator: created here and nowhere else (CPU when there is no GPU or when
    #    `accelerate launch` says so; precision auto = bf16/fp16 on GPUs, fp32 on CPU).
    from accelerate.utils import set_seed

    from toolkit.engine.accelerator import make_accelerator

    accelerator = make_accelerator(precision=cfg.precision, collective_timeout_s=cfg.collective_timeout_s)
    set_seed(cfg.seed)  # same initial weights on every rank; data order is seeded separately

    # 3. Run folder: this job's alone (RUN/.lock, taken by rank 0 and agreed by every rank);
    #    overwrite=true moves the previous run into RUN/previous-<time>/ before anything is written.
    from toolkit.rundir import claim_run_dir

    run_dir = Path(cfg.run_dir)
    try:
        claim = claim_run_dir(
            accelerator, run_dir, overwrite=cfg.overwrite, command=f"launch/embed.py {shlex.join(argv)}",
            check=lambda: check_run_dir(cfg),
        )
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")  # one write: every rank prints it, and lines must not interleave
        return 2
    with claim:  # the lock goes when the run ends, on failure too
        return train(cfg, accelerator, run_dir)


def train(cfg: EmbedConfig, accelerator, run_dir: Path) -> int:
    """Tracker -> fit() -> summary, in a run folder this job holds. Returns the exit status."""
    from toolkit.artifacts import EMBEDDER_FILE
    from toolkit.engine.accelerator import start_tracker
    from toolkit.engine.embed import fit
    from toolkit.engine.failures import FailureReport

    # 4. Tracking on rank 0 only (W&B offline unless logged in).
    tracker = start_tracker(
        accelerator, kind=cfg.tracker, run_dir=run_dir, config=to_dict(cfg), project=cfg.project,
        name=cfg.name, job_type="embed", resume=cfg.resume,
    )
    accelerator.print(
        f"embed: {accelerator.num_processes} process(es) on {accelerator.device.type}, "
        f"precision {accelerator.mixed_precision}, run dir {run_dir}"
    )

    # 5. Train, then report (failures: one line per rank, see toolkit/engine/failures.py).
    with FailureReport(rank=accelerator.process_index, world=accelerator.num_processes, run_dir=run_dir) as failed:
        with tracker:
            summary = fit(cfg, accelerator, tracker)
            best = run_dir / EMBEDDER_FILE
            if accelerator.is_main_process and best.exists():
                tracker.log_artifact(best, name="embedder", type="model", metadata=summary)
    if failed.exit_code is not None:
        return failed.exit_code
    chosen = "" if cfg.select_by == "val/knn_accuracy" else f" (chosen by best {cfg.select_by} {summary[f'best/{cfg.select_by}']:.4f})"
    accelerator.print(
        f"done: best kNN val accuracy {summary['best_knn_accuracy']:.4f}{chosen} after {summary['steps']} steps "
        f"({summary['minutes']:.1f} min); best embedder: {run_dir / EMBEDDER_FILE}"
    )
    accelerator.end_training()
    return 0
