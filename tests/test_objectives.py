"""loss=pml:<Name>: pytorch-metric-learning losses and miners as the training objective.

The two-process gradient equality (MultiSimilarityLoss with its miner, ProxyAnchorLoss with
its proxies) is in test_losses_distributed.py; here: the config checks, the one-process
objective against PML itself, and a run whose proxies train, are saved and resume exactly.
"""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from pytorch_metric_learning import losses, miners

from test_configs import _launch_in_process
from test_embed import launch_python, make_quadrant_shards, step_files, write_config
from toolkit.config import EmbedConfig, load_config
from toolkit.errors import ConfigError
from toolkit.files import safe_load
from toolkit.objectives import PMLObjective, TripletObjective, build_objective


# ----------------------------------------------------------------------------- the config


def test_a_pml_loss_with_keywords_from_the_command_line_loads():
    cfg = load_config(EmbedConfig, None, {"loss": "pml:MultiSimilarityLoss", "loss_kwargs": "{alpha: 2, beta: 40}",
                                          "miner": "pml:MultiSimilarityMiner", "miner_kwargs": "{epsilon: 0.2}"})
    assert cfg.loss_kwargs == {"alpha": 2, "beta": 40} and cfg.miner_kwargs == {"epsilon": 0.2}
    objective = build_objective(loss=cfg.loss, loss_kwargs=cfg.loss_kwargs, miner=cfg.miner, miner_kwargs=cfg.miner_kwargs)
    assert isinstance(objective.loss, losses.MultiSimilarityLoss) and objective.loss.beta == 40
    assert isinstance(objective.miner, miners.MultiSimilarityMiner) and objective.miner.epsilon == 0.2


def test_the_default_objective_is_still_the_builtin_triplet_loss():
    cfg = EmbedConfig()
    assert (cfg.loss, cfg.margin, cfg.mining, cfg.miner) == ("triplet", 0.2, "semihard", "")
    assert isinstance(build_objective(), TripletObjective)


def test_distance_names_a_pml_distance_class():
    objective = build_objective(loss="pml:TripletMarginLoss", loss_kwargs={"distance": "CosineSimilarity", "margin": 0.1})
    assert type(objective.loss.distance).__name__ == "CosineSimilarity"


def test_a_proxy_loss_takes_its_classes_and_width_from_the_run():
    objective = build_objective(loss="pml:ProxyAnchorLoss", num_classes=7, embedding_dim=24)
    assert tuple(objective.loss.proxies.shape) == (7, 24)


@pytest.mark.parametrize("overrides, words", [
    ({"loss": "pml:MultiSimilarityLos"}, ("'MultiSimilarityLos'", "did you mean MultiSimilarityLoss")),
    ({"loss": "pml:os.system"}, ("not a pytorch-metric-learning loss", "ProxyAnchorLoss")),
    ({"loss": "pml:__class__"}, ("not a pytorch-metric-learning loss",)),
    ({"loss": "pml:BaseMetricLossFunction"}, ("not a pytorch-metric-learning loss",)),
    ({"loss": "pml:VICRegLoss"}, ("not a pytorch-metric-learning loss",)),  # needs two views, no labels
    ({"loss": "pml:CrossBatchMemory"}, ("not a pytorch-metric-learning loss",)),  # a wrapper
    ({"loss": "pml:MultiSimilarityLoss", "loss_kwargs": "{alphaa: 2}"}, ("takes no 'alphaa'", "did you mean 'alpha'")),
    ({"loss": "pml:TripletMarginLoss", "loss_kwargs": "{distance: os}"}, ("distance='os'", "CosineSimilarity")),
    ({"loss": "pml:ProxyAnchorLoss", "loss_kwargs": "{embedding_size: 7}"}, ("cannot train", "RuntimeError")),
    ({"loss": "pml:ProxyAnchorLoss", "loss_kwargs": "{margin: [a, {b: 1}]}"}, ("loss_kwargs: margin=",)),
    ({"loss": "pml:ProxyAnchorLoss", "loss_kwargs": "[1, 2]"}, ("expected a mapping",)),
    ({"loss": "pml:ProxyAnchorLoss", "loss_kwargs": "{a: !!python/object/apply:os.system [echo]}"}, ("expected a mapping",)),
    ({"loss": "pml:MultiSimilarityLoss", "miner": "pml:TripletMarginMine"}, ("did you mean TripletMarginMiner",)),
    ({"loss": "pml:MultiSimilarityLoss", "miner": "MultiSimilarityMiner"}, ("pml:<MinerName>",)),
    ({"loss": "arcface"}, ("triplet or pml:<LossName>",)),
    ({"miner": "pml:BatchHardMiner"}, ("loss=triplet takes margin",)),  # the built-in loss mines itself
    ({"loss": "pml:MultiSimilarityLoss", "miner_kwargs": "{epsilon: 0.1}"}, ("miner_kwargs needs a miner",)),
])
def test_a_bad_loss_or_miner_is_one_line_at_config_time(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(EmbedConfig, None, overrides)
    message = str(err.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


def test_a_bad_loss_stops_the_launch_before_any_work(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    r = _launch_in_process(tmp_path, monkeypatch, capsys, f"run_dir={run_dir}", "loss=pml:ProxyAnchorLos")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "ProxyAnchorLoss" in lines[0], r.stderr
    assert not run_dir.exists()


# ----------------------------------------------------------------------------- one process


@pytest.mark.parametrize("loss, miner", [("MultiSimilarityLoss", "MultiSimilarityMiner"), ("ProxyAnchorLoss", None),
                                         ("ContrastiveLoss", None), ("SupConLoss", None)])
def test_one_process_the_objective_is_the_pml_loss_itself(loss, miner):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 16, generator=g)
    labels = torch.arange(6).repeat_interleave(4)
    torch.manual_seed(3)
    objective = build_objective(loss=f"pml:{loss}", miner=f"pml:{miner}" if miner else "", num_classes=6, embedding_dim=16)
    assert isinstance(objective, PMLObjective)
    e1 = x.clone().requires_grad_()
    value, stats = objective(F.normalize(e1, dim=1), labels)
    value.backward()
    torch.manual_seed(3)  # the same proxies
    ref_loss = getattr(losses, loss)(**({"num_classes": 6, "embedding_size": 16} if loss == "ProxyAnchorLoss" else {}))
    e2 = x.clone().requires_grad_()
    emb = F.normalize(e2, dim=1)
    ref = ref_loss(emb, labels, getattr(miners, miner)()(emb, labels) if miner else None)
    ref.backward()
    assert value.item() == pytest.approx(ref.item(), rel=1e-6) and stats["loss"] == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(e1.grad, e2.grad)
    assert value.item() > 0 and stats["num_pairs"] > 0


# ----------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_quadrant_shards(tmp_path_factory.mktemp("quadrants"))


@pytest.mark.slow
def test_proxies_train_are_checkpointed_and_resume_exactly(tmp_path, shards):
    """`python launch/embed.py loss=pml:ProxyAnchorLoss`: the proxies move (at loss_lr), every
    checkpoint holds them, and a run resumed from step 2 ends with the straight run's step 4."""
    config = write_config(tmp_path / "run.yaml", shards, loss="pml:ProxyAnchorLoss", loss_lr=0.05, max_steps=4,
                          ckpt_every=2, keep_last=5, epochs=10, val_every=100)
    straight = tmp_path / "straight"
    r = launch_python("--config", config, f"run_dir={straight}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-5000:]
    saved = {step: safe_load(path) for step, path in step_files(straight).items()}
    assert sorted(saved) == [2, 4], sorted(saved)
    proxies = {step: s["objective"]["loss.proxies"] for step, s in saved.items()}
    assert proxies[2].shape == (4, 128)  # the quadrant shards' 4 classes x embedding_dim
    assert not torch.equal(proxies[2], proxies[4]), "the proxies did not train"
    assert saved[4]["optimizer"]["param_groups"][1]["lr"] == 0.05

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    step_files(resumed)[4].unlink()  # as if killed between the checkpoints of steps 2 and 4
    assert sorted(step_files(resumed)) == [2]
    r = launch_python("--config", config, f"run_dir={resumed}", "resume=true", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-5000:]
    assert "resumed from step 2" in r.stdout, r.stdout[-3000:]
    again = safe_load(step_files(resumed)[4])
    assert torch.equal(again["objective"]["loss.proxies"], proxies[4])
    for name, value in saved[4]["model"].items():
        assert torch.equal(again["model"][name], value), name
