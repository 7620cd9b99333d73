"""timm interop: ``arch=timm:<name>`` embedders (build, save, rebuild, train) and timm's own
WebDataset reader on the toolkit's shards.

Every model here is randomly initialised (``pretrained=False``): nothing is downloaded.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

pytest.importorskip("timm")

from conftest import make_image_folder, read_tar_samples, write_shards_quietly  # noqa: E402
from test_configs import REPO, _launch_in_process  # noqa: E402
from test_embed import launch_python, make_quadrant_shards, write_config  # noqa: E402
from toolkit.artifacts import EMBEDDER_FILE, EmbedderArtifact, in_channels, load_embedder  # noqa: E402
from toolkit.config import BUILTIN_ARCHS, EmbedConfig, load_config, to_dict  # noqa: E402
from toolkit.errors import ConfigError  # noqa: E402
from toolkit.models import ARCHS, TimmEmbedder, ZFNet, build_embedder  # noqa: E402


def _unit_norm(z: torch.Tensor) -> bool:
    return torch.allclose(z.norm(dim=1), torch.ones(z.shape[0]), atol=1e-5)


# ----------------------------------------------------------------------------- the embedder


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_timm_embedder_gives_unit_norm_embeddings_and_gradients(name, channels):
    torch.manual_seed(0)
    model = build_embedder(arch=f"timm:{name}", in_channels=channels, input_size=32, embedding_dim=128)
    assert isinstance(model, TimmEmbedder) and model.embedding_dim == 128
    x = torch.randn(4, channels, 32, 32)
    z = model(x)
    assert z.shape == (4, 128) and _unit_norm(z)
    # a loss on the embeddings reaches every layer, from the projection back to the stem
    (z[:, 0] - z[:, 1]).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    stem = next(n for n, p in model.named_parameters() if p.ndim == 4)
    assert grads[stem].shape[1] == channels and grads[stem].abs().sum() > 0
    assert grads["proj.weight"].abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x)) and _unit_norm(model(x))


@pytest.mark.parametrize("name", ["resnet18", "pit_ti_224", "mobilenetv3_small_100"])
def test_saved_state_tells_its_input_channels(name):
    """toolkit.artifacts.in_channels reads the first 4-D tensor of a state dict: for every timm
    model that is the embedder's marker, not e.g. PiT's (1, 64, h, w) pos_embed. MobileNetV3's
    pooled output (1024) is wider than its num_features (576): the projection follows it."""
    for channels in (1, 3):
        model = build_embedder(arch=f"timm:{name}", in_channels=channels, input_size=32, embedding_dim=16).eval()
        assert in_channels(model.state_dict()) == channels
        with torch.no_grad():
            assert model(torch.randn(2, channels, 32, 32)).shape == (2, 16)


def test_saved_timm_embedder_rebuilds_with_the_same_weights(tmp_path):
    """best_embedder.pt -> load_embedder (what predict / evaluate / export use) -> same embeddings."""
    torch.manual_seed(0)
    cfg = load_config(EmbedConfig, None, {"arch": "timm:resnet18", "input_size": 32, "embedding_dim": 64})
    model = build_embedder(arch=cfg.arch, in_channels=1, input_size=cfg.input_size, embedding_dim=cfg.embedding_dim)
    x = torch.randn(8, 1, 32, 32)
    model.train()
    with torch.no_grad():
        model(x)  # move the BatchNorm running statistics off their initial values
    model.eval()
    with torch.no_grad():
        expected = model(x)
    saved = EmbedderArtifact.from_model(model, config=to_dict(cfg), classes=["a", "b"], metrics={}, step=1)
    path = tmp_path / EMBEDDER_FILE
    torch.save(saved.to_payload(), path)

    rebuilt, artifact = load_embedder(path, device="cpu")
    assert isinstance(rebuilt, TimmEmbedder) and not rebuilt.training
    assert artifact.config["arch"] == "timm:resnet18" and artifact.config["pretrained"] is False
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)


def test_builtin_archs_are_unchanged_and_pretrained_is_timm_only():
    assert BUILTIN_ARCHS == ARCHS
    assert isinstance(build_embedder(arch="zfnet", input_size=32, embedding_dim=8), ZFNet)
    with pytest.raises(ValueError, match="pretrained"):
        build_embedder(arch="zfnet", input_size=32, pretrained=True)
    with pytest.raises(ValueError, match="resnet1888"):
        build_embedder(arch="timm:resnet1888", input_size=32)


# ----------------------------------------------------------------------------- config


def test_default_recipe_is_still_the_seed_zfnet():
    cfg = load_config(EmbedConfig)
    assert cfg.arch == "zfnet" and cfg.pretrained is False


def test_shipped_timm_config_loads():
    cfg = load_config(EmbedConfig, REPO / "configs" / "embed" / "timm-resnet18.yaml")
    assert cfg.arch == "timm:resnet18" and cfg.pretrained is False and cfg.input_size >= 32


@pytest.mark.parametrize("overrides, words", [
    ({"arch": "timm:resnet1888"}, ("resnet1888", "timm:resnet18")),
    ({"arch": "timm:"}, ("needs a model name",)),
    ({"arch": "timm:resnet18.bogus"}, ("bogus", "resnet18.a1_in1k")),
    ({"arch": "vgg"}, ("'vgg'", "zfnet", "timm:<")),
    ({"arch": "efficientnet_b0"}, ("'timm:efficientnet_b0'",)),  # forgot the prefix
    ({"arch": "zfnet", "pretrained": "true"}, ("pretrained", "timm:")),
    ({"arch": "timm:botnet50ts_256", "pretrained": "true"}, ("no pretrained weights", "pretrained=false")),
])
def test_bad_arch_is_one_line_at_config_validation(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(EmbedConfig, None, overrides)
    message = str(err.value)
    assert "\n" not in message and message.startswith(("arch: ", "pretrained")), message
    for word in words:
        assert word in message, message


def test_pretrained_tagged_timm_arch_passes_validation():
    cfg = load_config(EmbedConfig, None, {"arch": "timm:resnet18.a1_in1k", "pretrained": "true"})
    assert cfg.pretrained is True  # checked only, never built here: that would download


def test_bad_timm_name_stops_the_launch_before_any_work(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    args = ["--config", REPO / "configs" / "embed" / "timm-resnet18.yaml", f"run_dir={run_dir}", "arch=timm:resnet1888"]
    r = _launch_in_process(tmp_path, monkeypatch, capsys, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "timm:resnet18" in lines[0], r.stderr
    assert not run_dir.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_quadrant_shards(tmp_path_factory.mktemp("quadrants"))


def test_short_cpu_run_with_a_timm_embedder(tmp_path, shards):
    """`python launch/embed.py` (one process, CPU) with arch=timm:resnet18: a few steps, best_embedder.pt."""
    config = write_config(tmp_path / "run.yaml", shards, arch="timm:resnet18", input_size=32, epochs=1, max_steps=3)
    run_dir = tmp_path / "run"
    r = launch_python("--config", config, f"run_dir={run_dir}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-5000:]
    assert "after 3 steps" in r.stdout, r.stdout[-3000:]
    model, saved = load_embedder(run_dir, device="cpu")
    assert isinstance(model, TimmEmbedder) and saved.config["arch"] == "timm:resnet18" and saved.step == 3
    assert saved.index["embeddings"].shape == (68, 128)
    with torch.no_grad():
        z = model(torch.rand(2, 1, 32, 32))
    assert z.shape == (2, 128) and _unit_norm(z)


def test_training_builds_the_model_with_the_configured_pretrained(tmp_path, shards, monkeypatch):
    """fit() must hand cfg.pretrained to build_embedder (stopped right there: nothing downloads)."""
    import toolkit.engine.embed as engine

    seen = {}

    class Built(Exception):
        pass

    def spy(**kwargs):
        seen.update(kwargs)
        raise Built

    monkeypatch.setattr(engine, "build_embedder", spy)
    cfg = load_config(EmbedConfig, None, {"shards": str(shards), "arch": "timm:resnet18.a1_in1k", "pretrained": True,
                                          "batch_size": 16, "num_workers": 0, "tracker": "none",
                                          "run_dir": str(tmp_path / "run")})
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, is_main_process=True, process_index=0,
                                  local_process_index=0)
    with pytest.raises(Built):
        engine.fit(cfg, accelerator, tracker=None)
    assert seen.get("arch") == "timm:resnet18.a1_in1k"
    assert seen.get("pretrained") is True, seen


# ----------------------------------------------------------------------------- timm's WebDataset reader


def _pixels(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as im:
        return im.convert("L").tobytes()


def test_timm_webdataset_reader_reads_toolkit_shards(tmp_path):
    """README: `_info.json`'s splits block is what timm's reader_wds reads. Every train sample
    comes back once, with the toolkit's class index (sorted class names) as its target."""
    import timm.data

    sizes = {"alpha": 9, "beta": 5, "gamma": 7, "delta": 3}
    images = make_image_folder(tmp_path / "images", sizes, size=(12, 12))
    out = tmp_path / "shards"
    info = write_shards_quietly(images, out, image_size=12, samples_per_shard=6)
    classes = json.loads((out / "_info.json").read_text())["classes"]
    assert classes == sorted(sizes)

    for split in ("train", "val"):
        # what the toolkit wrote: (pixels, class index of the sample's class name)
        truth = []
        for name in info.splits[split].filenames:
            for sample in read_tar_samples(out / name).values():
                label = classes.index(json.loads(sample["json"])["label"])
                assert int(sample["cls"]) == label
                truth.append((_pixels(sample["png"]), label))
        assert len(truth) == info.splits[split].num_samples

        ds = timm.data.create_dataset("wds/toolkit", root=str(out), split=split, is_training=False,
                                      input_img_mode="L")
        assert len(ds) == len(truth)
        got = [(img.tobytes(), int(target)) for img, target in ds]
        assert sorted(got) == sorted(truth)
        counts = json.loads((out / "_info.json").read_text())["splits"][split]["class_counts"]
        assert Counter(label for _, label in got) == Counter({classes.index(c): n for c, n in counts.items() if n})
