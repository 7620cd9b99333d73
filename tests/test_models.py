"""Embedders and classifier head: seed fidelity (exact parameter count), shapes, unit norms,
train/eval behaviour, gradients, and the factories' errors."""
import pytest
import torch
from torch import nn

from toolkit.models import (
    ARCHS,
    ClassifierHead,
    ResNetEmbedder,
    ZFNet,
    build_embedder,
    build_head,
    count_parameters,
    feature_size,
)

SEED_PARAMS = 55_085_760  # seed ZFNet, 1 channel, 220x220


@pytest.fixture(scope="module")
def zf220():
    torch.manual_seed(0)
    return ZFNet(in_channels=1, input_size=220, embedding_dim=128)


def _unit_norm(z):
    return torch.allclose(z.norm(dim=1), torch.ones(z.shape[0]), atol=1e-5)


# ----------------------------------------------------------------------------- ZFNet


def test_seed_zfnet_has_exact_parameter_count(zf220):
    assert count_parameters(zf220) == SEED_PARAMS
    assert zf220.flat_dim == 7 * 7 * 256


def test_flatten_width_follows_input_size():
    assert feature_size(220) == 7
    assert feature_size(64) == 2
    assert feature_size(32) == 1
    assert ZFNet(input_size=32).flat_dim == 256


@pytest.mark.parametrize("size", [32, 33, 64, 100])
def test_feature_size_matches_real_feature_map(size):
    model = ZFNet(input_size=size).eval()
    with torch.no_grad():
        feats = model.features(torch.zeros(1, 1, size, size))
    assert feats.shape == (1, 256, feature_size(size), feature_size(size))


def test_seed_zfnet_220_maps_to_unit_norm_embeddings(zf220):
    zf220.eval()
    with torch.no_grad():
        z = zf220(torch.randn(2, 1, 220, 220))
    assert z.shape == (2, 128)
    assert _unit_norm(z)


@pytest.mark.parametrize("size", [32, 64])
def test_native_resolution_zfnet_maps_to_unit_norm_embeddings(size):
    torch.manual_seed(0)
    model = ZFNet(input_size=size).eval()
    with torch.no_grad():
        z = model(torch.randn(5, 1, size, size))
    assert z.shape == (5, 128)
    assert _unit_norm(z)


def test_train_mode_needs_two_samples_eval_takes_one():
    torch.manual_seed(0)
    model = ZFNet(input_size=32)
    z = model.train()(torch.randn(2, 1, 32, 32))
    assert z.shape == (2, 128) and _unit_norm(z.detach())
    with pytest.raises(ValueError):  # BatchNorm1d cannot normalise a single sample
        model.train()(torch.randn(1, 1, 32, 32))
    with torch.no_grad():
        z1 = model.eval()(torch.randn(1, 1, 32, 32))
    assert z1.shape == (1, 128) and _unit_norm(z1)


def test_seed_zfnet_eval_on_single_image(zf220):
    zf220.eval()
    with torch.no_grad():
        z = zf220(torch.randn(1, 1, 220, 220))
    assert z.shape == (1, 128) and _unit_norm(z)


def test_backward_gives_finite_grads_for_every_parameter():
    torch.manual_seed(0)
    model = ZFNet(input_size=32).train()
    z = model(torch.randn(4, 1, 32, 32))
    # a loss that depends on every output coordinate non-trivially
    (z * torch.randn_like(z)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_channels_last_input_gives_same_embeddings():
    torch.manual_seed(0)
    model = ZFNet(input_size=32).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        x3 = torch.randn(3, 3, 32, 32)
        out = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, atol=1e-5)
    # three-channel variant also runs in channels_last
    rgb = ZFNet(in_channels=3, input_size=32).eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        z = rgb(x3.contiguous(memory_format=torch.channels_last))
    assert z.shape == (3, 128) and _unit_norm(z)


def test_wrong_input_size_is_a_clear_error():
    model = ZFNet(input_size=32).eval()
    with pytest.raises(ValueError, match="32x32"):
        model(torch.zeros(1, 1, 64, 64))


# ----------------------------------------------------------------------------- ResNet


@pytest.mark.parametrize("size", [32, 64])
def test_resnet18_small_inputs_unit_norm(size):
    torch.manual_seed(0)
    model = build_embedder(arch="resnet18", in_channels=1, input_size=size).eval()
    assert isinstance(model, ResNetEmbedder)
    # CIFAR-style stem for small inputs
    assert model.net.conv1.kernel_size == (3, 3) and model.net.conv1.stride == (1, 1)
    assert isinstance(model.net.maxpool, nn.Identity)
    with torch.no_grad():
        z = model(torch.randn(3, 1, size, size))
    assert z.shape == (3, 128) and _unit_norm(z)


def test_resnet_large_input_keeps_imagenet_stem_and_channels():
    model = ResNetEmbedder(arch="resnet18", in_channels=3, input_size=220)
    assert model.net.conv1.kernel_size == (7, 7) and model.net.conv1.stride == (2, 2)
    assert model.net.conv1.in_channels == 3
    assert isinstance(model.net.maxpool, nn.MaxPool2d)
    assert model.net.fc.out_features == 128


def test_resnet34_builds_and_is_deeper():
    r18 = build_embedder(arch="resnet18", input_size=32, embedding_dim=64)
    r34 = build_embedder(arch="resnet34", input_size=32, embedding_dim=64).eval()
    assert count_parameters(r34) > count_parameters(r18)
    with torch.no_grad():
        z = r34(torch.randn(2, 1, 32, 32))
    assert z.shape == (2, 64) and _unit_norm(z)


# ----------------------------------------------------------------------------- head


def test_head_outputs_log_probabilities():
    torch.manual_seed(0)
    head = build_head(num_classes=7)
    assert isinstance(head, ClassifierHead)
    # Linear(128,64) + Linear(64,7)
    assert count_parameters(head) == 128 * 64 + 64 + 64 * 7 + 7
    logp = head(torch.randn(5, 128))
    assert logp.shape == (5, 7)
    assert torch.allclose(logp.exp().sum(dim=1), torch.ones(5), atol=1e-5)
    assert (logp <= 0).all()
    loss = nn.NLLLoss()(logp, torch.tensor([0, 1, 2, 3, 6]))
    assert torch.isfinite(loss)


def test_head_eval_is_deterministic_train_uses_dropout():
    torch.manual_seed(0)
    head = ClassifierHead(embedding_dim=128, hidden=64, num_classes=10, dropout=0.5)
    x = torch.randn(8, 128)
    head.eval()
    assert torch.equal(head(x), head(x))
    head.train()
    assert not torch.equal(head(x), head(x))


# ----------------------------------------------------------------------------- factories


def test_unknown_arch_names_known_ones():
    with pytest.raises(ValueError) as err:
        build_embedder(arch="vgg16")
    for name in ARCHS:
        assert name in str(err.value)
    assert set(ARCHS) == {"zfnet", "resnet18", "resnet34"}


def test_build_embedder_default_is_seed_zfnet():
    model = build_embedder(arch="zfnet", input_size=32, embedding_dim=64)
    assert isinstance(model, ZFNet) and model.embedding_dim == 64


def test_count_parameters_trainable_only():
    head = build_head(num_classes=3)
    head.layers[1].requires_grad_(False)  # freeze the first Linear
    assert count_parameters(head, trainable_only=True) == 64 * 3 + 3
    assert count_parameters(head) == 128 * 64 + 64 + 64 * 3 + 3


# ----------------------------------------------------------------------------- torch.compile + channels_last
# On CPU torch.compile (inductor) builds C++ kernels: ~50-70 s the first time on 2 busy cores,
# ~5-15 s once inductor's on-disk cache holds them. Both tests use the shapes of the run below
# (ZFNet at 16×16, one channel, batch 16, channels_last), so the second one reuses the kernels.

COMPILE_SIDE, COMPILE_BATCH = 16, 16


@pytest.mark.slow
def test_compiled_channels_last_forward_backward_matches_eager():
    """The training path (uint8 batch -> to_model_input(channels_last) -> model in train mode ->
    backward), compiled vs eager from the same weights: same embeddings, same gradients."""
    import copy

    from toolkit.data.transforms import to_model_input

    torch.manual_seed(0)
    eager = build_embedder(arch="zfnet", in_channels=1, input_size=COMPILE_SIDE).to(memory_format=torch.channels_last)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    images = torch.randint(0, 256, (COMPILE_BATCH, 1, COMPILE_SIDE, COMPILE_SIDE), dtype=torch.uint8)
    x = to_model_input(images, input_size=COMPILE_SIDE, channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    weights = torch.randn(COMPILE_BATCH, 128, generator=torch.Generator().manual_seed(1))
    ref, out = eager(x), compiled(x)
    assert out.shape == (COMPILE_BATCH, 128) and _unit_norm(out.detach())
    assert torch.allclose(out, ref, atol=2e-5), (out - ref).abs().max()
    (ref * weights).sum().backward()
    (out * weights).sum().backward()
    # Per parameter, on the scale of the whole gradient: a conv bias before BatchNorm has a true
    # gradient of 0, so both sides hold rounding noise there, in different orders of summation.
    scale = max(p.grad.abs().max().item() for p in eager.parameters())
    for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
        assert q.grad is not None, name
        assert torch.allclose(q.grad, p.grad, rtol=1e-3, atol=1e-4 * scale), (name, (q.grad - p.grad).abs().max() / scale)
    flat_e = torch.cat([p.grad.flatten() for p in eager.parameters()])
    flat_c = torch.cat([q.grad.flatten() for q in twin.parameters()])
    assert (flat_c - flat_e).norm() <= 1e-4 * flat_e.norm()
    for (name, b), c in zip(eager.named_buffers(), twin.buffers()):  # BatchNorm running statistics
        assert torch.allclose(b.float(), c.float(), atol=1e-5), name


@pytest.mark.slow
def test_embed_run_with_compile_and_channels_last_matches_eager(tmp_path):
    """`compile=true channels_last=true` end to end (train, validate with channels_last, save):
    the first step's loss equals the eager run's, weights stay within Adam's step of it, and the
    saved embedder has the plain module's weight names (no torch.compile wrapper)."""
    import json

    from test_embed import launch_python, make_quadrant_shards, write_config
    from toolkit.files import safe_load

    shards = make_quadrant_shards(tmp_path)
    lr, steps = 1e-3, 2
    config = write_config(tmp_path / "run.yaml", shards, max_steps=steps, epochs=0, lr=lr, channels_last=True,
                          input_size=COMPILE_SIDE, batch_size=COMPILE_BATCH, K=4)
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["compile=true"])):
        r = launch_python("--config", config, f"run_dir={tmp_path / name}", *extra, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-5000:]
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses = [rec["train/loss"] for rec in records if "train/loss" in rec]
        assert len(losses) == steps and any("val/knn_accuracy" in rec for rec in records)
        runs[name] = losses, safe_load(tmp_path / name / "best_embedder.pt")["model"]
    (loss_e, model_e), (loss_c, model_c) = runs["eager"], runs["compiled"]
    assert loss_c[0] == pytest.approx(loss_e[0], rel=1e-5)  # same weights, same batch: the forward agrees
    assert loss_c[1] == pytest.approx(loss_e[1], rel=5e-2)
    assert model_c.keys() == model_e.keys() == ZFNet(input_size=COMPILE_SIDE).state_dict().keys()
    for key, value in model_e.items():  # Adam moves each weight by at most ~lr per step
        assert torch.allclose(model_c[key].float(), value.float(), atol=2 * lr * steps + 1e-5), key


def test_channels_last_evaluation_matches_contiguous(tmp_path):
    """embed_split (what the validator and `toolkit evaluate` embed with) in channels_last."""
    from test_embed import make_quadrant_shards
    from toolkit.evaluation import embed_split

    shards = make_quadrant_shards(tmp_path)
    torch.manual_seed(0)
    model = build_embedder(arch="zfnet", in_channels=1, input_size=32).eval()
    kw = dict(shards=str(shards), split="val", rank=0, world_size=1, device=torch.device("cpu"), input_size=32,
              num_workers=0)
    keys, plain, _ = embed_split(model, **kw)
    keys_cl, cl, _ = embed_split(model.to(memory_format=torch.channels_last), **kw, channels_last=True)
    assert keys == keys_cl and len(keys) == 12
    assert torch.allclose(plain, cl, atol=1e-5)
