"""Train a metric-learning embedder. The same command on CPU, one GPU, many GPUs, many machines.

    accelerate launch launch/embed.py --config configs/embed/digits.yaml [key=value | --key=value ...]

Story: resolve config (unknown keys fail here, before any work) -> Accelerator -> the run
folder made this job's (RUN/.lock; overwrite=true moves the previous run aside) -> tracker on
rank 0 -> fit() -> summary. Everything reusable lives in toolkit/.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from toolkit.recipes.embed import main  # noqa: E402  (the story: toolkit/recipes/embed.py)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
