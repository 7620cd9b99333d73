"""Progress bars: tqdm when wanted, a silent stand-in with the same methods when not.

One helper for the training loops, ``toolkit shard`` and the data-set generators, so every
bar follows the same rule: on for a terminal, off for non-main ranks, and quiet in log files.
"""
from __future__ import annotations

import sys

__all__ = ["progress"]


class _NoBar:
    """Stands in for a tqdm bar when bars are off: iterates and swallows updates."""

    def __init__(self, iterable=None, total=None):
        self.iterable = iterable
        self.total = total
        self.n = 0

    def __iter__(self):
        if self.iterable is None:
            return iter(())
        return iter(self.iterable)

    def __len__(self):
        if self.total is not None:
            return self.total
        return len(self.iterable)  # type: ignore[arg-type]

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_description(self, *args, **kwargs) -> None:
        pass

    def write(self, s: str, *args, **kwargs) -> None:
        print(s, file=sys.stderr)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable=None, *, total: int | None = None, desc: str | None = None, enabled: bool | None = True, **kw):
    """A tqdm bar, or a silent stand-in with the same ``update``/``set_postfix``/``close``.

    ``enabled=True`` forces a bar, ``False`` (e.g. non-main ranks) disables it, ``None`` means
    "only when stderr is a terminal", so batch-job logs aren't filled with carriage returns.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _NoBar(iterable, total)
    from tqdm.auto import tqdm

    kw.setdefault("dynamic_ncols", True)
    if not sys.stderr.isatty():
        kw.setdefault("mininterval", 30.0)  # log files: one line every 30 s, not a wall of \r updates
    return tqdm(iterable, total=total, desc=desc, **kw)
