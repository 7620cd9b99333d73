"""Typed run configs: YAML file + ``key=value`` overrides, unknown keys rejected.

A config is a flat dataclass (nanoGPT style: every knob in one readable place). It is
resolved once, validated before any work starts, written to the run folder, W&B and every
checkpoint. Command-line overrides accept all the forms users and the W&B agent produce::

    lr=0.001   --lr=0.001   --lr 0.001   --resume   (bare flag: bool True)
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml


class ConfigError(ValueError):
    """A bad config: unknown key, wrong type or out-of-range value. One line, says which."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert ``value`` (often a string from the command line) to the field's type."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or (origin is not None and type(None) in args):  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null", ""}):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is typing.Literal:
        allowed = args
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)  # YAML 1.1 reads "1e-3" as a string: float() fixes it
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    return value


def _suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_overrides(argv: Sequence[str]) -> tuple[str | None, dict[str, str | bool]]:
    """Split a command line into ``(config_path, {key: raw_value})``.

    Accepts ``--config PATH``, ``key=value``, ``--key=value``, ``--key value`` and bare
    ``--flag`` (True). Raises ConfigError on anything else.
    """
    config_path = None
    out: dict[str, str | bool] = {}
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--"):
            body = tok[2:]
            if "=" in body:
                key, val = body.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and "=" not in argv[i + 1]:
                key, val = body, argv[i + 1]
                i += 1
            else:
                key, val = body, True
        elif "=" in tok:
            key, val = tok.split("=", 1)
        else:
            raise ConfigError(f"unexpected argument {tok!r}: use key=value or --key=value")
        key = key.replace("-", "_")
        if key == "config":
            config_path = str(val)
        else:
            out[key] = val
        i += 1
    return config_path, out


def load_config(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """Build ``cls`` from defaults, then a YAML file, then overrides; validate; return it."""
    types = _field_types(cls)
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of key: value")
        values.update(data)
    values.update(overrides or {})
    for key in values:
        if key not in types:
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, list(types))}")
    kwargs = {k: _coerce(k, v, types[k]) for k, v in values.items()}
    cfg = cls(**kwargs)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def config_from_argv(cls, argv: Sequence[str]):
    path, overrides = parse_overrides(argv)
    return load_config(cls, path, overrides)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)
