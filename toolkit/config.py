"""Typed run configs: YAML file + ``key=value`` overrides, unknown keys rejected.

A config is a flat dataclass (nanoGPT style: every knob in one readable place). It is
resolved once, validated before any work starts, written to the run folder, W&B and every
checkpoint. Command-line overrides accept all the forms users and the W&B agent produce::

    lr=0.001   --lr=0.001   --lr 0.001   --resume   (bare flag: bool True)
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from toolkit.data.location import from_file_message, is_local_location
from toolkit.errors import ConfigError, missing_extra


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
            f = float(value)  # YAML 1.1 reads "1e-3" as a string: float() fixes it
            if not math.isfinite(f):  # no field has a use for nan/inf (0 is "off" where off exists)
                raise ConfigError(f"{key}: expected a finite float, got {value!r}")
            return f
        if typ is dict:
            return _coerce_mapping(key, value)
        if typ is str:
            if isinstance(value, (list, tuple, dict, set)):  # YAML `shards: [a, b]` is not a path
                raise ValueError
            return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    return value


_SCALARS = (bool, int, float, str, type(None))


def _coerce_mapping(key: str, value: Any) -> dict:
    """Keyword arguments (``loss_kwargs``): a YAML mapping, or its text from the command line
    (``loss_kwargs='{alpha: 2, beta: 50}'``), of names to scalars or lists of scalars. Read with
    yaml.safe_load: data only, nothing is constructed or run."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else {}
        except yaml.YAMLError:
            raise ConfigError(f"{key}: expected a mapping like {{alpha: 2, beta: 50}}, got {value!r}") from None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping like {{alpha: 2, beta: 50}}, got {value!r}")
    for name, item in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{key}: {name!r} is not a keyword name")
        items = item if isinstance(item, list) else [item]
        if not all(isinstance(v, _SCALARS) for v in items) or (isinstance(item, float) and not math.isfinite(item)):
            raise ConfigError(f"{key}: {name}={item!r}: values are numbers, strings, booleans or lists of them")
    return dict(value)


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
        # A config file is data like any other: the URL / pipe: forms of a shard location
        # (which WebDataset opens by running curl or a shell) come only from the command line.
        for key in getattr(cls, "LOCATIONS", ()):
            used = key in data and key not in (overrides or {}) and data[key] is not None
            if used and not is_local_location(data[key]):
                raise ConfigError(from_file_message(data[key], p))
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


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def config_help(cls, usage: str) -> str:
    """``--help`` of a launch script: ``usage``, then every key of ``cls`` with its default and
    the comment beside it in the dataclass (the source is the one place keys are explained)."""
    import inspect
    import re

    comments: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?(?:#\s*(.*))?$", line)
        if m and m.group(2):
            comments[m.group(1)] = m.group(2).strip()
    lines = [usage, "", f"{cls.__doc__.splitlines()[0]}", "", "keys (default, then what it does):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {f.name}={default!r}" + (f"  # {comments[f.name]}" if f.name in comments else ""))
    return "\n".join(lines)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


_INT32 = 2**31 - 1


def at_least(low: float, high: float | None = None) -> tuple:
    """Range ``low <= value <= high`` (``high`` None: no upper bound)."""
    return (low, high, False)


def above(low: float, high: float | None = None) -> tuple:
    """Range ``low < value <= high``: ``low`` itself is refused (``lr`` > 0)."""
    return (low, high, True)


def check_ranges(cfg, ranges: dict[str, tuple]) -> None:
    """Refuse any numeric field outside its range (:func:`at_least` / :func:`above`).

    Every int and float field of a run config has an entry (a test enforces it), so a value
    that passes here is one the run can use: nothing crashes later with a traceback.
    """
    for name, (low, high, open_low) in ranges.items():
        value = getattr(cfg, name)
        if value < low or (open_low and value == low):
            raise ConfigError(f"{name} must be {'>' if open_low else '>='} {low}, got {value}")
        if high is not None and value > high:
            raise ConfigError(f"{name} must be <= {high}, got {value}")


def check_tracker_installed(kind: str) -> None:
    """tracker=tensorboard / mlflow needs its package: one line naming the extra, before any work."""
    import importlib.util

    module = {"tensorboard": "tensorboard", "mlflow": "mlflow"}.get(kind)
    if module and importlib.util.find_spec(module) is None:
        raise missing_extra(f"tracker={kind}", module, kind)


def check_nonempty(cfg, names: Sequence[str]) -> None:
    """Refuse empty (or blank) strings for paths and names that must name something."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not str(value).strip():
            raise ConfigError(f"{name} must not be empty")


# A process-group timeout beyond this overflows inside torch.distributed (measured: 1e10 s
# fails at once); a week of waiting on a peer is never what a run wants anyway.
MAX_COLLECTIVE_TIMEOUT_S = 7 * 24 * 3600.0
# numpy's legacy seeding (accelerate's set_seed) takes 0 <= seed < 2**32.
MAX_SEED = 2**32 - 1


# The embedders toolkit.models builds itself (toolkit.models.ARCHS; a test keeps the two equal,
# spelled here so that loading a config imports neither torch nor timm).
BUILTIN_ARCHS = ("zfnet", "resnet18", "resnet34")
TIMM_PREFIX = "timm:"


def _is_timm_model(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return bool(name) and timm.is_model(name)


def check_arch(arch: str, *, pretrained: bool = False) -> None:
    """Refuse, in one line, an ``arch`` no embedder exists for (a timm name is looked up in timm)."""
    if arch.startswith(TIMM_PREFIX):
        from toolkit.models import timm_arch_problem  # imports torch and timm: for timm: archs only

        problem = timm_arch_problem(arch[len(TIMM_PREFIX):], pretrained=pretrained)
        require(problem is None, f"arch: {problem}")
        return
    if arch not in BUILTIN_ARCHS:
        hint = _suggest(arch, BUILTIN_ARCHS)
        if not hint and _is_timm_model(arch):  # arch=efficientnet_b0 meant timm:efficientnet_b0
            hint = f" (did you mean {TIMM_PREFIX + arch!r}?)"
        raise ConfigError(f"arch: {arch!r} is not one of {', '.join(BUILTIN_ARCHS)}, {TIMM_PREFIX}<timm model name>{hint}")
    require(not pretrained, f"pretrained=true needs a {TIMM_PREFIX}<name> arch: {arch} has no pretrained weights")


# --------------------------------------------------------------------------- run configs
from dataclasses import dataclass, field  # noqa: E402
from typing import ClassVar, Literal, Optional  # noqa: E402

Precision = Literal["auto", "fp32", "bf16", "fp16"]
# Metrics the validator logs that can choose the best embedder (select_by=). val/: val queries
# against the train split (closed set); test/: inside a test split of held-out classes
# (open set, needs `toolkit shard --holdout_classes`). fnmr_* is lower-better, the rest higher.
SelectBy = Literal[
    "val/knn_accuracy", "val/precision_at_1", "val/map_at_r", "val/r_precision",
    "val/recall_at_1", "val/recall_at_5", "val/recall_at_10",
    "test/recall_at_1", "test/recall_at_5", "test/recall_at_10", "test/precision_at_1", "test/precision_at_5",
    "test/precision_at_10", "test/map_at_r", "test/r_precision", "test/roc_auc",
    "test/fnmr_at_fmr_0.01", "test/fnmr_at_fmr_0.001",
]
LOWER_IS_BETTER = ("test/fnmr_at_fmr_0.01", "test/fnmr_at_fmr_0.001")


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
    read_timeout_s: float = 300.0  # a pipe:/http shard that sends nothing this long stops the rank with one line (0: wait forever)
    augment: bool = False  # random rotation ±10°, shift ±10 %, scale 0.9-1.1, done on the device
    # model
    arch: str = "zfnet"  # zfnet (the seed), resnet18, resnet34, or timm:<name>: any timm model (timm:resnet18, timm:efficientnet_b0), checked against timm.list_models()
    pretrained: bool = False  # timm: archs only: start from timm's pretrained (ImageNet) weights, downloaded on this machine at the start of training; false = random init (the tests)
    embedding_dim: int = 128
    sync_bn: bool = False
    channels_last: bool = False  # NHWC weights and inputs (tensor-core friendly on GPUs); same results
    compile: bool = False  # torch.compile the training model (eager validation); first steps compile, CPU needs a C++ compiler
    # loss
    margin: float = 0.2
    mining: Literal["semihard", "hard", "all"] = "semihard"
    squared: bool = False
    loss: str = "triplet"  # triplet (built-in; margin, mining, squared) or pml:<LossName>: a pytorch-metric-learning loss on the gathered global batch (pml:MultiSimilarityLoss, pml:ProxyAnchorLoss)
    loss_kwargs: dict = field(default_factory=dict)  # keyword arguments of a pml: loss: loss_kwargs='{alpha: 2, beta: 50}'; distance/reducer may name a PML class ({distance: CosineSimilarity})
    miner: str = ""  # optional pml:<MinerName> for a pml: loss, run on the gathered batch (pml:MultiSimilarityMiner)
    miner_kwargs: dict = field(default_factory=dict)  # keyword arguments of the miner: miner_kwargs='{epsilon: 0.1}'
    loss_lr: float = 0.0  # learning rate of the loss's own parameters (ProxyAnchorLoss's proxies); 0 = lr
    # optimiser (Adam) and schedule
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: to 0 at the end of the budget (steps, or max_minutes if it ends first)
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max grad norm; 0 = off
    # budget: whichever comes first (0 = unlimited)
    epochs: int = 10
    max_steps: int = 0
    max_minutes: float = 0.0  # of training (validation included, setup not), on rank 0's clock
    # validation (sharded: each rank searches the train references it embedded; rank 0 merges)
    val_every: int = 1  # epochs
    knn_k: int = 13
    eval_batch_size: int = 512
    select_by: SelectBy = "val/knn_accuracy"  # the metric that picks best_embedder.pt (val/map_at_r breaks ties)
    unknown_fmr: float = 0.01  # false-match rate at which the saved "unknown" distance is calibrated (val vs train)
    save_index: bool = True  # best_embedder.pt holds the train embeddings as its kNN index (sent to rank 0 on save)
    # checkpoints
    ckpt_every: int = 0  # steps; 0 = at every validation
    keep_last: int = 3
    resume: bool = False
    overwrite: bool = False  # reuse a run_dir that already holds checkpoints
    # run
    run_dir: str = "runs/embed"
    precision: Precision = "auto"
    seed: int = 0
    tracker: Literal["wandb", "tensorboard", "mlflow", "csv", "none"] = "wandb"  # metrics.jsonl always; csv/tensorboard/mlflow local unless configured
    project: str = "metric-toolkit"
    name: Optional[str] = None
    log_every: int = 10
    collective_timeout_s: float = 600.0  # a rank waiting longer than this on the others fails
    validation_timeout_s: float = 7200.0  # how long the other ranks wait for rank 0's part of a validation (test split, saving the best embedder)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # NaN/inf loss: stop the run, or skip that step
    progress: bool = True

    LOCATIONS: ClassVar[tuple] = ("shards",)  # read from a file only when local (load_config)
    # The range of every numeric field (0 means "off" or "auto" where its comment says so).
    RANGES: ClassVar[dict] = {
        "input_size": at_least(8, 4096), "batch_size": at_least(2, _INT32), "P": at_least(0, _INT32),
        "K": at_least(2, _INT32), "shuffle_buffer": at_least(1, _INT32), "num_workers": at_least(0, 1024),
        "embedding_dim": at_least(2, 65536), "margin": above(0), "lr": above(0), "weight_decay": at_least(0),
        "warmup_steps": at_least(0, _INT32), "grad_clip": at_least(0), "epochs": at_least(0, _INT32),
        "max_steps": at_least(0, _INT32), "max_minutes": at_least(0), "val_every": at_least(1, _INT32),
        "knn_k": at_least(1, _INT32), "eval_batch_size": at_least(1, _INT32), "ckpt_every": at_least(0, _INT32),
        "keep_last": at_least(1, _INT32), "seed": at_least(0, MAX_SEED), "log_every": at_least(1, _INT32),
        "collective_timeout_s": above(0, MAX_COLLECTIVE_TIMEOUT_S), "unknown_fmr": above(0, 0.5),
        "validation_timeout_s": above(0, MAX_COLLECTIVE_TIMEOUT_S), "read_timeout_s": at_least(0, MAX_COLLECTIVE_TIMEOUT_S),
        "loss_lr": at_least(0),
    }

    def validate(self) -> None:
        check_tracker_installed(self.tracker)
        check_ranges(self, self.RANGES)
        check_nonempty(self, ("shards", "run_dir", "project", "name"))
        require(self.P * self.K <= self.batch_size, f"P×K = {self.P}×{self.K} = {self.P * self.K} is larger than batch_size={self.batch_size}")
        require(self.epochs > 0 or self.max_steps > 0 or self.max_minutes > 0, "no budget: set epochs, max_steps or max_minutes")
        check_arch(self.arch, pretrained=self.pretrained)
        check_objective(self)


def check_objective(cfg: "EmbedConfig") -> None:
    """Refuse, in one line, a loss / miner that cannot train (a pml: one is tried on a small batch)."""
    if cfg.loss == "triplet":
        require(not (cfg.loss_kwargs or cfg.miner or cfg.miner_kwargs),
                "loss=triplet takes margin, mining and squared; loss_kwargs, miner and miner_kwargs are for a pml:<LossName> loss")
        return
    require(cfg.loss.startswith("pml:"), f"loss: {cfg.loss!r} is not triplet or pml:<LossName> (a pytorch-metric-learning loss)")
    require(bool(cfg.miner) or not cfg.miner_kwargs, "miner_kwargs needs a miner=pml:<MinerName>")
    from toolkit.objectives import objective_problem  # imports torch and pytorch-metric-learning: pml: losses only

    problem = objective_problem(loss=cfg.loss, loss_kwargs=cfg.loss_kwargs, miner=cfg.miner, miner_kwargs=cfg.miner_kwargs,
                                embedding_dim=cfg.embedding_dim)
    require(problem is None, str(problem))


@dataclass
class ClassifyConfig:
    """Second stage: a classifier head on the frozen embedder (the seed's comparison with kNN)."""

    embedder: str = "runs/digits-embed"  # an embedding run folder, or its best_embedder.pt
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
    tracker: Literal["wandb", "tensorboard", "mlflow", "csv", "none"] = "wandb"  # metrics.jsonl always; csv/tensorboard/mlflow local unless configured
    project: str = "metric-toolkit"
    name: Optional[str] = None
    log_every: int = 10
    collective_timeout_s: float = 600.0
    progress: bool = True

    LOCATIONS: ClassVar[tuple] = ("shards", "embedder")
    RANGES: ClassVar[dict] = {
        "batch_size": at_least(1, _INT32), "shuffle_buffer": at_least(1, _INT32), "num_workers": at_least(0, 1024),
        "hidden": at_least(1, 65536), "dropout": at_least(0.0, 0.99), "lr": above(0), "weight_decay": at_least(0),
        "epochs": at_least(0, _INT32), "max_steps": at_least(0, _INT32), "knn_k": at_least(1, _INT32),
        "eval_batch_size": at_least(1, _INT32), "seed": at_least(0, MAX_SEED), "log_every": at_least(1, _INT32),
        "collective_timeout_s": above(0, MAX_COLLECTIVE_TIMEOUT_S),
    }

    def validate(self) -> None:
        check_tracker_installed(self.tracker)
        check_ranges(self, self.RANGES)
        check_nonempty(self, ("embedder", "shards", "run_dir", "project", "name"))
        require(self.epochs > 0 or self.max_steps > 0, "no budget: set epochs or max_steps")
