"""Run tracking: local files always, W&B when asked (offline unless logged in).

Every run folder gets the same plain files whatever the backend, so a run can be inspected
with ``cat`` and compared without W&B:

    run_dir/config.yaml      resolved config (written once, at start)
    run_dir/metrics.jsonl    one JSON object per ``log`` call: {"step", "time", **metrics}
    run_dir/summary.json     final numbers (best accuracy, ...)
    run_dir/wandb/           W&B's own folder (offline-run-* or run-*), only for kind="wandb"
    run_dir/wandb-run-id     the W&B run's id: a resumed run (``resume=True``) continues that run
    run_dir/metrics.csv      kind="csv": the same records as step,time,key,value rows
    run_dir/tensorboard/     kind="tensorboard": event files (Accelerate's TensorBoardTracker)
    run_dir/mlflow.db        kind="mlflow": a local MLflow store (SQLite; artifacts in mlruns/)
                             unless MLFLOW_TRACKING_URI is set
                             (Accelerate's MLflowTracker; mlflow-run-id: resumed like W&B)

A run killed mid-write leaves a torn last line in metrics.jsonl: opening the file again
removes it (:func:`repair_metrics`), and a resume drops the records logged after the
checkpoint it continues from (:meth:`Tracker.rewind`), so no step appears twice.

Only the main process may create a real :class:`Tracker` (W&B allows one ``wandb.init`` per
run); every other rank gets a :class:`NullTracker`, so loops call ``tracker.log`` unguarded.
``wandb`` is imported lazily: with ``kind="none"`` it is never imported (it is slow to import
and starts a service process).
"""
from __future__ import annotations

import json
import math
import netrc
import os
import re
import secrets
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Literal
from urllib.parse import urlsplit

from toolkit.artifacts import (
    CONFIG_FILE, METRICS_CSV, METRICS_FILE, MLFLOW_DB, MLFLOW_DIR, MLFLOW_ID_FILE, SUMMARY_FILE, TENSORBOARD_DIR, WANDB_ID_FILE,
)
from toolkit.files import atomic_write_json, atomic_write_text

__all__ = [
    "NullTracker",
    "Tracker",
    "make_tracker",
    "read_metrics",
    "repair_metrics",
    "wandb_mode",
]

WandbMode = Literal["online", "offline", "disabled"]
_DEFAULT_WANDB_HOST = "https://api.wandb.ai"


# --------------------------------------------------------------------------- W&B mode


def _netrc_has_key(host_url: str) -> bool:
    """True if the netrc file W&B would read holds a password for ``host_url``'s host.

    Mirrors wandb's own lookup order (``$NETRC``, then ``~/.netrc``, then ``~/_netrc``) without
    importing wandb or touching the network.
    """
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    netloc = urlsplit(host_url).netloc or host_url
    for c in candidates:
        path = Path(c).expanduser()
        if not path.is_file():
            continue
        try:
            creds = netrc.netrc(str(path)).authenticators(netloc)
        except (netrc.NetrcParseError, OSError):
            return False  # a broken netrc will not log anyone in; go offline rather than crash
        return bool(creds and creds[2])
    return False


def wandb_mode() -> WandbMode:
    """The W&B mode to run in: an explicit ``WANDB_MODE`` wins; else online only if logged in.

    "Logged in" means ``WANDB_API_KEY`` is set or the netrc file has a key for the W&B host
    (``WANDB_BASE_URL`` or api.wandb.ai). Anyone else gets offline runs they can
    ``wandb sync`` later, instead of an interactive login prompt that hangs a batch job.
    """
    explicit = os.environ.get("WANDB_MODE", "").strip().lower()
    if explicit:
        # wandb also accepts the legacy spellings; normalise them to the three we report.
        aliases = {"dryrun": "offline", "run": "online", "disabled": "disabled", "online": "online", "offline": "offline"}
        if explicit not in aliases:  # includes wandb's "shared", which this toolkit does not use
            raise ValueError(f"WANDB_MODE={explicit!r}: expected online, offline or disabled")
        return aliases[explicit]  # type: ignore[return-value]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = os.environ.get("WANDB_BASE_URL", _DEFAULT_WANDB_HOST)
    return "online" if _netrc_has_key(host) else "offline"


# --------------------------------------------------------------------------- helpers


def _plain(x: Any) -> Any:
    """Config/metric values as YAML/JSON-safe builtins (Paths → str, tuples → lists, 0-d tensors → numbers)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_plain(v) for v in x]
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if hasattr(x, "item") and callable(x.item):  # torch / numpy scalars
        try:
            return x.item()
        except (ValueError, RuntimeError):
            pass  # multi-element tensor: fall through to str
    if hasattr(x, "__dataclass_fields__"):
        import dataclasses

        return _plain(dataclasses.asdict(x))
    return str(x)


def _json_number(x: Any) -> Any:
    # JSON has no NaN/inf; json.dumps would write bare NaN (invalid JSON for other readers).
    v = _plain(x)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan", "inf", "-inf"
    return v


# --------------------------------------------------------------------------- trackers


class NullTracker:
    """Same interface as :class:`Tracker`, does nothing: what non-main ranks get."""

    run_dir: Path | None = None
    enabled = False

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def log_artifact(self, path, *, name: str, type: str, metadata: dict | None = None) -> None:
        pass

    def log_image(self, key: str, png_path, step: int | None = None) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int | None = None) -> None:
        pass

    records = 0  # records in metrics.jsonl (none here)

    def rewind(self, step: int, records: int | None = None) -> None:
        pass

    def finish(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


class Tracker(NullTracker):
    """Local files plus, for ``kind="wandb"``, a W&B run. Create through :func:`make_tracker`."""

    enabled = True

    def __init__(
        self,
        *,
        kind: str,
        run_dir: str | os.PathLike,
        config: dict,
        project: str,
        name: str | None = None,
        group: str | None = None,
        tags: Iterable[str] | None = None,
        job_type: str | None = None,
        resume: bool = False,
    ):
        if kind not in KINDS:
            raise ValueError(f"tracker kind must be one of {', '.join(KINDS)}, got {kind!r}")
        import yaml

        self.kind = kind
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config = _plain(config)  # dicts and dataclasses alike
        if not isinstance(self.config, dict):
            raise TypeError(f"config must be a dict or dataclass, got {type(config).__name__}")
        atomic_write_text(self.run_dir / CONFIG_FILE, yaml.safe_dump(self.config, sort_keys=False))
        # Append, not truncate: a resumed run continues the same metrics file (a torn last line removed).
        repair_metrics(self.run_dir)
        self.records = len(read_metrics(self.run_dir))  # records in the file: a checkpoint notes how many
        self._metrics = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._summary: dict = {}
        self._last_step: int | None = None
        self._run = None
        self.mode: WandbMode | None = None
        if kind == "wandb":
            self.mode = wandb_mode()
            self._run = self._init_wandb(project=project, name=name, group=group, tags=tags, job_type=job_type,
                                         resume=resume)
        self._other = None  # Accelerate's TensorBoardTracker / MLflowTracker
        if kind in ("tensorboard", "mlflow"):
            self._other = self._init_accelerate_tracker(kind, project=project, name=name or job_type or "run", resume=resume)
        if kind == "csv":
            write_metrics_csv(self.run_dir)  # the records so far (a resumed run), then one row per value

    def _init_accelerate_tracker(self, kind: str, *, project: str, name: str, resume: bool):
        """Accelerate's own tracker class for ``kind``, writing under the run folder (offline-first)."""
        module = {"tensorboard": "tensorboard", "mlflow": "mlflow"}[kind]
        try:
            __import__(module)
        except ImportError:
            from toolkit.errors import missing_extra

            raise missing_extra(f"tracker={kind}", module, kind) from None
        from accelerate.tracking import MLflowTracker, TensorBoardTracker

        if kind == "tensorboard":
            tracker = TensorBoardTracker(name, self.run_dir / TENSORBOARD_DIR)
        else:
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):  # offline-first: a store in the run folder
                mlflow.set_tracking_uri(f"sqlite:///{(self.run_dir / MLFLOW_DB).resolve()}")
            id_file = self.run_dir / MLFLOW_ID_FILE
            kept = id_file.read_text(encoding="utf-8", errors="replace").strip() if resume and id_file.is_file() else ""
            run_id = kept if re.fullmatch(r"[0-9a-f]{32}", kept) else None
            tracker = MLflowTracker(experiment_name=project, logging_dir=(self.run_dir / MLFLOW_DIR).resolve().as_uri(),
                                    run_id=run_id, run_name=name)
        tracker.start()
        if kind == "mlflow":
            atomic_write_text(self.run_dir / MLFLOW_ID_FILE, tracker.active_run.info.run_id + "\n")
        flat = {k: v for k, v in _flatten(self.config).items() if isinstance(v, (int, float, str, bool))}
        tracker.store_init_configuration(flat)
        return tracker

    def _run_id(self, resume: bool) -> str:
        """The W&B run id: the one kept in the run folder when resuming, else a new one (then kept)."""
        path = self.run_dir / WANDB_ID_FILE
        if resume and path.is_file():
            kept = path.read_text(encoding="utf-8", errors="replace").strip()
            if RUN_ID.fullmatch(kept):
                return kept
            warnings.warn(f"{path}: not a W&B run id ({kept[:40]!r}); starting a new W&B run", stacklevel=3)
        run_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))  # W&B's own form
        atomic_write_text(path, run_id + "\n")
        return run_id

    def _init_wandb(self, *, project, name, group, tags, job_type, resume=False):
        try:
            import wandb
        except ImportError as e:  # optional at runtime: say what to install
            raise ImportError("tracker kind 'wandb' needs the wandb package: pip install wandb") from e
        settings = wandb.Settings(
            console="off",  # don't capture stdout/stderr into the run; our logs stay ours
            silent=True,  # no banners / sync hints interleaved with progress bars
            reinit="create_new",  # a second Tracker in one process gets its own run, not the old one
        )
        return wandb.init(
            project=project,
            name=name,
            group=group,
            tags=list(tags) if tags else None,
            job_type=job_type,
            dir=str(self.run_dir),  # W&B writes run_dir/wandb/{offline-,}run-*
            mode=self.mode,
            config=self.config,
            settings=settings,
            id=self._run_id(resume),
            resume="allow",  # the same id again (resume=true) continues that run, online or offline
        )

    @property
    def wandb_run(self):
        """The underlying ``wandb.Run`` (``None`` for kind "none")."""
        return self._run

    def log(self, metrics: dict, step: int) -> None:
        """Append ``{"step", "time", **metrics}`` to metrics.jsonl and send ``metrics`` to W&B."""
        step = int(step)
        record = {"step": step, "time": time.time(), **{str(k): _json_number(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()  # so `tail -f` and a crashed run still show every logged step
        self.records += 1
        self._last_step = step
        if self._run is not None:
            self._run.log({k: _plain(v) for k, v in metrics.items()}, step=step)
        numbers = {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        if self._other is not None and numbers:
            self._other.log(numbers, step=step)
        if self.kind == "csv":
            with open(self.run_dir / METRICS_CSV, "a", encoding="utf-8") as f:
                f.writelines(f"{step},{record['time']:.3f},{_csv_key(k)},{v!r}\n" for k, v in numbers.items())

    def summary(self, values: dict) -> None:
        """Merge ``values`` into the run summary (W&B) and rewrite summary.json."""
        values = {str(k): _plain(v) for k, v in values.items()}
        self._summary.update(values)
        atomic_write_json(self.run_dir / SUMMARY_FILE, {k: _json_number(v) for k, v in self._summary.items()})
        if self._run is not None:
            self._run.summary.update(values)

    def log_artifact(self, path, *, name: str, type: str, metadata: dict | None = None) -> None:
        """Version a file or folder as a W&B artifact (offline runs upload it on ``wandb sync``)."""
        if self._run is None:
            return
        import wandb

        path = Path(path)
        art = wandb.Artifact(name=name, type=type, metadata=_plain(metadata) if metadata else None)
        if path.is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
        self._run.log_artifact(art)

    def log_image(self, key: str, png_path, step: int | None = None) -> None:
        """Attach an image to ``step`` (default: the last logged step) in W&B."""
        if self._run is None:
            return
        import wandb

        step = self._last_step if step is None else int(step)
        # Without a step W&B would advance its own counter and later log(step=...) calls
        # with smaller steps would be dropped; pinning it keeps steps monotonic.
        kwargs = {} if step is None else {"step": step}
        self._run.log({key: wandb.Image(str(png_path))}, **kwargs)

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int | None = None) -> None:
        """Log a table (e.g. the report's open-set metrics) to W&B at ``step`` (default: the last logged)."""
        if self._run is None:
            return
        import wandb

        step = self._last_step if step is None else int(step)
        kwargs = {} if step is None else {"step": step}
        self._run.log({key: wandb.Table(columns=list(columns), data=[[_plain(v) for v in row] for row in rows])}, **kwargs)

    def rewind(self, step: int, records: int | None = None) -> None:
        """Resuming from the checkpoint of ``step``: keep the first ``records`` records (as many
        as the file held when that checkpoint was written), or without that count those of
        steps up to ``step``, and drop the rest (the killed run logged them; the resumed one
        logs them again). metrics.jsonl is rewritten atomically."""
        self._metrics.close()
        path = self.run_dir / METRICS_FILE
        rows = read_metrics(self.run_dir)
        if records is not None and 0 <= records <= len(rows):
            kept = rows[:records]
        else:
            kept = [r for r in rows if not isinstance(r.get("step"), int) or r["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.records = len(kept)
        self._metrics = open(path, "a", encoding="utf-8")
        self._last_step = None
        if self.kind == "csv":
            write_metrics_csv(self.run_dir)

    def finish(self, exit_code: int | None = None) -> None:
        """Close metrics.jsonl and finish the W&B run; safe to call twice."""
        if not self._metrics.closed:
            self._metrics.close()
        if self._run is not None:
            run, self._run = self._run, None
            run.finish(exit_code=exit_code)
        if self._other is not None:
            other, self._other = self._other, None
            other.finish()

    def __exit__(self, exc_type, exc, tb) -> None:
        # Mark the W&B run failed when the block raised, so crashed runs are visible in the UI.
        self.finish(exit_code=1 if exc_type is not None else None)


KINDS = ("wandb", "tensorboard", "mlflow", "csv", "none")
CSV_HEADER = "step,time,key,value\n"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _csv_key(key: str) -> str:
    return '"' + key.replace('"', '""') + '"' if any(c in key for c in ',"\n') else key


def write_metrics_csv(run_dir: str | os.PathLike) -> None:
    """metrics.csv from metrics.jsonl: one step,time,key,value row per finite number (atomic)."""
    rows = [CSV_HEADER]
    for r in read_metrics(run_dir):
        step, t = r.get("step"), r.get("time", 0.0)
        for k, v in r.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                rows.append(f"{step},{float(t):.3f},{_csv_key(k)},{v!r}\n")
    atomic_write_text(Path(run_dir) / METRICS_CSV, "".join(rows))


RUN_ID = re.compile(r"[a-z0-9]{1,64}")  # a W&B run id (a kept one is untrusted input)


def repair_metrics(run_dir: str | os.PathLike) -> bool:
    """Cut a torn last line (no newline: the run was killed mid-write) off ``run_dir/metrics.jsonl``.

    Appending after it would glue the next record to it, one unreadable line in the middle.
    Returns True when something was cut."""
    path = Path(run_dir) / METRICS_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    if not data or data.endswith(b"\n"):
        return False
    atomic_write_text(path, data[: data.rfind(b"\n") + 1].decode("utf-8", errors="replace"))
    return True


def make_tracker(
    *,
    enabled: bool,
    kind: str,
    run_dir: str | os.PathLike,
    config: dict,
    project: str,
    name: str | None = None,
    group: str | None = None,
    tags: Iterable[str] | None = None,
    job_type: str | None = None,
    resume: bool = False,
) -> Tracker | NullTracker:
    """A real :class:`Tracker` when ``enabled`` (pass ``accelerator.is_main_process``), else a :class:`NullTracker`."""
    if not enabled:
        return NullTracker()
    return Tracker(
        kind=kind, run_dir=run_dir, config=config, project=project, name=name, group=group, tags=tags, job_type=job_type,
        resume=resume,
    )


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Parse ``run_dir/metrics.jsonl``; a torn last line (run killed mid-write) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # only the final line may be partial; anything earlier is real corruption
            raise ValueError(f"{path}:{i + 1}: not valid JSON: {line[:80]!r}") from None
    return rows

