"""Train a metric-learning embedder. The same command on CPU, one GPU, many GPUs, many machines.

    accelerate launch launch/embed.py --config configs/embed/digits.yaml [key=value | --key=value ...]

Story: resolve config (unknown keys fail here, before any work) -> Accelerator -> tracker on
rank 0 -> fit() -> summary. Everything reusable lives in toolkit/.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from toolkit.config import ConfigError, EmbedConfig, config_from_argv, to_dict  # noqa: E402
from toolkit.data.folder import DataError  # noqa: E402


# ----------------------------------------------------------------------------- failure reporting
# A failed run ends with ONE line per rank naming the cause and how to continue, never a hang
# or a page of C++ frames: a dead peer closes its sockets (gloo raises at once), a stuck one
# trips collective_timeout_s, and the launcher SIGTERMs the survivors once any rank has died.


class Terminated(Exception):
    """SIGTERM arrived: from a scheduler, or from the launcher stopping every process once one has failed."""


def _sigterm_raises(main_pid: int):
    """A SIGTERM handler raising Terminated in ``main_pid``. Python's default action ends the
    process without a word; as an exception it unwinds (tracker closed) and main() says why."""

    def handler(signum, frame):
        if os.getpid() != main_pid:
            # A forked DataLoader worker inherited this handler: die the default way, silently.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        # The same SIGTERM (sent to the process group) kills the loader workers; torch's SIGCHLD
        # handler would then raise "DataLoader worker ... killed by signal" in the middle of the
        # unwinding and print a traceback after our line. Stopping anyway: stop listening (a no-op
        # handler, not SIG_DFL: a SIGCHLD already pending would report a "race condition").
        signal.signal(signal.SIGCHLD, lambda *_: None)
        raise Terminated()

    return handler


# What gloo/NCCL errors say when a peer died or hangs; torch raises most as DistError already.
_LOST_PEER_HINTS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "gloo", "nccl")


def _lost_peer(exc: BaseException, world: int) -> bool:
    import torch.distributed as dist

    if world <= 1:
        return False
    if isinstance(exc, dist.DistError):  # DistBackendError, DistNetworkError, DistStoreError
        return True
    return isinstance(exc, RuntimeError) and any(h in str(exc).lower() for h in _LOST_PEER_HINTS)


def _one_line(exc: BaseException) -> str:
    """The informative line of an exception message (torch's are paragraphs with C++ frames)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[0]
    if line.startswith("Caught ") and "Original Traceback" in str(exc):
        # Re-raised from a DataLoader worker: the message is the traceback's last line.
        line = re.sub(r"^[\w.]+: ", "", lines[-1])
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", line)  # gloo's "[.../pair.cc:545] " prefix
    return line.split(". This is typically caused", 1)[0][:300]


def _last_checkpoint(run_dir: Path) -> str:
    # The pointer only (cheap: this runs in a dying process); resume checks the file itself.
    try:
        return f"step {json.loads((run_dir / 'checkpoints' / 'latest.json').read_text())['step']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "none yet"


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()  # signal.signal works only there


def _failure_line(exc: BaseException, *, rank: int, world: int, run_dir: Path) -> tuple[int, str] | None:
    """(exit status, the one line to print) for a failure during training; None: not ours, re-raise."""
    from toolkit.engine.embed import NonFiniteLossError

    resume = f"last complete checkpoint: {_last_checkpoint(run_dir)}; resume with resume=true"
    if isinstance(exc, (ConfigError, DataError)):
        return 2, f"error: {_one_line(exc)}"
    if isinstance(exc, NonFiniteLossError):  # its message names the last good checkpoint
        return 1, f"error: {_one_line(exc)}"
    if isinstance(exc, Terminated) or re.search(r"DataLoader worker .* killed by signal: Terminated", str(exc)):
        return 128 + signal.SIGTERM, (
            f"error: rank {rank}: stopped by SIGTERM during training (from a scheduler, or from the launcher "
            f"after another process failed: see its report); {resume}"
        )
    if _lost_peer(exc, world):
        return 1, f"error: rank {rank}: lost contact with another process during training ({_one_line(exc)}); {resume}"
    return None


def main(argv: list[str]) -> int:
    # 1. Config: fail fast, before processes sync or data is read.
    try:
        cfg = config_from_argv(EmbedConfig, argv)
        from toolkit.data.shards import read_info
        from toolkit.data.stream import pk_shape

        from toolkit.engine.embed import check_run_dir

        info = read_info(cfg.shards)
        check_run_dir(cfg)
        if cfg.batching == "pk":
            pk_shape(batch_size=cfg.batch_size, K=cfg.K, P=cfg.P, num_classes=info["num_classes"])
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        # A W&B agent trial: one run folder per trial (same on every rank: env is shared).
        cfg.run_dir = str(Path(cfg.run_dir) / f"sweep-{os.environ['WANDB_SWEEP_ID']}" / os.environ["WANDB_RUN_ID"])

    # 2. Accelerator: the only place one is created. CPU when there is no GPU (or when
    #    `accelerate launch` was told --cpu / ACCELERATE_USE_CPU=1).
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    from toolkit.engine.embed import fit, resolve_precision

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in {"1", "true"}
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=resolve_precision(cfg.precision, cpu=cpu),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout_s))],
    )
    set_seed(cfg.seed)  # same initial weights on every rank; data order is seeded separately

    # 3. Tracking on rank 0 only (W&B offline unless logged in).
    from toolkit.tracking import make_tracker

    run_dir = Path(cfg.run_dir)
    os.environ.setdefault("WANDB_DATA_DIR", str(run_dir / "wandb-data"))
    tracker = make_tracker(
        enabled=accelerator.is_main_process, kind=cfg.tracker, run_dir=run_dir,
        config=to_dict(cfg), project=cfg.project, name=cfg.name, job_type="embed",
    )  # config.yaml holds exactly the resolved config: `--config run_dir/config.yaml` reruns it
    tracker.summary({"world_size": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision})
    accelerator.print(
        f"embed: {accelerator.num_processes} process(es) on {accelerator.device.type}, "
        f"precision {accelerator.mixed_precision}, run dir {run_dir}"
    )

    # 4. Train, then report (failures: one line per rank, see _failure_line).
    rank, world = accelerator.process_index, accelerator.num_processes
    old_sigterm = signal.signal(signal.SIGTERM, _sigterm_raises(os.getpid())) if _main_thread() else None
    try:
        with tracker:
            summary = fit(cfg, accelerator, tracker)
            best = run_dir / "best_embedder.pt"
            if accelerator.is_main_process and best.exists():
                tracker.log_artifact(best, name="embedder", type="model", metadata=summary)
    except Exception as exc:  # noqa: BLE001 - anything _failure_line does not know re-raises
        if old_sigterm is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # already stopping: a late SIGTERM must not garble the report
        failure = _failure_line(exc, rank=rank, world=world, run_dir=run_dir)
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
