"""What a run leaves behind: the run-folder layout, and the two saved models as typed payloads.

A run folder (``run_dir``) holds, whatever the stage::

    config.yaml            the resolved config (``--config RUN/config.yaml`` reruns it)
    metrics.jsonl          one JSON record per logged step
    summary.json           final numbers
    checkpoints/           step-*.pt + latest.json (embedding stage; toolkit.checkpoint)
    best_embedder.pt       EmbedderArtifact (embedding stage)
    best_head.pt           HeadArtifact (classifier stage)
    report.json, report.md, plots/   the kNN-vs-head report (classifier stage)
    wandb/, wandb-data/    W&B's own files
    .lock                  held while a job runs (toolkit.rundir)

Every one of those names is spelled here and nowhere else. A *run* handed to evaluate,
predict, export or the classifier stage is an embedding run folder (or its
``best_embedder.pt``) or a classifier run folder (or its ``best_head.pt``, which records the
absolute path of the embedder it was trained on): :func:`open_run` finds and loads them.

Saved models are files from anywhere: :func:`toolkit.files.safe_load` refuses pickled code,
and ``from_payload`` checks every key the code relies on, with a one-line
:class:`~toolkit.errors.DataError` otherwise. A shard location a model file records is
used only when it is a plain local path (:func:`recorded_shards`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from toolkit.data.location import from_file_message, is_local_location
from toolkit.errors import CheckpointError, DataError
from toolkit.files import safe_load

# --------------------------------------------------------------------------- run-folder layout

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest.json"  # inside CHECKPOINTS_DIR: names the newest complete checkpoint
EMBEDDER_FILE = "best_embedder.pt"
HEAD_FILE = "best_head.pt"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOTS_DIR = "plots"
WANDB_DIR = "wandb"
WANDB_DATA_DIR = "wandb-data"
WANDB_ID_FILE = "wandb-run-id"  # the W&B run id, so resume=true continues the same run
METRICS_CSV = "metrics.csv"  # tracker=csv: step,time,key,value rows (metrics.jsonl, long format)
TENSORBOARD_DIR = "tensorboard"  # tracker=tensorboard: the event files
MLFLOW_DB = "mlflow.db"  # tracker=mlflow without MLFLOW_TRACKING_URI: a local SQLite store
MLFLOW_DIR = "mlruns"  # ... and its artifacts
MLFLOW_ID_FILE = "mlflow-run-id"  # the MLflow run id, so resume=true continues the same run
LOCK_FILE = ".lock"

# Everything the toolkit writes in a run folder, both stages (what overwrite=true moves aside).
RUN_OUTPUTS = (
    CHECKPOINTS_DIR, EMBEDDER_FILE, HEAD_FILE, METRICS_FILE, SUMMARY_FILE, CONFIG_FILE, REPORT_JSON,
    REPORT_MD, PLOTS_DIR, WANDB_DIR, WANDB_DATA_DIR, WANDB_ID_FILE, METRICS_CSV, TENSORBOARD_DIR, MLFLOW_DB,
    MLFLOW_DIR, MLFLOW_ID_FILE, LOCK_FILE,
)



def run_outputs_in(run_dir: str | Path) -> list[str]:
    """The toolkit files of an earlier run found in ``run_dir`` (the lock aside)."""
    run_dir = Path(run_dir)
    return [name for name in RUN_OUTPUTS if name != LOCK_FILE and (run_dir / name).exists()]


MAX_IMAGE_SIZE = 4096  # a recorded resize target beyond this is not one `toolkit shard` wrote


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _shallow(artifact) -> dict:
    # Not dataclasses.asdict: that deep-copies every tensor of the state dict and the index.
    return {f.name: getattr(artifact, f.name) for f in fields(artifact)}


def _require(payload: dict, source, expected: dict[str, type]) -> None:
    for key, typ in expected.items():
        if not isinstance(payload.get(key), typ):
            raise DataError(f"{source}: not a toolkit model file ({key!r} is missing or not a {typ.__name__})")


# --------------------------------------------------------------------------- payloads


@dataclass
class EmbedderArtifact:
    """``best_embedder.pt``: the embedder's weights and enough to evaluate and predict without the run."""

    KIND: ClassVar[str] = "embedder"

    model: dict[str, torch.Tensor]  # state dict, CPU tensors
    config: dict[str, Any]  # the EmbedConfig as a dict
    classes: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    # The train split's embeddings and labels, so kNN needs no re-embedding:
    # {"embeddings": (N, D) float16, "labels": (N,) int32}
    index: dict[str, torch.Tensor] | None = None
    # The "unknown" distance: a query whose nearest reference is farther is of no known class.
    # {"distance": float, "fmr": float, "num_queries": int, "known_accept_rate": float, ...}
    unknown: dict[str, Any] | None = None

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, config: dict, classes: Sequence[str], metrics: dict, step: int,
                   index: tuple[torch.Tensor, torch.Tensor] | None = None, unknown: dict | None = None) -> "EmbedderArtifact":
        saved = None if index is None else {"embeddings": index[0].half(), "labels": index[1].to(torch.int32)}
        return cls(_cpu_state(model), dict(config), list(classes), dict(metrics), int(step), saved,
                   None if unknown is None else dict(unknown))

    def to_payload(self) -> dict:
        payload = {"kind": self.KIND, **_shallow(self)}
        for optional in ("index", "unknown"):
            if payload[optional] is None:
                del payload[optional]
        return payload

    @classmethod
    def from_payload(cls, payload: Any, source) -> "EmbedderArtifact":
        """Check ``payload`` (loaded from ``source``) and type it; a DataError names what is wrong."""
        if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
            raise DataError(f"{source}: not a toolkit model file (no config inside)")
        _require(payload, source, {"classes": list, "model": dict})
        _require(payload["config"], f"{source} (config)", {"arch": str, "input_size": int, "embedding_dim": int})
        _check_classes_are_names(payload["classes"], source)
        index = payload.get("index")
        if index is not None and not (isinstance(index, dict) and all(isinstance(index.get(k), torch.Tensor) for k in ("embeddings", "labels"))):
            raise DataError(f"{source}: not a toolkit model file (bad reference index)")
        return cls(payload["model"], payload["config"], list(payload["classes"]), dict(payload.get("metrics") or {}),
                   int(payload.get("step", 0)), index, _checked_unknown(payload.get("unknown"), source))

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The saved train-split index as (embeddings (N, D) float32, labels (N,) long)."""
        if self.index is None:
            raise DataError("this embedder holds no reference index")
        return self.index["embeddings"].float(), self.index["labels"].long()


def _checked_unknown(unknown: Any, source) -> dict | None:
    """The saved "unknown" distance, or None; anything but a finite distance >= 0 and an FMR in (0, 1) is refused."""
    if unknown is None:
        return None
    ok = isinstance(unknown, dict) and all(isinstance(unknown.get(k), float) and math.isfinite(unknown[k]) for k in ("distance", "fmr"))
    if not ok or unknown["distance"] < 0 or not 0 < unknown["fmr"] < 1:
        raise DataError(f"{source}: not a toolkit model file (bad unknown-distance record {str(unknown)[:80]!r})")
    return dict(unknown)


@dataclass
class HeadArtifact:
    """``best_head.pt``: the classifier head, and which embedder and preprocessing it needs."""

    KIND: ClassVar[str] = "head"

    head: dict[str, torch.Tensor]  # state dict, CPU tensors
    config: dict[str, Any]  # the ClassifyConfig as a dict, shards resolved
    classes: list[str]
    embedder: str  # absolute path of the best_embedder.pt it was trained on
    embedding_dim: int
    preprocess: dict[str, Any]  # shard-time preprocessing: predict needs neither run folder nor shards
    metrics: dict[str, Any] = field(default_factory=dict)
    epoch: float = 0
    step: int = 0
    embedder_step: int = 0

    @classmethod
    def from_model(cls, head: torch.nn.Module, *, config: dict, embedder_path: str | Path, embedder: EmbedderArtifact,
                   preprocess: dict, metrics: dict, epoch: float, step: int) -> "HeadArtifact":
        return cls(
            _cpu_state(head), dict(config), list(embedder.classes), str(Path(embedder_path).resolve()),
            int(embedder.config["embedding_dim"]), dict(preprocess), dict(metrics), epoch, int(step), int(embedder.step),
        )

    def to_payload(self) -> dict:
        return {"kind": self.KIND, **_shallow(self)}

    @classmethod
    def from_payload(cls, payload: Any, source) -> "HeadArtifact":
        if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
            raise DataError(f"{source}: not a toolkit model file (no config inside)")
        _require(payload, source, {"classes": list, "head": dict, "embedder": str, "embedding_dim": int})
        _require(payload["config"], f"{source} (config)", {"hidden": int, "dropout": float})
        _check_classes_are_names(payload["classes"], source)
        return cls(
            payload["head"], payload["config"], list(payload["classes"]), payload["embedder"], payload["embedding_dim"],
            dict(payload.get("preprocess") or {}), dict(payload.get("metrics") or {}), payload.get("epoch", 0),
            int(payload.get("step", 0)), int(payload.get("embedder_step", 0)),
        )


def _check_classes_are_names(classes: list, source) -> None:
    if not all(isinstance(c, str) for c in classes):
        raise DataError(f"{source}: not a toolkit model file (class names are not all strings)")


def load_artifact(path: str | Path) -> EmbedderArtifact | HeadArtifact:
    """Load and check a ``best_embedder.pt`` or ``best_head.pt`` (whichever its ``kind`` says)."""
    path = Path(path)
    try:
        payload = safe_load(path)
    except CheckpointError as exc:  # one-line error type the CLI already reports cleanly
        raise DataError(str(exc)) from exc
    if isinstance(payload, dict) and payload.get("kind") == HeadArtifact.KIND:
        return HeadArtifact.from_payload(payload, path)
    return EmbedderArtifact.from_payload(payload, path)


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    """The saved models of a run, and where they came from."""

    embedder_path: Path
    embedder: EmbedderArtifact
    head_path: Path | None = None
    head: HeadArtifact | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.embedder.classes)

    @property
    def has_index(self) -> bool:
        return self.embedder.index is not None

    def shards(self) -> str:
        """The shard folder the run was trained on (the head's, else the embedder's), if local."""
        if self.head is not None:
            return recorded_shards(self.head.config, self.head_path)
        return recorded_shards(self.embedder.config, self.embedder_path)


def open_run(run: str | Path | Run) -> Run:
    """Find and load the models of ``run`` (see the module docstring for what a run is)."""
    if isinstance(run, Run):
        return run
    p = Path(run)
    if p.is_dir():
        if (p / HEAD_FILE).is_file():
            p = p / HEAD_FILE
        elif (p / EMBEDDER_FILE).is_file():
            p = p / EMBEDDER_FILE
        else:
            raise DataError(f"{p}: no {EMBEDDER_FILE} or {HEAD_FILE} in this folder (is it a finished run?)")
    elif not p.is_file():
        raise DataError(f"run not found: {p}")
    saved = load_artifact(p)
    if isinstance(saved, EmbedderArtifact):
        return Run(embedder_path=p, embedder=saved)
    emb_path = Path(saved.embedder)
    if not emb_path.is_file():
        raise DataError(f"{p}: the embedder it was trained on is gone: {emb_path}")
    embedder = load_artifact(emb_path)
    if not isinstance(embedder, EmbedderArtifact):
        raise DataError(f"{p}: names {emb_path} as its embedder, which is not an embedder file")
    return Run(embedder_path=emb_path, embedder=embedder, head_path=p, head=saved)


def recorded_shards(config: dict, source: str | Path) -> str:
    """The shard folder a saved model's ``config`` (read from ``source``) names, if it is a local path.

    A model file is data: a location it records is never opened when it is a URL or a
    ``pipe:`` command (that would run whatever the file's author wrote); the user must then
    name the shards themselves.
    """
    location = config.get("shards")
    if not is_local_location(location):
        raise DataError(from_file_message(location, source))
    return location


def checked_preprocess(pre: Any, source) -> dict:
    """Refuse preprocessing parameters no shard writer produces (read from a file: untrusted)."""
    size = pre.get("image_size") if isinstance(pre, dict) else "missing"
    ok = isinstance(pre, dict) and isinstance(pre.get("grayscale", True), bool) and (
        size is None or (isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= MAX_IMAGE_SIZE)
    )
    if not ok:
        raise DataError(f"{source}: bad preprocessing record {str(pre)[:120]!r} (image_size must be empty or 1..{MAX_IMAGE_SIZE}, grayscale true/false)")
    return pre


def check_classes(shard_classes: Sequence[str], model_classes: Sequence[str], *, shards) -> None:
    """Raise DataError naming the difference when the shards' classes are not the model's.

    Class indices in shards are positions in the sorted class list, so anything but an
    identical list would silently mislabel samples.
    """
    shard_classes, model_classes = list(shard_classes), list(model_classes)
    if shard_classes == model_classes:
        return
    missing = [c for c in shard_classes if c not in set(model_classes)]
    absent = [c for c in model_classes if c not in set(shard_classes)]
    parts = []
    if missing:
        parts.append(f"shards have classes {_brief(shard_classes)} missing from the model: {', '.join(missing)}")
    if absent:
        parts.append(f"the model has classes the shards lack: {', '.join(absent)}")
    if not parts:
        parts.append(f"same classes in a different order (shards {shard_classes}, model {model_classes})")
    raise DataError(f"{shards}: " + "; ".join(parts))


def _brief(names: list[str], n: int = 8) -> str:
    return "[" + ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "") + "]"


# --------------------------------------------------------------------------- models


def default_device(device=None) -> torch.device:
    """``device``, or CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def in_channels(state: dict) -> int:
    """Input channels of a saved embedder's state dict (1 grey, 3 RGB)."""
    # The first 4-D weight is the stem conv, (64, C, k, k), for ZFNet and the ResNets alike;
    # reading it keeps loading independent of the shard folder still being around.
    return int(next(v for v in state.values() if v.ndim == 4).shape[1])


def build_frozen_embedder(saved: EmbedderArtifact, device=None) -> torch.nn.Module:
    """Rebuild a saved embedder: eval mode (BatchNorm uses, never updates, its running stats), no gradients."""
    from toolkit.models import build_embedder

    cfg = saved.config
    model = build_embedder(
        arch=cfg["arch"], in_channels=in_channels(saved.model), input_size=cfg["input_size"],
        embedding_dim=cfg["embedding_dim"],
    )
    model.load_state_dict(saved.model)
    model.requires_grad_(False)
    return model.to(default_device(device)).eval()


def load_embedder(run: str | Path | Run, device=None) -> tuple[torch.nn.Module, EmbedderArtifact]:
    """A saved embedder -> (model in eval mode, requires_grad off; its artifact).

    Accepts an embedding run folder, a ``best_embedder.pt``, or a classifier run / its
    ``best_head.pt`` (then the embedder the head was trained on).
    """
    run = open_run(run)
    return build_frozen_embedder(run.embedder, device), run.embedder


def load_head(run: str | Path | Run, device=None) -> tuple[torch.nn.Module, HeadArtifact]:
    """A saved classifier head -> (head in eval mode; its artifact)."""
    from toolkit.models import build_head

    run = open_run(run)
    if run.head is None:
        raise DataError(
            f"{run.embedder_path} is an embedder without a classifier head: train one with "
            f"launch/classify.py embedder={run.embedder_path}, or use method=knn"
        )
    cfg = run.head.config
    head = build_head(embedding_dim=run.head.embedding_dim, hidden=cfg["hidden"], num_classes=len(run.head.classes),
                      dropout=cfg["dropout"])
    head.load_state_dict(run.head.head)
    head.requires_grad_(False)
    return head.to(default_device(device)).eval(), run.head
