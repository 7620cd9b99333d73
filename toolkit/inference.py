"""Use a trained run: load its models, evaluate a split, predict image files, export embeddings.

A *run* is any of:

* an embedding run folder (holds ``best_embedder.pt``) or that file itself;
* a classifier run folder (holds ``best_head.pt``) or that file: the head records the
  absolute path of the embedder it was trained on, so ``method="knn"`` works from it too.

Images are prepared exactly as in training: the shard-time preprocessing
(:func:`toolkit.data.shards.load_and_preprocess` with the shards' ``preprocess`` params)
then :func:`toolkit.data.transforms.to_model_input`. kNN votes against the embedder's saved
reference index (the train split's embeddings, stored in ``best_embedder.pt``): majority of
the k = 13 nearest, ties to the smallest class index (as scikit-learn's
``KNeighborsClassifier``), confidence = the winner's vote share.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.checkpoint import CheckpointError, safe_load
from toolkit.data.folder import DataError
from toolkit.data.location import from_file_message, is_local_location
from toolkit.data.shards import load_and_preprocess, read_info
from toolkit.data.transforms import to_model_input
from toolkit.models import build_embedder, build_head

__all__ = [
    "EMBEDDER_FILE",
    "HEAD_FILE",
    "Run",
    "SplitResult",
    "build_frozen_embedder",
    "check_classes",
    "evaluate",
    "export",
    "export_paths",
    "knn_predict",
    "load_embedder",
    "load_head",
    "open_run",
    "per_class_accuracy",
    "predict",
    "preprocess_params",
    "run_split",
    "split_metrics",
]

EMBEDDER_FILE = "best_embedder.pt"
HEAD_FILE = "best_head.pt"


# --------------------------------------------------------------------------- locating runs


@dataclass
class Run:
    """The saved payloads of a run (CPU tensors), and where they came from."""

    embedder_path: Path
    embedder: dict  # best_embedder.pt: model, config, classes, metrics, step, index
    head_path: Path | None = None
    head: dict | None = None  # best_head.pt: head, config, classes, metrics, embedder, ...

    @property
    def classes(self) -> list[str]:
        return list(self.embedder["classes"])

    @property
    def has_index(self) -> bool:
        return "index" in self.embedder


def _load(path: Path) -> dict:
    try:
        payload = safe_load(path)
    except CheckpointError as exc:  # one-line error type the CLI already reports cleanly
        raise DataError(str(exc)) from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
        raise DataError(f"{path}: not a toolkit model file (no config inside)")
    # weights_only vouches for the types, not for the content: check what the code relies on.
    expected = {"classes": list, "model": dict} if payload.get("kind") != "head" else {"classes": list, "head": dict, "embedder": str}
    for key, typ in expected.items():
        if not isinstance(payload.get(key), typ):
            raise DataError(f"{path}: not a toolkit model file ({key!r} is missing or not a {typ.__name__})")
    if not all(isinstance(c, str) for c in payload["classes"]):
        raise DataError(f"{path}: not a toolkit model file (class names are not all strings)")
    return payload


def recorded_shards(payload: dict, source: str | Path) -> str:
    """The shard folder a saved model (``source``) says it was trained on, if it is a local path.

    A model file is data: a location it records is never opened when it is a URL or a
    ``pipe:`` command (that would run whatever the file's author wrote); the user must then
    name the shards themselves.
    """
    location = payload["config"].get("shards")
    if not is_local_location(location):
        raise DataError(from_file_message(location, source))
    return location


def open_run(run: str | Path) -> Run:
    """Find and load the payloads of ``run`` (see the module docstring for what a run is)."""
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
    payload = _load(p)
    if payload.get("kind") != "head":
        return Run(embedder_path=p, embedder=payload)
    emb_path = Path(payload["embedder"])
    if not emb_path.is_file():
        raise DataError(f"{p}: the embedder it was trained on is gone: {emb_path}")
    return Run(embedder_path=emb_path, embedder=_load(emb_path), head_path=p, head=payload)


def _as_run(run) -> Run:
    return run if isinstance(run, Run) else open_run(run)


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------- models


def _in_channels(state: dict) -> int:
    # The first 4-D weight is the stem conv, (64, C, k, k), for ZFNet and the ResNets alike;
    # reading it keeps loading independent of the shard folder still being around.
    return int(next(v for v in state.values() if v.ndim == 4).shape[1])


def build_frozen_embedder(payload: dict, device) -> torch.nn.Module:
    """Rebuild the embedder of a ``best_embedder.pt`` payload: eval mode, no gradients."""
    cfg = payload["config"]
    model = build_embedder(
        arch=cfg["arch"], in_channels=_in_channels(payload["model"]), input_size=cfg["input_size"],
        embedding_dim=cfg["embedding_dim"],
    )
    model.load_state_dict(payload["model"])
    model.requires_grad_(False)
    return model.to(_device(device)).eval()  # eval: BatchNorm uses (and never updates) running stats


def load_embedder(path_or_run_dir: str | Path, device=None) -> tuple[torch.nn.Module, dict]:
    """Load a saved embedder -> (model in eval mode with requires_grad False, payload).

    Accepts an embedding run folder, a ``best_embedder.pt``, or a classifier run / its
    ``best_head.pt`` (then the embedder the head was trained on).
    """
    run = _as_run(path_or_run_dir)
    return build_frozen_embedder(run.embedder, device), run.embedder


def load_head(path_or_run_dir: str | Path, device=None) -> tuple[torch.nn.Module, dict]:
    """Load a saved classifier head -> (head in eval mode, ``best_head.pt`` payload)."""
    run = _as_run(path_or_run_dir)
    if run.head is None:
        raise DataError(
            f"{run.embedder_path} is an embedder without a classifier head: train one with "
            f"launch/classify.py embedder={run.embedder_path}, or use method=knn"
        )
    cfg = run.head["config"]
    head = build_head(
        embedding_dim=int(run.head["embedding_dim"]), hidden=cfg["hidden"],
        num_classes=len(run.head["classes"]), dropout=cfg["dropout"],
    )
    head.load_state_dict(run.head["head"])
    head.requires_grad_(False)
    return head.to(_device(device)).eval(), run.head


# --------------------------------------------------------------------------- checks, kNN


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


def knn_predict(
    ref: torch.Tensor, ref_labels: torch.Tensor, queries: torch.Tensor, *, k: int, num_classes: int, block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Majority vote of the ``k`` nearest references (Euclidean) -> (pred (Q,), vote share (Q,)), on the CPU.

    ``ref`` (N, D), ``ref_labels`` (N,) class indices, ``queries`` (Q, D). The work is
    :func:`toolkit.knn.knn_predict` (exact, scikit-learn's tie rules: the smallest class wins
    a vote tie); ``num_classes`` is accepted for the callers' convenience and not needed.
    """
    from toolkit.knn import knn_predict as exact_knn

    if queries.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    k = min(k, ref.shape[0])
    pred, votes = exact_knn(ref.float(), ref_labels.long().to(ref.device), queries.float().to(ref.device), k=k, block=block)
    return pred.cpu(), (votes.float() / k).cpu()


# --------------------------------------------------------------------------- splits


@dataclass
class SplitResult:
    """Everything computed on one split; what evaluate, export and the report summarise."""

    shards: str
    split: str
    classes: list[str]
    keys: list[str]
    embeddings: torch.Tensor  # (N, D) float32, unit rows
    labels: torch.Tensor  # (N,) long
    k: int
    knn_reference: str | None = None  # where the kNN votes come from
    knn_pred: torch.Tensor | None = None  # (N,) long
    knn_share: torch.Tensor | None = None  # (N,) vote share of the winner
    head_logp: torch.Tensor | None = None  # (N, C) log-probabilities

    @property
    def head_pred(self) -> torch.Tensor | None:
        return None if self.head_logp is None else self.head_logp.argmax(1)


def _resolve_method(run: Run, method: str | None) -> str:
    if method is None:
        return "both" if run.head is not None else "knn"
    if method not in ("knn", "head", "both", "none"):
        raise DataError(f"method must be knn, head or both, got {method!r}")
    return method


def run_split(
    run,
    shards: str | Path | None = None,
    split: str = "val",
    method: str | None = None,
    *,
    k: int | None = None,
    reference: Literal["auto", "index", "train"] = "auto",
    device=None,
    batch_size: int = 512,
    num_workers: int = 0,
) -> SplitResult:
    """Embed ``split`` of ``shards`` (default: the embedder's) and score it with kNN and/or the head.

    ``method=None`` means both when the run has a head, else kNN; ``"none"`` only embeds.
    ``reference``: kNN votes against the saved index (``"index"``), the train split of
    ``shards`` re-embedded (``"train"``), or the index when there is one (``"auto"``).
    """
    from toolkit.engine.validate import embed_split

    run = _as_run(run)
    method = _resolve_method(run, method)
    if not shards:  # the folder the model was trained on, when it is a plain local path
        saved, path = (run.head, run.head_path) if run.head is not None else (run.embedder, run.embedder_path)
        shards = recorded_shards(saved, path)
    shards = str(shards)
    info = read_info(shards)
    check_classes(info["classes"], run.classes, shards=shards)
    dev = _device(device)
    model = build_frozen_embedder(run.embedder, dev)
    input_size = run.embedder["config"]["input_size"]

    def embed(which: str):
        # eval-mode streaming, each sample once, sorted by key below
        keys, emb, labels = embed_split(
            model, shards=shards, split=which, rank=0, world_size=1, device=dev,
            input_size=input_size, batch_size=batch_size, num_workers=num_workers,
        )
        order = np.argsort(np.asarray(keys))
        idx = torch.from_numpy(order)
        return [keys[i] for i in order], emb[idx], labels[idx]

    keys, emb, labels = embed(split)  # (N,), (N, D), (N,)
    k = int(k or run.embedder["config"].get("knn_k", 13))
    result = SplitResult(shards=shards, split=split, classes=run.classes, keys=keys, embeddings=emb, labels=labels, k=k)
    if method in ("knn", "both"):
        if reference == "index" and not run.has_index:
            raise DataError(f"{run.embedder_path} holds no reference index: use reference=train")
        if reference == "train" or not run.has_index:
            _, ref, ref_y = embed("train")
            result.knn_reference = f"train split of {shards} ({len(ref_y)} images, re-embedded)"
        else:
            ref, ref_y = run.embedder["index"]["embeddings"].float(), run.embedder["index"]["labels"].long()
            result.knn_reference = f"saved index of {run.embedder_path.name} ({len(ref_y)} train embeddings)"
        result.knn_pred, result.knn_share = knn_predict(ref.to(dev), ref_y, emb.to(dev), k=k, num_classes=len(run.classes))
    if method in ("head", "both"):
        head, _ = load_head(run, dev)
        with torch.no_grad():
            chunks = [head(emb[s : s + 4096].to(dev)).cpu() for s in range(0, len(emb), 4096)]  # (b, C) each
        result.head_logp = torch.cat(chunks) if chunks else torch.zeros(0, len(run.classes))
    return result


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, float | None]:
    """{class name: accuracy on its samples} (None for a class absent from the split)."""
    out: dict[str, float | None] = {}
    for i, name in enumerate(classes):
        mask = labels == i
        out[name] = float((pred[mask] == i).float().mean()) if mask.any() else None
    return out


def split_metrics(result: SplitResult) -> dict:
    """Plain-number metrics of a :class:`SplitResult` (JSON-ready)."""
    m: dict = {"shards": result.shards, "split": result.split, "num_samples": len(result.keys), "num_classes": len(result.classes)}
    y = result.labels
    if result.knn_pred is not None:
        m["knn_k"] = result.k
        m["knn_reference"] = result.knn_reference
        m["knn_accuracy"] = float((result.knn_pred == y).float().mean())
        m["knn_per_class"] = per_class_accuracy(result.knn_pred, y, result.classes)
    if result.head_logp is not None:
        m["head_accuracy"] = float((result.head_pred == y).float().mean())
        m["head_loss"] = float(F.nll_loss(result.head_logp, y)) if len(y) else float("nan")
        m["head_per_class"] = per_class_accuracy(result.head_pred, y, result.classes)
    return m


def evaluate(run, shards: str | Path | None = None, split: str = "val", method: str | None = None, **options) -> dict:
    """Accuracy of kNN and/or the head on ``split`` of ``shards`` -> metrics dict.

    Takes :func:`run_split`'s arguments (``k``, ``reference``, ``device``, ``batch_size``,
    ``num_workers`` as keywords).
    Keys: shards, split, num_samples, num_classes; knn_k, knn_reference, knn_accuracy,
    knn_per_class (with kNN); head_accuracy, head_loss (NLL), head_per_class (with a head).
    Raises DataError naming the difference when the shards' classes are not the model's.
    """
    return split_metrics(run_split(run, shards, split, method, **options))


# --------------------------------------------------------------------------- predict


def preprocess_params(run: Run, shards: str | Path | None = None) -> dict:
    """The shard-time preprocessing (image_size, grayscale) images must get before the model."""
    if shards is not None:
        return _checked_preprocess(read_info(shards)["preprocess"], shards)
    for payload, path in ((run.head, run.head_path), (run.embedder, run.embedder_path)):
        if payload is not None and "preprocess" in payload:
            return _checked_preprocess(payload["preprocess"], path)
    try:
        trained_on = recorded_shards(run.embedder, run.embedder_path)
        return _checked_preprocess(read_info(trained_on)["preprocess"], trained_on)
    except DataError as exc:
        raise DataError(
            f"cannot tell how to preprocess images: {exc}; pass shards=<the shard folder the embedder was trained on>"
        ) from None


MAX_IMAGE_SIZE = 4096  # a recorded resize target beyond this is not one `toolkit shard` wrote


def _checked_preprocess(pre, source) -> dict:
    """Refuse preprocessing parameters no shard writer produces (read from a file: untrusted)."""
    size = pre.get("image_size") if isinstance(pre, dict) else "missing"
    ok = isinstance(pre, dict) and isinstance(pre.get("grayscale", True), bool) and (
        size is None or (isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= MAX_IMAGE_SIZE)
    )
    if not ok:
        raise DataError(f"{source}: bad preprocessing record {str(pre)[:120]!r} (image_size must be empty or 1..{MAX_IMAGE_SIZE}, grayscale true/false)")
    return pre


def _read_image(path: str, pre: dict) -> torch.Tensor:
    img = load_and_preprocess(path, image_size=pre.get("image_size"), grayscale=pre.get("grayscale", True))
    arr = np.array(img)  # (H, W) or (H, W, 3) uint8, as decode_sample reads the shard PNG
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (C, H, W) uint8


def predict(
    run,
    images: Sequence[str | Path],
    method: Literal["knn", "head"] = "knn",
    *,
    k: int | None = None,
    shards: str | Path | None = None,
    device=None,
    batch_size: int = 256,
) -> list[dict]:
    """Classify image files -> one dict per input, in order.

    ``{"path", "label", "confidence"}`` (kNN: vote share of the k = 13 nearest saved train
    embeddings; head: softmax probability), or ``{"path", "error"}`` for a missing or
    unreadable file -- the other files still get answers.
    """
    if method not in ("knn", "head"):
        raise DataError(f"method must be knn or head, got {method!r}")
    run = _as_run(run)
    dev = _device(device)
    if method == "knn" and not run.has_index:
        raise DataError(f"{run.embedder_path} holds no reference index for kNN; use method=head")
    pre = preprocess_params(run, shards)
    model = build_frozen_embedder(run.embedder, dev)
    input_size = run.embedder["config"]["input_size"]
    head = load_head(run, dev)[0] if method == "head" else None
    if method == "knn":
        ref = run.embedder["index"]["embeddings"].float().to(dev)  # (N, D) saved train embeddings
        ref_y = run.embedder["index"]["labels"]  # (N,)
        k = int(k or run.embedder["config"].get("knn_k", 13))

    out: list[dict] = [{"path": str(p)} for p in images]
    good: list[tuple[int, torch.Tensor]] = []
    for i, p in enumerate(images):
        if not Path(p).is_file():
            out[i]["error"] = "no such file"
            continue
        try:
            good.append((i, _read_image(str(p), pre)))
        except Exception as exc:  # noqa: BLE001 - any decode failure is reported for this file only
            out[i]["error"] = f"not a readable image ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    classes = run.classes
    for s in range(0, len(good), batch_size):
        chunk = good[s : s + batch_size]
        # per image: originals kept at shard time (image_size None) may differ in size
        x = torch.cat([to_model_input(t[None].to(dev), input_size=input_size) for _, t in chunk])  # (b, C, S, S)
        with torch.no_grad():
            emb = model(x)  # (b, D)
            if head is not None:
                conf, pred = head(emb).exp().max(1)  # softmax probability of the top class
            else:
                pred, conf = knn_predict(ref, ref_y, emb, k=k, num_classes=len(classes))  # vote share
        for (i, _), p, c in zip(chunk, pred.tolist(), conf.tolist()):
            out[i].update(label=classes[p], confidence=float(c))
    return out


# --------------------------------------------------------------------------- export


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def export_paths(out: str | Path) -> dict[str, Path]:
    """Files :func:`export` writes for ``out``: the table (.csv, or .parquet) and three .npy.

    A ``.csv``/``.parquet`` suffix picks the table format; without one, parquet when pyarrow
    is installed, else CSV. The arrays sit next to it: ``<stem>.keys.npy``,
    ``<stem>.labels.npy``, ``<stem>.embeddings.npy``.
    """
    out = Path(out)
    if out.suffix not in (".csv", ".parquet"):
        out = out.with_name(out.name + (".parquet" if _has_pyarrow() else ".csv"))
    stem = out.with_suffix("")
    return {
        "table": out,
        "keys": stem.with_name(stem.name + ".keys.npy"),
        "labels": stem.with_name(stem.name + ".labels.npy"),
        "embeddings": stem.with_name(stem.name + ".embeddings.npy"),
    }


def export(
    run,
    shards: str | Path | None,
    out: str | Path,
    split: str = "val",
    *,
    device=None,
    batch_size: int = 512,
    num_workers: int = 0,
) -> int:
    """Write the embeddings of ``split`` with keys and labels; return the number of rows.

    Files: see :func:`export_paths`. The table has columns key, label (class index), class,
    path (original relative path, when the shard folder has manifest.csv), e000 ... e127.
    Rows are sorted by key; the .npy files hold the same rows in the same order.
    """
    import pandas as pd

    paths = export_paths(out)
    if paths["table"].suffix == ".parquet" and not _has_pyarrow():
        raise DataError("writing parquet needs pyarrow: pip install pyarrow (or export to a .csv file)")
    result = run_split(run, shards, split, "none", device=device, batch_size=batch_size, num_workers=num_workers)
    emb = result.embeddings.numpy().astype(np.float32)  # (N, D)
    labels = result.labels.numpy().astype(np.int64)  # (N,)
    table = pd.DataFrame({"key": result.keys, "label": labels, "class": [result.classes[i] for i in labels]})
    manifest = Path(result.shards) / "manifest.csv"
    if manifest.is_file():
        paths_by_key = pd.read_csv(manifest, usecols=["key", "path"]).set_index("key")["path"]
        table["path"] = table["key"].map(paths_by_key)
    width = max(3, len(str(emb.shape[1] - 1)))
    table = pd.concat([table, pd.DataFrame(emb, columns=[f"e{j:0{width}d}" for j in range(emb.shape[1])])], axis=1)

    paths["table"].parent.mkdir(parents=True, exist_ok=True)
    np.save(paths["keys"], np.asarray(result.keys, dtype=str))  # unicode array: loads without allow_pickle
    np.save(paths["labels"], labels)
    np.save(paths["embeddings"], emb)
    if paths["table"].suffix == ".parquet":
        table.to_parquet(paths["table"], index=False)
    else:
        table.to_csv(paths["table"], index=False)
    return len(table)
