"""Shared helpers of the classifier, inference and report tests.

A tiny separable image folder (4 classes: which half of the image is bright), its shards, an
embedder file in the embed stage's format and a classifier run on it -- each built once per
test session and cached here, so the three test modules share them (tests only read them).
"""
from __future__ import annotations

import contextlib
import io
import runpy
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("down", "left", "right", "up")


def make_separable_folder(root: str | Path, *, per_class: int = 24, side: int = 16, noise: float = 20.0, seed: int = 0, classes=CLASSES) -> Path:
    """``root/<class>/img_<i>.png``: grey images whose bright half (up/down/left/right) is the class.

    Noise and brightness jitter make every image different; the halves keep classes far apart.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    half = side // 2
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.normal(50, noise, size=(side, side))
            bright = rng.uniform(170, 230)
            region = {"up": (slice(0, half), slice(None)), "down": (slice(half, None), slice(None)),
                      "left": (slice(None), slice(0, half)), "right": (slice(None), slice(half, None))}.get(name)
            if region is None:  # extra classes: a centred square
                region = (slice(half // 2, half // 2 + half), slice(half // 2, half // 2 + half))
            arr[region] += bright - 50
            Image.fromarray(arr.clip(0, 255).astype(np.uint8), mode="L").save(root / name / f"img_{i:03d}.png")
    return root


def shard(src: Path, out: Path, *, image_size: int = 16, val_fraction: float = 0.25) -> Path:
    from toolkit.data.shards import write_shards

    write_shards(src, out, val_fraction=val_fraction, image_size=image_size, workers=1, progress=False)
    return out


def run_launch(name: str, argv: list[str]) -> tuple[int, str]:
    """Run launch/NAME.py's main in this process (one process, as ``toolkit demo`` does) -> (rc, stdout)."""
    module = runpy.run_path(str(ROOT / "launch" / f"{name}.py"), run_name=f"test_launch_{name}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = module["main"](argv)
    return rc, out.getvalue()


_CACHE: dict[str, object] = {}


def shared_embed_run(tmp_path_factory) -> dict[str, Path]:
    """One tiny folder, its shards and an embedder, built once per test session (read-only for tests)."""
    if "embed" not in _CACHE:
        tmp = tmp_path_factory.mktemp("classify-shared")
        images = make_separable_folder(tmp / "images")
        shards = shard(images, tmp / "shards")
        make_embedder_file(shards, tmp / "embed")
        _CACHE["embed"] = {"tmp": tmp, "images": images, "shards": shards, "embed": tmp / "embed"}
    return _CACHE["embed"]  # type: ignore[return-value]


def shared_classify_run(tmp_path_factory) -> Path:
    """A classifier run on :func:`shared_embed_run` via launch/classify.py (one process, report included)."""
    if "classify" not in _CACHE:
        base = shared_embed_run(tmp_path_factory)
        run_dir = base["tmp"] / "classify"
        rc, out = run_launch("classify", [
            f"embedder={base['embed']}", f"run_dir={run_dir}", "epochs=8", "batch_size=16",
            "num_workers=0", "tracker=none", "progress=false",
        ])
        assert rc == 0, out
        _CACHE["classify"] = run_dir
    return _CACHE["classify"]  # type: ignore[return-value]


def make_embedder_file(shards: Path, run_dir: Path, *, input_size: int = 16, embedding_dim: int = 32, train_steps: int = 10, seed: int = 0) -> Path:
    """A best_embedder.pt in the embed stage's own format (``EmbedderArtifact``), without a run.

    A ZFNet trained for a few full-batch steps through a throw-away linear probe (seconds, where
    even a tiny triplet run takes half a minute on a busy CPU), its BatchNorm running
    statistics set from the train split (non-default values, so a test can tell if they move),
    the train-split reference index, and a small metrics.jsonl for the report's curves.
    """
    import json

    import torch

    from toolkit.config import EmbedConfig
    from toolkit.data.shards import read_info
    from toolkit.data.stream import ShardStream, make_loader
    from toolkit.data.transforms import to_model_input
    from toolkit.artifacts import EmbedderArtifact
    from toolkit.evaluation import embed_split
    from toolkit.models import build_embedder

    torch.manual_seed(seed)
    classes = read_info(shards).classes
    model = build_embedder(arch="zfnet", in_channels=1, input_size=input_size, embedding_dim=embedding_dim)
    stream = ShardStream(shards, split="train", mode="eval", batch_size=512)
    _, images, labels = next(iter(make_loader(stream, num_workers=0)))  # the whole (tiny) train split
    x = to_model_input(images, input_size=input_size)  # (N, 1, S, S)
    # A few full-batch steps through a throw-away linear probe pull the classes apart: a
    # stand-in for the triplet stage, seconds instead of a run.
    probe = torch.nn.Linear(embedding_dim, len(classes))
    opt = torch.optim.Adam([*model.parameters(), *probe.parameters()], lr=1e-3)
    model.train()
    for _ in range(train_steps):
        loss = torch.nn.functional.cross_entropy(probe(model(x)) * 10, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Calibrate BatchNorm on the train split: cumulative averages (momentum None) give exact
    # statistics; with the default momentum a few batches leave them far from the data's, and
    # eval-mode embeddings then collapse onto one direction.
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        model(x)  # train mode: running stats = this batch's exact statistics
    for bn in bns:
        bn.momentum = 0.1
    model.eval()
    _, emb, labels = embed_split(model, shards=str(shards), split="train", rank=0, world_size=1, device=torch.device("cpu"),
                                 input_size=input_size, num_workers=0)
    cfg = EmbedConfig(shards=str(shards), input_size=input_size, embedding_dim=embedding_dim, run_dir=str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "best_embedder.pt"
    from dataclasses import asdict

    saved = EmbedderArtifact.from_model(model, config=asdict(cfg), classes=classes, metrics={"val/knn_accuracy": 1.0}, step=8, index=(emb, labels))
    torch.save(saved.to_payload(), path)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, 9):
            f.write(json.dumps({"step": step, "train/loss": 0.2 / step, "epoch": (step - 1) // 4}) + "\n")
            if step % 4 == 0:
                f.write(json.dumps({"step": step, "val/knn_accuracy": 0.9 + step / 100, "epoch": step // 4}) + "\n")
    return path
