"""The toolkit's errors, in one place. Each message is one line that says what is wrong.

The command line and the launch scripts print ``error: <message>`` for :class:`ConfigError`
and :class:`DataError` and exit 2; everything else that can go wrong in training is turned
into one line by :mod:`toolkit.engine.failures`.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad config or command line: unknown key, wrong type, out-of-range value."""


class DataError(ValueError):
    """Bad input data: a missing folder, no classes, a damaged or hostile file."""


class CheckpointError(RuntimeError):
    """A checkpoint or model file is missing, truncated, corrupt or holds objects weights_only refuses."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the weights were not updated with it."""


class TarError(Exception):
    """A damaged or non-tar shard (raised by the tar reader, skipped or reported by the stream)."""


def missing_extra(what: str, module: str, extra: str) -> ConfigError:
    """The one line for an optional package that is not installed: ``what`` needs it, and how to get it."""
    return ConfigError(f"{what} needs the {module} package: pip install \"toolkit[{extra}]\" (or pip install {module})")


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (cut at ``limit``), for per-file reasons and one-line errors."""
    text = str(exc).splitlines()[0][:limit] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

