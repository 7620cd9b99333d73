"""Train the classifier head on a frozen embedder, then write the kNN-vs-head report.

    accelerate launch launch/classify.py embedder=runs/digits-embed [key=value | --key=value ...]
    accelerate launch launch/classify.py --config FILE.yaml [key=value ...]

Story: resolve config (unknown keys, a missing embedder or mismatched shards fail here,
before any work) -> Accelerator -> the run folder made this job's (RUN/.lock; overwrite=true
moves the previous run aside) -> tracker on rank 0 -> fit_head() -> report on rank 0.
``launch/classify.py`` runs this module's :func:`main`;
the pieces it calls live in toolkit/engine, toolkit/rundir.py and toolkit/tracking.py.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from toolkit.config import ClassifyConfig, config_from_argv, config_help, to_dict, wants_help
from toolkit.errors import ConfigError, DataError


def main(argv: list[str]) -> int:
    # 1. Config and inputs: fail fast, before processes sync or data is read.
    if wants_help(argv):
        print(config_help(ClassifyConfig, "usage: accelerate launch launch/classify.py embedder=RUN [--config FILE.yaml] [key=value | --key=value ...]"))
        return 0
    try:
        cfg = config_from_argv(ClassifyConfig, argv)
        from toolkit.data.shards import check_trainable, read_info
        from toolkit.engine.classify import check_run_dir
        from toolkit.artifacts import check_classes, open_run, recorded_shards
        from toolkit.sweep import trial_run_dir

        cfg.run_dir = trial_run_dir(cfg.run_dir)  # before the check: a sweep trial gets its own folder
        run = open_run(cfg.embedder)
        # default: the embedder's shards, if the model file names a plain local folder
        cfg.shards = cfg.shards or recorded_shards(run.embedder.config, run.embedder_path)
        info = read_info(cfg.shards)
        check_trainable(info, folder=cfg.shards)
        check_classes(info.classes, run.classes, shards=cfg.shards)
        check_run_dir(cfg.run_dir, overwrite=cfg.overwrite)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # 2. Accelerator: created here and nowhere else.
    from accelerate.utils import set_seed

    from toolkit.engine.accelerator import make_accelerator

    accelerator = make_accelerator(precision=cfg.precision, collective_timeout_s=cfg.collective_timeout_s)
    set_seed(cfg.seed)  # same initial head on every rank

    # 3. Run folder: this job's alone (RUN/.lock, taken by rank 0 and agreed by every rank);
    #    overwrite=true moves the previous run into RUN/previous-<time>/ before anything is written.
    from toolkit.rundir import claim_run_dir

    run_dir = Path(cfg.run_dir)
    try:
        claim = claim_run_dir(
            accelerator, run_dir, overwrite=cfg.overwrite, command=f"launch/classify.py {shlex.join(argv)}",
            check=lambda: check_run_dir(run_dir, overwrite=cfg.overwrite),
        )
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")  # one write: every rank prints it, and lines must not interleave
        return 2
    with claim:  # the lock goes when the run ends, on failure too
        return train(cfg, accelerator, run_dir, embedder_path=run.embedder_path)


def train(cfg: ClassifyConfig, accelerator, run_dir: Path, *, embedder_path: Path) -> int:
    """Tracker -> fit_head() -> report, in a run folder this job holds. Returns the exit status."""
    from toolkit.engine.accelerator import start_tracker
    from toolkit.artifacts import HEAD_FILE, REPORT_MD
    from toolkit.engine.classify import fit_head
    from toolkit.engine.failures import FailureReport

    # 4. Tracking on rank 0 only.
    tracker = start_tracker(
        accelerator, kind=cfg.tracker, run_dir=run_dir, config=to_dict(cfg), project=cfg.project,
        name=cfg.name, job_type="classify",
    )
    accelerator.print(
        f"classify: {accelerator.num_processes} process(es) on {accelerator.device.type}, "
        f"embedder {embedder_path}, run dir {run_dir}"
    )

    # 5. Train, then report (rank 0: kNN vs head on the validation split, plots); failures:
    #    one line per rank, as for the embedder (see toolkit/engine/failures.py).
    with FailureReport(rank=accelerator.process_index, world=accelerator.num_processes, run_dir=run_dir) as failed:
        with tracker:
            summary = fit_head(cfg, accelerator, tracker)
            if accelerator.is_main_process:
                from toolkit.report import write_report

                tracker.log_artifact(run_dir / HEAD_FILE, name="classifier", type="model", metadata=summary)
                report = write_report(
                    run_dir, tracker=tracker, device=accelerator.device, k=cfg.knn_k,
                    batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers,
                )
    if failed.exit_code is not None:
        return failed.exit_code
    if accelerator.is_main_process:
        print(
            f"done: {report['split']} accuracy: head {report['head_accuracy']:.4f}, kNN@{report['knn_k']} "
            f"{report['knn_accuracy']:.4f} ({report['num_samples']} images; {summary['steps']} steps, "
            f"{summary['minutes']:.1f} min); report: {run_dir / REPORT_MD}"
        )
    accelerator.end_training()
    return 0
