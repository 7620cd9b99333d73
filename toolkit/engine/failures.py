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
import socket
import sys
import threading
import time
from pathlib import Path

from toolkit.artifacts import CHECKPOINTS_DIR, LATEST_FILE
from toolkit.errors import ConfigError, DataError, NonFiniteLossError


class Terminated(Exception):
    """SIGTERM arrived: from a scheduler, or from the launcher stopping every process once one has failed."""


def sigterm_raises(main_pid: int, heard: threading.Event | None = None):
    """A SIGTERM handler raising Terminated in ``main_pid``. Python's default action ends the
    process without a word; as an exception it unwinds (tracker closed) and main() says why.
    ``heard`` is set when it runs: the main thread was free to handle the signal itself."""

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
        if heard is not None:
            heard.set()
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


# After a SIGTERM, a rank blocked in C++ (a collective, a read) is ended this many seconds later.
TERM_GRACE_S = 5.0


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

    def __init__(self, *, rank: int, world: int, run_dir: Path, grace_s: float = TERM_GRACE_S):
        self.rank, self.world, self.run_dir = rank, world, Path(run_dir)
        self.exit_code: int | None = None
        self.grace_s = grace_s
        self._old_sigterm = None
        self._old_wakeup = -1
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._done = threading.Event()  # the block ended
        self._heard = threading.Event()  # the Python-level handler ran: the main thread is unwinding

    def __enter__(self) -> "FailureReport":
        if main_thread():  # signal.signal works only there
            self._old_sigterm = signal.signal(signal.SIGTERM, sigterm_raises(os.getpid(), self._heard))
            self._watch_sigterm()
        return self

    def _watch_sigterm(self) -> None:
        """Exit within ``grace_s`` of a SIGTERM even while the main thread is blocked in C++.

        Python runs a signal handler only between bytecodes, so a rank waiting in a collective
        (a peer stopped, a rank-0-only step) would hear SIGTERM only when collective_timeout_s
        ran out. The C-level handler still writes the signal number to the wakeup fd: a
        watcher thread reads it and, if the Python-level handler has not run within
        ``grace_s`` (the main thread is blocked), prints the same one line and ends the process
        with status 143.
        """
        try:
            r, w = socket.socketpair()
            w.setblocking(False)
            self._old_wakeup = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        except (OSError, ValueError):
            return
        self._wakeup = (r, w)
        pid = os.getpid()

        def watch() -> None:
            while True:
                try:
                    data = r.recv(64)
                except OSError:
                    return
                if not data or self._done.is_set():
                    return
                if signal.SIGTERM in data and os.getpid() == pid:
                    deadline = time.monotonic() + self.grace_s
                    while time.monotonic() < deadline and not (self._done.is_set() or self._heard.is_set()):
                        time.sleep(0.05)
                    if self._done.is_set() or self._heard.is_set():
                        return  # the main thread heard it and unwinds (however long that takes)
                    _, line = failure_line(Terminated(), rank=self.rank, world=self.world, run_dir=self.run_dir)
                    print(f"{line} (the process was blocked for {self.grace_s:g} s, in a collective or a read)",
                          file=sys.stderr, flush=True)
                    os._exit(128 + signal.SIGTERM)

        threading.Thread(target=watch, name="sigterm-watch", daemon=True).start()

    def _stop_watching(self) -> None:
        self._done.set()
        if self._wakeup is not None:
            try:
                signal.set_wakeup_fd(self._old_wakeup)
            except (OSError, ValueError):
                pass
            r, w = self._wakeup
            self._wakeup = None
            try:
                w.send(b"\0")  # wake the watcher: it sees _done and returns
            except OSError:
                pass
            w.close()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop_watching()
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
