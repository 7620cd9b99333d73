"""Run launch/embed.py with rank 0's saves of best_embedder.pt slowed down.

    python slow_rank0_save.py SECONDS [launch/embed.py arguments ...]

Rank 0 sleeps SECONDS before each atomic save the validator makes (the best embedder), as a
large kNN index on a slow disk would; the other ranks wait for it. Nothing test-only lives in
the library: the real save runs after the sleep.
"""
from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

import toolkit.engine.embed as engine

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    seconds = float(sys.argv[1])
    real = engine.atomic_torch_save

    def slow_save(*args, **kwargs):
        if os.environ.get("RANK", "0") == "0":
            time.sleep(seconds)
        return real(*args, **kwargs)

    engine.atomic_torch_save = slow_save  # validate() looks the name up in this module
    launch = runpy.run_path(str(REPO / "launch" / "embed.py"), run_name="slow_save_launch")
    return launch["main"](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
