"""`toolkit export-model`: ONNX, TorchScript and safetensors files a service can load without the toolkit.

What a user notices: ONNX Runtime gives the same embeddings as the toolkit (max abs
difference <= 1e-4) from uint8 images at the shard-time size; the head comes along for a
classifier run; model.json says what goes in and out and the files' sha256; a folder it did
not write is never replaced.
"""
from __future__ import annotations

import json

import pytest
import torch

from classify_helpers import shared_classify_run, shared_embed_run
from toolkit.artifacts import load_embedder, load_head
from toolkit.data.stream import ShardStream, make_loader
from toolkit.data.transforms import to_model_input
from toolkit.errors import DataError
from toolkit.export_model import check_onnx_parity, export_model
from toolkit.files import sha256_file


def val_batch(shards):
    _, images, _ = next(iter(make_loader(ShardStream(shards, split="val", mode="eval", batch_size=64), num_workers=0)))
    return images  # uint8 (N, 1, 16, 16), as the shards hold them


def toolkit_embeddings(run, images):
    model, saved = load_embedder(run, "cpu")
    with torch.no_grad():
        return model(to_model_input(images, input_size=saved.config["input_size"]))


def test_onnx_export_matches_the_toolkit_within_1e_4(tmp_path_factory, tmp_path):
    base = shared_embed_run(tmp_path_factory)
    out = tmp_path / "onnx"
    meta = export_model(base["embed"], out, format="onnx")
    images = val_batch(base["shards"])
    diff = check_onnx_parity(out, images, toolkit_embeddings(base["embed"], images))
    assert diff <= 1e-4, diff
    assert meta["embedder"]["input"] == {"name": "images", "dtype": "uint8", "shape": ["N", 1, 16, 16]}
    assert meta["embedder"]["output"]["shape"] == ["N", 32] and meta["embedder"]["output"]["l2_normalised"]
    assert json.loads((out / "model.json").read_text()) == meta
    assert meta["files"]["embedder"]["sha256"] == sha256_file(out / "embedder.onnx")
    assert meta["preprocess"]["image_size"] == 16 and meta["preprocess"]["grayscale"] is True
    one = images[:1]  # any batch size: the batch axis is dynamic
    assert check_onnx_parity(out, one, toolkit_embeddings(base["embed"], one)) <= 1e-4


def test_classifier_run_exports_the_head_too_torchscript(tmp_path_factory, tmp_path):
    run = shared_classify_run(tmp_path_factory)
    base = shared_embed_run(tmp_path_factory)
    out = tmp_path / "ts"
    meta = export_model(run, out, format="torchscript")
    assert set(meta["files"]) == {"embedder", "head"} and meta["head"]["classes"] == meta["classes"]
    images = val_batch(base["shards"])
    embedder, head = torch.jit.load(str(out / "embedder.pt")), torch.jit.load(str(out / "head.pt"))
    ref = toolkit_embeddings(run, images)
    with torch.no_grad():
        emb = embedder(images)
        assert (emb - ref).abs().max() <= 1e-5
        real_head, _ = load_head(run, "cpu")
        assert torch.allclose(head(emb), real_head(ref), atol=1e-5)


def test_safetensors_weights_rebuild_the_embedder(tmp_path_factory, tmp_path):
    from safetensors.torch import load_file

    from toolkit.models import build_embedder

    base = shared_embed_run(tmp_path_factory)
    meta = export_model(base["embed"], tmp_path / "st", format="safetensors")
    e = meta["embedder"]
    model = build_embedder(arch=e["arch"], in_channels=e["in_channels"], input_size=e["input_size"], embedding_dim=e["embedding_dim"])
    model.load_state_dict(load_file(str(tmp_path / "st" / "embedder.safetensors")))
    images = val_batch(base["shards"])
    with torch.no_grad():
        got = model.eval()(to_model_input(images, input_size=e["input_size"]))
    assert torch.equal(got, toolkit_embeddings(base["embed"], images))


def test_a_training_checkpoints_weights_export_as_safetensors(tmp_path_factory, tmp_path, capsys):
    """--step N: checkpoint N's weights (not the best embedder's); class names from the run's
    best_embedder.pt, or from the shards when the run has none yet; a missing step is one line."""
    from safetensors.torch import load_file

    from toolkit.artifacts import EMBEDDER_FILE, load_artifact
    from toolkit.cli import main
    from toolkit.files import atomic_torch_save

    base = shared_embed_run(tmp_path_factory)
    best = load_artifact(base["embed"] / EMBEDDER_FILE)
    weights = {k: v + 1.0 if v.is_floating_point() else v for k, v in best.model.items()}  # not the best's
    run = tmp_path / "run"
    atomic_torch_save({"model": weights, "optimizer": {}, "config": best.config, "step": 7}, run / "checkpoints" / "step-000000007.pt")
    meta = export_model(run, tmp_path / "st", format="safetensors", step=7)  # no best_embedder.pt: classes from the shards
    assert meta["embedder"]["step"] == 7 and meta["classes"] == best.classes and meta["source"].endswith("step-000000007.pt")
    got = load_file(str(tmp_path / "st" / "embedder.safetensors"))
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)
    atomic_torch_save(best.to_payload(), run / EMBEDDER_FILE)
    main(["export-model", str(run), "--out", str(tmp_path / "ts"), "--format", "torchscript", "--step", "7"])
    assert "exported torchscript" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"no checkpoint of step 5 \(checkpoints: 7\)"):
        export_model(run, tmp_path / "x", format="safetensors", step=5)


def test_export_never_replaces_a_folder_it_did_not_write(tmp_path_factory, tmp_path, capsys):
    from toolkit.cli import main

    base = shared_embed_run(tmp_path_factory)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not an exported-model folder"):
        export_model(base["embed"], mine, format="torchscript", overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    out = tmp_path / "out"
    main(["export-model", str(base["embed"]), "--out", str(out), "--format", "torchscript"])
    assert "exported torchscript" in capsys.readouterr().out
    with pytest.raises(DataError, match="already exists: pass --overwrite"):
        export_model(base["embed"], out, format="torchscript")
    export_model(base["embed"], out, format="onnx", overwrite=True)  # ours: replaced
    assert sorted(p.name for p in out.iterdir()) == ["embedder.onnx", "model.json"]
    with pytest.raises(SystemExit):
        main(["export-model", str(base["embed"]), "--out", str(tmp_path / "x"), "--format", "pickle"])
    assert "--format must be one of onnx, torchscript, safetensors" in capsys.readouterr().err


def test_missing_optional_package_is_one_line_naming_the_extra(tmp_path_factory, tmp_path, monkeypatch):
    import sys

    from toolkit.errors import ConfigError

    base = shared_embed_run(tmp_path_factory)
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed: import raises ImportError
    with pytest.raises(ConfigError, match=r'needs the onnx package: pip install "toolkit\[export\]"'):
        export_model(base["embed"], tmp_path / "o", format="onnx")
    assert not (tmp_path / "o").exists()
