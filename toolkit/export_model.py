"""``toolkit export-model``: a trained embedder (and head) as files a service can load without the toolkit.

    toolkit export-model RUN --out DIR --format onnx|torchscript|safetensors [--step N]

The exported graph takes what the shards hold: uint8 images ``(N, C, H, W)`` at the
shard-time size, and does the rest itself (to float, ``(x / 255 - 0.5) / 0.5``, bilinear
resize to the model's input size, the network, L2 normalisation), so a service only decodes
and resizes as ``toolkit shard`` did (``preprocess`` in ``model.json``). Files in DIR:

    model.json                 what the files are: format, inputs and outputs, preprocessing,
                               classes, the run they came from, sha256 of each file
    embedder.onnx | embedder.pt (TorchScript) | embedder.safetensors (weights only)
    head.onnx | head.pt | head.safetensors     when RUN is a classifier run: embeddings -> log-probabilities

``--step N`` exports training checkpoint N's weights instead of the best embedder (so
checkpoint weights can be written as safetensors too). ONNX export needs the ``onnx`` package (``pip install "toolkit[export]"`` installs it
with onnxruntime, which checks it); safetensors needs ``safetensors``. The folder is written
beside DIR and moved into place when complete; ``--overwrite`` replaces only a folder this
command wrote.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from toolkit.artifacts import Run, build_frozen_embedder, open_run
from toolkit.errors import ConfigError, DataError, missing_extra
from toolkit.files import (
    OwnedFolder, atomic_write_json, check_replaceable, json_kind_is, move_into_place, new_temp_folder, sha256_file,
)

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
MANIFEST = "model.json"
KIND = "toolkit-exported-model"
EXPORT_FILES = {MANIFEST} | {f"{part}{ext}" for part in ("embedder", "head") for ext in FORMATS.values()}
OPSET = 17


EXPORT_FOLDER = OwnedFolder(
    what="an exported-model folder",
    writer="`toolkit export-model`",
    marker=MANIFEST,
    is_marker=json_kind_is(KIND),
    owns=lambda name: name in EXPORT_FILES,
    writing="the model was being exported",
    previous="the previous export",
)


class ImagesToEmbeddings(torch.nn.Module):
    """uint8 images (N, C, H, W) -> L2-normalised embeddings (N, D): the model plus its input transform."""

    def __init__(self, embedder: torch.nn.Module, input_size: int):
        super().__init__()
        self.embedder, self.input_size = embedder, int(input_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from toolkit.data.transforms import to_model_input

        return self.embedder(to_model_input(images, input_size=self.input_size))


def _need(module: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise missing_extra("--format", module, extra) from None


def _write(module: torch.nn.Module, example: torch.Tensor, path: Path, fmt: str, *, input_name: str, output_name: str) -> None:
    if fmt == "safetensors":
        _need("safetensors", "export")
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about shape checks: the shape is fixed by the export
        if fmt == "torchscript":
            torch.jit.trace(module, (example,), check_trace=False).save(str(path))
            return
        _need("onnx", "export")
        torch.onnx.export(
            module, (example,), str(path), input_names=[input_name], output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, opset_version=OPSET, dynamo=False,
        )


def checkpoint_run(run_dir: str | Path, step: int) -> Run:
    """The embedder of training checkpoint ``step`` of the embedding run ``run_dir``, as a :class:`Run`.

    Weights and config come from ``checkpoints/step-*.pt`` (loaded like every model file: no
    pickle code, size-checked); the class names from the run's best_embedder.pt, else from the
    shards the config names (a local folder only). A checkpoint has no kNN index and no metrics.
    """
    from toolkit.artifacts import CHECKPOINTS_DIR, EMBEDDER_FILE, EmbedderArtifact, load_artifact, recorded_shards
    from toolkit.checkpoint import CheckpointManager
    from toolkit.files import safe_load

    run_dir = Path(run_dir)
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ConfigError(f"--step must be a checkpoint's step number (>= 1), got {step!r}")
    if not run_dir.is_dir():
        raise DataError(f"--step needs an embedding run folder, got {run_dir}")
    ckpts = CheckpointManager(run_dir / CHECKPOINTS_DIR)
    path = ckpts.directory / ckpts.filename(step)
    if not path.is_file():
        steps = [s for s, _ in ckpts.step_files()]
        raise DataError(f"{run_dir}: no checkpoint of step {step} (checkpoints: {', '.join(map(str, steps)) or 'none'})")
    saved = safe_load(path)
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise DataError(f"{path}: not a toolkit training checkpoint (no config inside)")
    best = run_dir / EMBEDDER_FILE
    if best.is_file():
        classes = load_artifact(best).classes
    else:
        from toolkit.data.shards import read_info

        classes = read_info(recorded_shards(saved["config"], path)).classes
    payload = {"model": saved.get("model"), "config": saved["config"], "classes": list(classes), "step": step}
    return Run(embedder_path=path, embedder=EmbedderArtifact.from_payload(payload, path))


def export_model(run: str | Path | Run, out: str | Path, *, format: str = "onnx", overwrite: bool = False,
                 shards: str | Path | None = None, step: int = 0) -> dict:
    """Write RUN's embedder (and head) to ``out`` in ``format``; returns the manifest (model.json).

    ``step`` (an embedding run folder only): the weights of that training checkpoint instead
    of the best embedder."""
    from toolkit.inference import preprocess_params

    fmt = str(format).lower()
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    out = Path(out)
    check_replaceable(out, EXPORT_FOLDER, overwrite=overwrite)  # before any work
    if fmt == "onnx":
        _need("onnx", "export")
    run = checkpoint_run(run, step) if step else open_run(run)
    saved = run.embedder
    pre = preprocess_params(run, shards)
    model = build_frozen_embedder(saved, "cpu")
    input_size = int(saved.config["input_size"])
    side = int(pre.get("image_size") or input_size)
    channels = 1 if pre.get("grayscale", True) else 3
    example = torch.zeros((2, channels, side, side), dtype=torch.uint8)
    wrapped = ImagesToEmbeddings(model, input_size).eval()
    ext = FORMATS[fmt]
    files = {"embedder": f"embedder{ext}"}
    tmp = new_temp_folder(out)
    try:
        _write(wrapped if fmt != "safetensors" else model, example, tmp / files["embedder"], fmt,
               input_name="images", output_name="embeddings")
        head_info = None
        if run.head is not None:
            from toolkit.artifacts import load_head

            head, _ = load_head(run, "cpu")
            head = head.eval()
            files["head"] = f"head{ext}"
            dim = int(run.head.embedding_dim)
            _write(head, torch.zeros((2, dim)), tmp / files["head"], fmt, input_name="embeddings", output_name="log_probs")
            head_info = {"input": {"name": "embeddings", "dtype": "float32", "shape": ["N", dim]},
                         "output": {"name": "log_probs", "dtype": "float32", "shape": ["N", len(run.head.classes)]},
                         "classes": list(run.head.classes)}
        manifest = {
            "kind": KIND,
            "format": fmt,
            "files": {part: {"file": name, "sha256": sha256_file(tmp / name)} for part, name in files.items()},
            "embedder": {
                "input": {"name": "images", "dtype": "uint8", "shape": ["N", channels, side, side]},
                "output": {"name": "embeddings", "dtype": "float32", "shape": ["N", int(saved.config["embedding_dim"])],
                           "l2_normalised": True},
                "inside_the_graph": f"x / 255, (x - 0.5) / 0.5, bilinear resize to {input_size}x{input_size}, the network",
                "arch": saved.config["arch"], "input_size": input_size, "step": saved.step,
            } if fmt != "safetensors" else {
                "weights_of": "toolkit.models.build_embedder(arch, in_channels, input_size, embedding_dim)",
                "arch": saved.config["arch"], "in_channels": channels, "input_size": input_size,
                "embedding_dim": int(saved.config["embedding_dim"]), "step": saved.step,
            },
            "head": head_info,
            "preprocess": {"image_size": pre.get("image_size"), "grayscale": bool(pre.get("grayscale", True)),
                           "how": "what `toolkit shard` does to an image file before the graph (toolkit.data.shards.preprocess_image)"},
            "classes": list(saved.classes),
            "source": str(run.head_path or run.embedder_path),
            "opset": OPSET if fmt == "onnx" else None,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        move_into_place(tmp, out, EXPORT_FOLDER, overwrite=overwrite)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def check_onnx_parity(out: str | Path, images: torch.Tensor, reference: torch.Tensor) -> float:
    """Max abs difference between ONNX Runtime's embeddings of ``images`` and ``reference``."""
    ort = _need("onnxruntime", "export")
    meta = json.loads((Path(out) / MANIFEST).read_text())
    if meta.get("kind") != KIND or meta.get("format") != "onnx":
        raise DataError(f"{out}: not an ONNX export of `toolkit export-model`")
    session = ort.InferenceSession(str(Path(out) / meta["files"]["embedder"]["file"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})[0]
    return float((torch.from_numpy(got) - reference.float()).abs().max())
