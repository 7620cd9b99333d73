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
            f = float(value)  # accepts "1e3"; refuses "2.5" and "1e-3" instead of truncating
            if not f.is_integer():
                raise ValueError
            return int(f)
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


# --------------------------------------------------------------------------- run configs
from dataclasses import dataclass  # noqa: E402
from typing import Literal, Optional  # noqa: E402

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class EmbedConfig:
    """Everything an embedding run needs. Each key can be overridden: ``lr=3e-4`` or ``--lr=3e-4``."""

    # data: shard folder written by `toolkit shard`
    shards: str = "shards/digits"
    input_size: int = 32  # model input side; shards hold small images, resized on the device
    batch_size: int = 256  # per process; with P×K batching the batch is P×K <= batch_size
    P: int = 0  # classes per batch; 0 = as many as fit (min(classes, batch_size // K))
    K: int = 4  # images per class in a batch (>= 2: a positive pair)
    batching: Literal["pk", "random"] = "pk"  # "random" = the seed's shuffled batches
    shuffle_buffer: int = 1000
    num_workers: int = 2
    strict_data: bool = False  # an unreadable sample or truncated shard stops training (naming the shard) instead of a counted warning + skip
    augment: bool = False  # random rotation ±10°, shift ±10 %, scale 0.9-1.1, done on the device
    # model
    arch: Literal["zfnet", "resnet18", "resnet34"] = "zfnet"
    embedding_dim: int = 128
    sync_bn: bool = False
    channels_last: bool = False
    # loss
    margin: float = 0.2
    mining: Literal["semihard", "hard", "all"] = "semihard"
    squared: bool = False
    # optimiser (Adam) and schedule
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max grad norm; 0 = off
    # budget: whichever comes first (0 = unlimited)
    epochs: int = 10
    max_steps: int = 0
    max_minutes: float = 0.0
    # validation (rank 0, kNN on the embeddings)
    val_every: int = 1  # epochs
    knn_k: int = 13
    eval_batch_size: int = 512
    # checkpoints
    ckpt_every: int = 0  # steps; 0 = at every validation
    keep_last: int = 3
    resume: bool = False
    overwrite: bool = False  # reuse a run_dir that already holds checkpoints
    # run
    run_dir: str = "runs/embed"
    precision: Precision = "auto"
    seed: int = 0
    tracker: Literal["wandb", "none"] = "wandb"
    project: str = "metric-toolkit"
    name: Optional[str] = None
    log_every: int = 10
    collective_timeout_s: float = 600.0  # a rank waiting longer than this on the others fails
    on_nonfinite: Literal["stop", "skip"] = "stop"  # NaN/inf loss: stop the run, or skip that step
    progress: bool = True

    def validate(self) -> None:
        require(self.input_size >= 8, f"input_size must be >= 8, got {self.input_size}")
        require(self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}")
        require(self.K >= 2, f"K must be >= 2 (each class needs a positive pair), got {self.K}")
        require(self.P >= 0, f"P must be >= 0 (0 = as many classes as fit), got {self.P}")
        require(self.P * self.K <= self.batch_size, f"P×K = {self.P}×{self.K} = {self.P * self.K} is larger than batch_size={self.batch_size}")
        require(self.embedding_dim >= 2, f"embedding_dim must be >= 2, got {self.embedding_dim}")
        require(self.margin > 0, f"margin must be > 0, got {self.margin}")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        require(min(self.epochs, self.max_steps, self.warmup_steps, self.num_workers) >= 0, "epochs, max_steps, warmup_steps and num_workers must be >= 0")
        require(self.epochs > 0 or self.max_steps > 0 or self.max_minutes > 0, "no budget: set epochs, max_steps or max_minutes")
        require(self.max_minutes >= 0, f"max_minutes must be >= 0, got {self.max_minutes}")
        require(self.val_every >= 1, f"val_every must be >= 1, got {self.val_every}")
        require(self.knn_k >= 1, f"knn_k must be >= 1, got {self.knn_k}")
        require(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")
        require(self.ckpt_every >= 0 and self.log_every >= 1, "ckpt_every must be >= 0 and log_every >= 1")
        require(self.collective_timeout_s > 0, "collective_timeout_s must be > 0")


@dataclass
class ClassifyConfig:
    """Second stage: a classifier head on the frozen embedder (the seed's comparison with kNN)."""

    embedder: str = "runs/digits-embed/best_embedder.pt"  # a best_embedder.pt or the run folder holding it
    shards: Optional[str] = None  # default: the shards the embedder was trained on
    batch_size: int = 256  # per process, plain shuffled batches
    shuffle_buffer: int = 1000
    num_workers: int = 2
    hidden: int = 64
    dropout: float = 0.5
    lr: float = 0.01  # Adam, as the seed
    weight_decay: float = 0.0
    epochs: int = 10
    max_steps: int = 0
    knn_k: int = 13
    eval_batch_size: int = 512
    # Embed each process's train share once (epoch 1) and reshuffle those embeddings in later
    # epochs: the embedder is frozen and there is no augmentation, so they never change.
    cache_embeddings: bool = True
    run_dir: str = "runs/classify"
    overwrite: bool = False
    precision: Precision = "auto"
    seed: int = 0
    tracker: Literal["wandb", "none"] = "wandb"
    project: str = "metric-toolkit"
    name: Optional[str] = None
    log_every: int = 10
    collective_timeout_s: float = 600.0
    progress: bool = True

    def validate(self) -> None:
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.hidden >= 1, f"hidden must be >= 1, got {self.hidden}")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(self.epochs > 0 or self.max_steps > 0, "no budget: set epochs or max_steps")
        require(min(self.epochs, self.max_steps, self.num_workers) >= 0, "epochs, max_steps and num_workers must be >= 0")
        require(self.knn_k >= 1 and self.log_every >= 1, "knn_k and log_every must be >= 1")
        require(self.collective_timeout_s > 0, "collective_timeout_s must be > 0")
