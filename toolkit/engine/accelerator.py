"""The one way launch scripts create their Accelerator (loops only ever receive one)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch


def make_accelerator(*, precision: str = "auto", collective_timeout_s: float = 600.0):
    """An Accelerator on CPU when there is no GPU (or `accelerate launch` asked for CPU).

    ``cpu=True`` matters under torchrun too: without it, CPU processes can come up as
    DistributedType.NO, each believing it is rank 0 (DESIGN.md). ``collective_timeout_s``
    bounds how long a rank waits for a dead or stuck peer.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from toolkit.engine.embed import resolve_precision

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in {"1", "true"}
    return Accelerator(
        cpu=cpu,
        mixed_precision=resolve_precision(precision, cpu=cpu),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s))],
    )
