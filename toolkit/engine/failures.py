"""One line per rank when a run fails: never a hang, never a page of C++ frames.

A dead peer closes its sockets (gloo raises at once), a stuck one trips collective_timeout_s,
and the launcher SIGTERMs the survivors once any rank has died. :func:`failure_line` turns
each of those (and data/config errors, non-finite losses) into an exit status and one line
naming the cause and the last complete checkpoint to resume from.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

from toolkit.artifacts import CHECKPOINTS_DIR, LATEST_FILE
from toolkit.errors import ConfigError, DataError, NonFiniteLossError


class Terminated(Exception):
    """SIGTERM arrived: from a scheduler, or from the launcher stopping every process once one has failed."""


def sigterm_raises(main_pid: int):
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
_LOST_PEER_HINTS = (
    "connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "timeout", "pair closure", "gloo", "nccl",
)


def lost_peer(exc: BaseException, world: int) -> bool:
    import torch.distributed as dist

    if world <= 1:
        return False
    if isinstance(exc, dist.DistError):  # DistBackendError, DistNetworkError, DistStoreError
        return True
    return isinstance(exc, RuntimeError) and any(h in str(exc).lower() for h in _LOST_PEER_HINTS)


def one_line(exc: BaseException) -> str:
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


def last_checkpoint(run_dir: Path) -> str:
    # The pointer only (cheap: this runs in a dying process); resume checks the file itself.
    try:
        return f"step {json.loads((run_dir / CHECKPOINTS_DIR / LATEST_FILE).read_text())['step']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "none yet"


def main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()  # signal.signal works only there


def failure_line(exc: BaseException, *, rank: int, world: int, run_dir: Path) -> tuple[int, str] | None:
    """(exit status, the one line to print) for a failure during training; None: not ours, re-raise."""
    resume = f"last complete checkpoint: {last_checkpoint(run_dir)}; resume with resume=true"
    if isinstance(exc, (ConfigError, DataError)):
        return 2, f"error: {one_line(exc)}"
    if isinstance(exc, NonFiniteLossError):  # its message names the last good checkpoint
        return 1, f"error: {one_line(exc)}"
    if isinstance(exc, Terminated) or re.search(r"DataLoader worker .* killed by signal: Terminated", str(exc)):
        return 128 + signal.SIGTERM, (
            f"error: rank {rank}: stopped by SIGTERM during training (from a scheduler, or from the launcher "
            f"after another process failed: see its report); {resume}"
        )
    if lost_peer(exc, world):
        return 1, f"error: rank {rank}: lost contact with another process during training ({one_line(exc)}); {resume}"
    return None


class FailureReport:
    """The failure handling of a launch script, as one ``with`` block around training.

    Inside the block SIGTERM raises :class:`Terminated` (so the tracker closes and the run
    says why). A failure :func:`failure_line` knows is printed as its one line on stderr and
    swallowed; ``exit_code`` then holds the status to exit with (None: the block succeeded).
    Anything else propagates unchanged, with its traceback::

        with FailureReport(rank=r, world=w, run_dir=run_dir) as failed:
            ...train...
        if failed.exit_code is not None:
            return failed.exit_code
    """

    def __init__(self, *, rank: int, world: int, run_dir: Path):
        self.rank, self.world, self.run_dir = rank, world, Path(run_dir)
        self.exit_code: int | None = None
        self._old_sigterm = None

    def __enter__(self) -> "FailureReport":
        if main_thread():  # signal.signal works only there
            self._old_sigterm = signal.signal(signal.SIGTERM, sigterm_raises(os.getpid()))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc is None or not isinstance(exc, Exception):
                return False  # success, or KeyboardInterrupt/SystemExit: not ours to report
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # already stopping: a late SIGTERM must not garble the report
            failure = failure_line(exc, rank=self.rank, world=self.world, run_dir=self.run_dir)
            if failure is None:
                return False
            self.exit_code, line = failure
            print(line, file=sys.stderr, flush=True)
            return True
        finally:
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
