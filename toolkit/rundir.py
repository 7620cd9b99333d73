"""One run per run folder: a lock while a job uses it, and ``overwrite=true`` moving the old run aside.

A run folder holds one run's outputs (:data:`toolkit.artifacts.RUN_OUTPUTS`). Two rules keep two runs from
mixing there:

* **One job at a time.** While a job runs, ``RUN/.lock`` names it (JSON: pid, host, start
  time, command). It is created atomically (``O_CREAT | O_EXCL``) by rank 0 before anything
  else is written and removed at the end, on failure too. A second job refuses with one line
  naming the holder. A lock whose process is gone (same host; pid dead, or reused by another
  process) is stale and taken over with a warning; one from another host cannot be checked
  from here, so the job refuses and says how to remove it.
* **Starting over leaves nothing to read.** ``overwrite=true`` moves the previous run's files
  into ``RUN/previous-<UTC time>/`` (nothing is deleted): a new run can then neither prune its
  own checkpoints in favour of older higher-numbered ones, resume the old run, nor append to
  its metrics. Files the toolkit does not write (notes, earlier ``previous-*`` folders) stay.

:func:`claim_run_dir` does both for a launch script, on rank 0, and makes every rank agree on
the outcome; the other functions are the mechanics, usable (and tested) without processes.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from toolkit.artifacts import LOCK_FILE, RUN_OUTPUTS
from toolkit.distributed import from_main
from toolkit.errors import ConfigError

__all__ = [
    "PREVIOUS_PREFIX",
    "RunClaim",
    "RunFolderBusy",
    "RunLock",
    "acquire_lock",
    "busy_message",
    "claim_run_dir",
    "lock_age_s",
    "lock_is_stale",
    "move_previous_run",
    "process_start_time",
    "read_lock",
    "takeover_message",
]

PREVIOUS_PREFIX = "previous-"


class RunFolderBusy(ConfigError):
    """Another job holds the run folder's lock (or may: a lock from another host)."""


# --------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) from /proc/<pid>/stat; None where unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the command name (field 2) may hold spaces
    try:
        return fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime) of proc(5)
    except (IndexError, ValueError):
        return None


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None where /proc cannot tell.

    Together with the pid it names one process: a pid reused later has another start time.
    """
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _pid_namespace() -> str | None:
    """This process's pid namespace (Linux), e.g. ``pid:[4026531836]``: containers sharing a host name differ here."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to another user
        return True
    stat = _proc_stat(pid)
    return stat is None or stat[0] != "Z"  # a killed process its parent has not reaped yet is gone


# --------------------------------------------------------------------------- the lock


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _this_process(command: str | None) -> dict:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "started": _utc_now(),
        "process_start": process_start_time(pid),
        "pid_namespace": _pid_namespace(),
        "command": command if command is not None else shlex.join(sys.argv),
    }


def read_lock(run_dir: str | os.PathLike) -> dict | None:
    """The JSON in ``run_dir/.lock``: None when there is no lock, ``{}`` when it is unreadable."""
    return _read_json(Path(run_dir) / LOCK_FILE)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_settled(path: Path, wait_s: float = 1.0) -> dict | None:
    """Like :func:`read_lock`, but an unreadable lock gets ``wait_s`` to be finished by its writer."""
    deadline = time.monotonic() + wait_s
    while True:
        held = _read_json(path)
        if held != {} or time.monotonic() > deadline:
            return held
        time.sleep(0.05)


# The holder refreshes its lock's mtime every HEARTBEAT_S; a lock from another host (or
# container), whose process cannot be checked from here, is stale once it is older than
# STALE_AFTER_S: its job died (killed, preempted) without removing it.
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


def lock_is_stale(held: dict, *, age_s: float | None = None) -> bool | None:
    """Whether the job a lock names is gone: True (stale), False (running) or None (cannot be checked).

    Stale: same host and the pid is dead, or alive but another process than the one that
    wrote the lock (its start time differs). An unreadable lock is stale too: its writer died
    between creating and filling it. A lock from another host, or from another container
    sharing this host name (another pid namespace), cannot be checked from here, unless its
    holder stopped refreshing it: ``age_s`` (seconds since the lock file last changed) over
    :data:`STALE_AFTER_S` makes it stale.
    """
    if not isinstance(held.get("pid"), int):
        return True
    theirs, ours = held.get("pid_namespace"), _pid_namespace()
    if held.get("host") != socket.gethostname() or (theirs is not None and ours is not None and theirs != ours):
        return True if age_s is not None and age_s > STALE_AFTER_S else None
    pid = held["pid"]
    if not _pid_alive(pid):
        return True
    recorded, current = held.get("process_start"), process_start_time(pid)
    return recorded is not None and current is not None and recorded != current


def lock_age_s(path: Path) -> float | None:
    """Seconds since ``path`` last changed (None if it is gone)."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except FileNotFoundError:
        return None


def _holder(run_dir: Path, held: dict) -> str:
    return (
        f"run folder {run_dir} is in use by pid {held.get('pid')} on host {held.get('host')} "
        f"since {held.get('started')}"
    )


def _command(held: dict) -> str:
    command = str(held.get("command", "?"))
    return command if len(command) <= 200 else command[:197] + "..."


def busy_message(run_dir: str | os.PathLike, held: dict, *, checkable: bool) -> str:
    """The one line a job refused by a live (or uncheckable) lock prints."""
    run_dir = Path(run_dir)
    if checkable:
        return f"{_holder(run_dir, held)}: {_command(held)!r} is still running; wait for it, stop it, or use another run_dir"
    return (
        f"{_holder(run_dir, held)}: {_command(held)!r}; this process cannot check a job on another host (or in "
        f"another container): its lock counts as stale {STALE_AFTER_S / 60:.0f} min after that job stops refreshing "
        f"it; if that job is no longer running, delete {run_dir / LOCK_FILE} and start again"
    )


def _remove_if_unchanged(path: Path, held: dict) -> bool:
    """Remove the lock at ``path`` if it still says ``held``; False when another job got there first."""
    aside = path.with_name(f"{LOCK_FILE}.{os.getpid()}.stale")
    try:
        os.rename(path, aside)  # atomic: of two jobs taking over the same stale lock, one moves it
    except FileNotFoundError:
        return False
    if _read_json(aside) == held:
        aside.unlink()
        return True
    try:  # moved a fresh lock another job just took: give it back
        os.link(aside, path)
    except FileExistsError:
        pass
    aside.unlink()
    return False


class RunLock:
    """``run_dir/.lock`` held by this process; :meth:`release` (or leaving a ``with``) removes it.

    While held, a daemon thread refreshes the file's mtime every :data:`HEARTBEAT_S`, so a
    job on another machine can tell a live holder from a dead one.
    """

    def __init__(self, path: Path, info: dict, took_over: dict | None = None, *, heartbeat_s: float = HEARTBEAT_S):
        self.path, self.info, self.took_over = path, info, took_over  # took_over: the stale lock this one replaced
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(heartbeat_s,), name="run-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                os.utime(self.path)
            except OSError:
                pass  # moved or removed by hand: nothing to keep fresh

    def release(self) -> None:
        """Stop the heartbeat; remove the lock if it is still this process's (never another job's)."""
        self._stop.set()
        if _read_json(self.path) == self.info:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _create_exclusive(path: Path, info: dict) -> None:
    """Create ``path`` holding ``info``; FileExistsError if it exists (O_EXCL: one creator wins)."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def acquire_lock(run_dir: str | os.PathLike, *, command: str | None = None) -> RunLock:
    """Take ``run_dir/.lock`` for this process (creating ``run_dir``), taking over a stale lock.

    Raises :class:`RunFolderBusy` when a running job holds it, or a job on another host does
    (which cannot be checked from here). ``command`` is recorded for the refusal message
    (default: this process's command line). ``RunLock.took_over`` names a replaced stale lock.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    info, took_over = _this_process(command), None
    for _ in range(5):  # more rounds only when other jobs race for the same stale lock
        try:
            _create_exclusive(path, info)
            return RunLock(path, info, took_over)
        except FileExistsError:
            pass
        held = _read_settled(path)
        if held is None:  # released meanwhile
            continue
        stale = lock_is_stale(held, age_s=lock_age_s(path))
        if not stale:
            raise RunFolderBusy(busy_message(run_dir, held, checkable=stale is False))
        if _remove_if_unchanged(path, held):
            took_over = held
    raise RunFolderBusy(f"run folder {run_dir}: other jobs keep taking {path}; try again")


def takeover_message(run_dir: str | os.PathLike, held: dict) -> str:
    """The warning printed when a stale lock is taken over."""
    if not held:
        return f"warning: run folder {run_dir}: replaced an unreadable stale lock {Path(run_dir) / LOCK_FILE}"
    return (
        f"warning: run folder {run_dir}: taking over the stale lock of pid {held.get('pid')} on host "
        f"{held.get('host')} (since {held.get('started')}, {_command(held)!r}): that process is gone"
    )


# --------------------------------------------------------------------------- starting over


def _new_previous_dir(run_dir: Path, now: datetime | None) -> Path:
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        dest = run_dir / f"{PREVIOUS_PREFIX}{stamp}{'' if n == 1 else f'-{n}'}"
        try:
            dest.mkdir()
            return dest
        except FileExistsError:
            continue  # two starts over within one second
    raise FileExistsError(f"{run_dir}: no free {PREVIOUS_PREFIX}{stamp}* folder name")


def move_previous_run(run_dir: str | os.PathLike, *, now: datetime | None = None) -> Path | None:
    """Move the toolkit's files of the previous run (:data:`RUN_OUTPUTS`) into ``run_dir/previous-<UTC time>/``.

    Returns that folder, or None when there was nothing to move. Other files stay where they
    are, earlier ``previous-*`` folders included; the lock moves only when stale, so a job
    holding it keeps it. Call it holding the lock, before anything of the new run is written.
    """
    run_dir = Path(run_dir)
    names = [n for n in RUN_OUTPUTS if os.path.lexists(run_dir / n)]
    if LOCK_FILE in names and lock_is_stale(read_lock(run_dir) or {}, age_s=lock_age_s(run_dir / LOCK_FILE)) is not True:
        names.remove(LOCK_FILE)
    if not names:
        return None
    dest = _new_previous_dir(run_dir, now)
    for name in names:
        try:
            os.rename(run_dir / name, dest / name)  # same file system: a rename, never a copy
        except FileNotFoundError:  # a stale lock another job took over meanwhile
            pass
    return dest


# --------------------------------------------------------------------------- launch scripts


class RunClaim:
    """A run folder held by this job: the lock on the main process, nothing on the others.

    Use as a context manager (or call :meth:`release`): the lock goes when the job ends,
    whether it succeeded or raised.
    """

    def __init__(self, lock: RunLock | None):
        self.lock = lock

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "RunClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_run_dir(
    accelerator, run_dir: str | os.PathLike, *, overwrite: bool, command: str | None = None,
    check: Callable[[], None] | None = None,
) -> RunClaim:
    """Make ``run_dir`` this job's before anything is written there; every rank gets the same outcome.

    The main process takes the lock, runs ``check`` (the stage's own refusals, now that no
    other job can change the folder) and, with ``overwrite``, moves the previous run aside,
    printing where it went. The others wait for it; then every rank continues, or raises the
    same :class:`~toolkit.config.ConfigError` (the lock is released again on a refusal).
    """
    run_dir = Path(run_dir)
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = acquire_lock(run_dir, command=command)
            if lock.took_over is not None:
                print(takeover_message(run_dir, lock.took_over), flush=True)
            if check is not None:
                check()
            if overwrite:
                moved = move_previous_run(run_dir)
                if moved is not None:
                    print(f"overwrite=true: moved the previous run in {run_dir} to {moved}", flush=True)
        except (ConfigError, OSError) as exc:
            error = str(exc) if isinstance(exc, ConfigError) else f"run folder {run_dir}: {exc}"
            if lock is not None:
                lock.release()
                lock = None
    error = from_main(error, accelerator.device)
    if error is not None:
        raise ConfigError(error)
    return RunClaim(lock)
