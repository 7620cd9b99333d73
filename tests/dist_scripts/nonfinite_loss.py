"""Run launch/embed.py with the triplet loss turned into NaN on chosen training steps.

    python nonfinite_loss.py CALLS [launch/embed.py arguments ...]

CALLS: comma-separated 1-based numbers of the loss calls to poison (the loop calls the loss
once per training batch, skipped ones included). Deterministic, and nothing test-only lives
in the library: the real loss runs, its result is multiplied by NaN.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import toolkit.objectives as objectives

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    poison = {int(c) for c in sys.argv[1].split(",") if c}
    real = objectives.distributed_triplet_loss
    calls = 0

    def nan_loss(*args, **kwargs):
        nonlocal calls
        calls += 1
        loss, stats = real(*args, **kwargs)
        if calls in poison:
            return loss * float("nan"), {**stats, "loss": float("nan")}
        return loss, stats

    objectives.distributed_triplet_loss = nan_loss  # the triplet objective looks the name up in this module
    launch = runpy.run_path(str(REPO / "launch" / "embed.py"), run_name="nonfinite_launch")
    return launch["main"](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
