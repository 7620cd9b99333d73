"""Train the classifier head on a frozen embedder, then write the kNN-vs-head report.

    accelerate launch launch/classify.py embedder=runs/digits-embed [key=value | --key=value ...]
    accelerate launch launch/classify.py --config FILE.yaml [key=value ...]

Story: resolve config (unknown keys, a missing embedder or mismatched shards fail here,
before any work) -> Accelerator -> tracker on rank 0 -> fit_head() -> report on rank 0.
Everything reusable lives in toolkit/.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from toolkit.config import ClassifyConfig, ConfigError, config_from_argv, to_dict  # noqa: E402
from toolkit.data.folder import DataError  # noqa: E402


def main(argv: list[str]) -> int:
    # 1. Config and inputs: fail fast, before processes sync or data is read.
    try:
        cfg = config_from_argv(ClassifyConfig, argv)
        from toolkit.data.shards import read_info
        from toolkit.engine.classify import check_run_dir
        from toolkit.inference import check_classes, open_run
        from toolkit.sweep import trial_run_dir

        cfg.run_dir = trial_run_dir(cfg.run_dir)  # before the check: a sweep trial gets its own folder
        run = open_run(cfg.embedder)
        shards = cfg.shards or run.embedder["config"]["shards"]
        check_classes(read_info(shards)["classes"], run.classes, shards=shards)
        check_run_dir(cfg.run_dir, overwrite=cfg.overwrite)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # 2. Accelerator: created here and nowhere else.
    from accelerate.utils import set_seed

    from toolkit.engine.accelerator import make_accelerator, start_tracker
    from toolkit.engine.classify import clear_run_dir, fit_head
    from toolkit.inference import HEAD_FILE

    accelerator = make_accelerator(precision=cfg.precision, collective_timeout_s=cfg.collective_timeout_s)
    set_seed(cfg.seed)  # same initial head on every rank

    # 3. Tracking on rank 0 only; a rerun with overwrite=true starts from a clean folder.
    run_dir = Path(cfg.run_dir)
    if accelerator.is_main_process and cfg.overwrite:
        clear_run_dir(run_dir)
    accelerator.wait_for_everyone()
    tracker = start_tracker(
        accelerator, kind=cfg.tracker, run_dir=run_dir, config=to_dict(cfg), project=cfg.project,
        name=cfg.name, job_type="classify",
    )
    accelerator.print(
        f"classify: {accelerator.num_processes} process(es) on {accelerator.device.type}, "
        f"embedder {run.embedder_path}, run dir {run_dir}"
    )

    # 4. Train, then report (rank 0: kNN vs head on the validation split, plots).
    try:
        with tracker:
            summary = fit_head(cfg, accelerator, tracker)
            if accelerator.is_main_process:
                from toolkit.report import write_report

                tracker.log_artifact(run_dir / HEAD_FILE, name="classifier", type="model", metadata=summary)
                report = write_report(
                    run_dir, tracker=tracker, device=accelerator.device, k=cfg.knn_k,
                    batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers,
                )
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if accelerator.is_main_process:
        print(
            f"done: {report['split']} accuracy: head {report['head_accuracy']:.4f}, kNN@{report['knn_k']} "
            f"{report['knn_accuracy']:.4f} ({report['num_samples']} images; {summary['steps']} steps, "
            f"{summary['minutes']:.1f} min); report: {run_dir / 'report.md'}"
        )
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
