"""Hold a run folder's lock the way a running job does, until stdin closes.

    python hold_run_lock.py RUN_DIR

Takes ``RUN_DIR/.lock`` with toolkit.rundir, prints ``held`` and waits. Closing stdin (or the
test process going away) ends it normally: the lock is released. SIGKILL leaves the lock
behind, stale, as a crashed job would.
"""
from __future__ import annotations

import sys

from toolkit.rundir import acquire_lock


def main() -> int:
    with acquire_lock(sys.argv[1], command="hold_run_lock.py (a test's stand-in job)"):
        print("held", flush=True)
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
