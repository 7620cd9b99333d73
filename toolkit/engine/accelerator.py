"""The one way launch scripts create their Accelerator (loops only ever receive one)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch


def resolve_precision(precision: str, *, cpu: bool) -> str:
    """Map the config's precision to Accelerate's ``mixed_precision``.

    ``auto``: bf16 on GPUs that support it, fp16 (with a grad scaler) on older GPUs, and fp32
    on CPU -- CPU bf16 autocast was measured 5-8× *slower* on CPUs without bf16 units.
    """
    if precision == "auto":
        if cpu or not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def make_accelerator(*, precision: str = "auto", collective_timeout_s: float = 600.0):
    """An Accelerator on CPU when there is no GPU (or `accelerate launch` asked for CPU).

    ``cpu=True`` matters under torchrun too: without it, CPU processes can come up as
    DistributedType.NO, each believing it is rank 0. ``collective_timeout_s``
    bounds how long a rank waits for a dead or stuck peer.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in {"1", "true"}
    return Accelerator(
        cpu=cpu,
        mixed_precision=resolve_precision(precision, cpu=cpu),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s))],
    )


def start_tracker(accelerator, *, kind: str, run_dir, config: dict, project: str, name: str | None, job_type: str,
                  resume: bool = False):
    """The run's tracker: real on rank 0, a no-op elsewhere (only rank 0 may call wandb.init).

    config.yaml gets exactly the resolved config (so `--config RUN/config.yaml` reruns it);
    how the run was launched goes to summary.json instead.
    """
    from pathlib import Path

    from toolkit.artifacts import WANDB_DATA_DIR
    from toolkit.tracking import make_tracker

    os.environ.setdefault("WANDB_DATA_DIR", str(Path(run_dir) / WANDB_DATA_DIR))  # offline artifacts stay in the run
    tracker = make_tracker(
        enabled=accelerator.is_main_process, kind=kind, run_dir=run_dir,
        config=config, project=project, name=name, job_type=job_type, resume=resume,
    )
    tracker.summary({"world_size": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision})
    return tracker
