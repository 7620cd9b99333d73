"""Train the classifier head on a frozen embedder, then write the kNN-vs-head report.

    accelerate launch launch/classify.py embedder=runs/digits-embed [key=value | --key=value ...]
    accelerate launch launch/classify.py --config FILE.yaml [key=value ...]

Story: resolve config (unknown keys, a missing embedder or mismatched shards fail here,
before any work) -> Accelerator -> the run folder made this job's (RUN/.lock; overwrite=true
moves the previous run aside) -> tracker on rank 0 -> fit_head() -> report on rank 0.
Everything reusable lives in toolkit/.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from toolkit.recipes.classify import main  # noqa: E402  (the story: toolkit/recipes/classify.py)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
