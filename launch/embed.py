"""Train a metric-learning embedder. The same command on CPU, one GPU, many GPUs, many machines.

    accelerate launch launch/embed.py --config configs/embed/digits.yaml [key=value | --key=value ...]

Story: resolve config (unknown keys fail here, before any work) -> Accelerator -> the run
folder made this job's (RUN/.lock; overwrite=true moves the previous run aside) -> tracker on
rank 0 -> fit() -> summary. Everything reusable lives in toolkit/.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from toolkit.config import ConfigError, EmbedConfig, config_from_argv, to_dict  # noqa: E402
from toolkit.data.folder import DataError  # noqa: E402


def main(argv: list[str]) -> int:
    # 1. Config: fail fast, before processes sync or data is read.
    try:
        cfg = config_from_argv(EmbedConfig, argv)
        from toolkit.data.shards import check_trainable, read_info
        from toolkit.data.stream import pk_shape
        from toolkit.engine.embed import check_run_dir
        from toolkit.sweep import trial_run_dir

        cfg.run_dir = trial_run_dir(cfg.run_dir)  # before the check: a sweep trial gets its own folder
        info = read_info(cfg.shards)
        check_trainable(info, folder=cfg.shards)  # e.g. a class without train images: refused now, not after an epoch
        check_run_dir(cfg)
        if cfg.batching == "pk":
            pk_shape(batch_size=cfg.batch_size, K=cfg.K, P=cfg.P, num_classes=info["num_classes"])
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
    from toolkit.engine.accelerator import start_tracker
    from toolkit.engine.embed import fit
    from toolkit.engine.failures import failure_line, main_thread, sigterm_raises

    # 4. Tracking on rank 0 only (W&B offline unless logged in).
    tracker = start_tracker(
        accelerator, kind=cfg.tracker, run_dir=run_dir, config=to_dict(cfg), project=cfg.project,
        name=cfg.name, job_type="embed",
    )
    accelerator.print(
        f"embed: {accelerator.num_processes} process(es) on {accelerator.device.type}, "
        f"precision {accelerator.mixed_precision}, run dir {run_dir}"
    )

    # 5. Train, then report (failures: one line per rank, see toolkit/engine/failures.py).
    rank, world = accelerator.process_index, accelerator.num_processes
    old_sigterm = signal.signal(signal.SIGTERM, sigterm_raises(os.getpid())) if main_thread() else None
    try:
        with tracker:
            summary = fit(cfg, accelerator, tracker)
            best = run_dir / "best_embedder.pt"
            if accelerator.is_main_process and best.exists():
                tracker.log_artifact(best, name="embedder", type="model", metadata=summary)
    except Exception as exc:  # noqa: BLE001 - anything failure_line does not know re-raises
        if old_sigterm is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # already stopping: a late SIGTERM must not garble the report
        failure = failure_line(exc, rank=rank, world=world, run_dir=run_dir)
        if failure is None:
            raise
        print(failure[1], file=sys.stderr, flush=True)
        return failure[0]
    finally:
        if old_sigterm is not None:
            signal.signal(signal.SIGTERM, old_sigterm)
    accelerator.print(
        f"done: best kNN val accuracy {summary['best_knn_accuracy']:.4f} after {summary['steps']} steps "
        f"({summary['minutes']:.1f} min); best embedder: {run_dir / 'best_embedder.pt'}"
    )
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
