"""Cross-process mining is gradient-exact: two real processes (torchrun, gloo, CPU) with DDP
produce the same parameter gradients and logged loss as one process on the whole batch."""
import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.losses import gather_labels, gather_with_grad, triplet_loss

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "dist_scripts" / "grad_equality.py"
WORLD = 2
TIMEOUT_S = 120


def _load_script():
    spec = importlib.util.spec_from_file_location("grad_equality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_torchrun(out_dir: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", str(WORLD), "--master_port", str(_free_port()),
           str(SCRIPT), str(out_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # Own session, so a hung run can be killed with its workers, not just torchrun.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S}s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{output[-4000:]}"


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("grad_equality")
    _run_torchrun(out_dir)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _assert_like_one_process(dist_results, key, expected, loss, stats):
    """Every rank's DDP-averaged gradients, logged loss and pair count are one process's."""
    for rank, result in enumerate(dist_results):
        got = result[key]
        for name, grad in expected.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")
        assert got["stats"]["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert got["stats"]["num_pairs"] == stats["num_pairs"]
        assert got["loss_for_backward"] == pytest.approx(WORLD * loss.item(), rel=1e-5)


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["semihard", "hard", "all"])
def test_ddp_gradients_equal_single_process_on_concatenated_batch(dist_results, strategy):
    script = _load_script()
    x, labels = script.global_batch(WORLD)  # (48, 32), (48,)

    model = script.build_model()
    loss, stats = triplet_loss(script.embed(model, x), labels, margin=script.MARGIN, strategy=strategy)
    loss.backward()
    expected = _grads(model)
    assert stats["num_pairs"] == 48 * 7 and loss.item() > 0.01

    _assert_like_one_process(dist_results, strategy, expected, loss, stats)

    # The comparison has power: mining each half on its own (no gather) moves the gradient.
    local = []
    for r in range(WORLD):
        m = script.build_model()
        mine = slice(r * script.LOCAL_BATCH, (r + 1) * script.LOCAL_BATCH)
        triplet_loss(script.embed(m, x[mine]), labels[mine], margin=script.MARGIN, strategy=strategy)[0].backward()
        local.append(_grads(m))
    name = "2.weight"
    local_mean = (local[0][name] + local[1][name]) / WORLD
    assert not torch.allclose(local_mean, expected[name], rtol=1e-2, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("anchors", ["own", "all"])
@pytest.mark.parametrize("strategy", ["semihard", "hard", "all"])
@pytest.mark.parametrize("case", ["uneven", "zero"])
def test_ranks_with_different_numbers_of_pairs_still_give_the_single_process_gradient(dist_results, case, strategy, anchors):
    script = _load_script()
    x, _ = script.global_batch(WORLD)
    labels = script.uneven_labels(WORLD, case)
    model = script.build_model()
    loss, stats = triplet_loss(script.embed(model, x), labels, margin=script.MARGIN, strategy=strategy)
    loss.backward()
    expected = _grads(model)
    # the ranks' own anchors really hold different numbers of pairs
    own_pairs = [int(((labels[r * script.LOCAL_BATCH:(r + 1) * script.LOCAL_BATCH, None] == labels[None, :]).sum(1) - 1).sum())
                 for r in range(WORLD)]
    assert own_pairs[0] > 2 * own_pairs[1] and (own_pairs[1] == 0) == (case == "zero")
    assert stats["num_pairs"] == sum(own_pairs) and loss.item() > 0.01
    _assert_like_one_process(dist_results, (case, strategy, anchors), expected, loss, stats)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "ProxyAnchorLoss"])
def test_pml_losses_on_the_gathered_batch_give_the_single_process_gradient(dist_results, name):
    """loss=pml:<Name>: DDP gradients of the model, the loss's own parameters (proxies) and a few
    optimiser steps equal one process on the concatenated batch; the proxies are bit-identical
    on every rank although each rank initialised them from its own random state."""
    script = _load_script()
    x, labels = script.global_batch(WORLD)
    model, objective = script.build_model(), script.build_pml(name, seed=10)  # rank 0's initial state
    loss, stats = objective(script.embed(model, x), labels)
    loss.backward()
    assert loss.item() > 0.01 and stats["num_pairs"] > 0
    expected, expected_loss_grads = _grads(model), {n: p.grad.clone() for n, p in objective.named_parameters()}
    assert bool(expected_loss_grads) == (name == "ProxyAnchorLoss")
    for rank, result in enumerate(dist_results):
        got = result[("pml", name)]
        for key, want in (("grads", expected), ("loss_grads", expected_loss_grads)):
            for n, grad in want.items():
                torch.testing.assert_close(got[key][n], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {rank}, {key} {n}: {m}")
        assert got["stats"]["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert got["stats"]["num_pairs"] == stats["num_pairs"]
        assert got["loss_for_backward"] == pytest.approx(WORLD * loss.item(), rel=1e-5)
    # The comparison has power: each rank's loss on its own half (no gather) moves the gradient.
    halves = []
    for r in range(WORLD):
        m, o = script.build_model(), script.build_pml(name, seed=10)
        mine = slice(r * script.LOCAL_BATCH, (r + 1) * script.LOCAL_BATCH)
        o(script.embed(m, x[mine]), labels[mine])[0].backward()
        halves.append(_grads(m)["2.weight"])
    assert not torch.allclose(sum(halves) / WORLD, expected["2.weight"], rtol=1e-2, atol=1e-4)

    # A few optimiser steps: the same weights and proxies as one process, identical on the ranks.
    want = script.pml_steps(script.build_model(), script.build_pml(name, seed=10), x, labels)
    steps = [result[("pml-steps", name)] for result in dist_results]
    for part in ("model", "loss"):
        for n, value in want[part].items():
            assert torch.equal(steps[0][part][n], steps[1][part][n]), f"{part} {n} differs between the ranks"
            torch.testing.assert_close(steps[0][part][n], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{part} {n}: {m}")


@pytest.mark.slow
def test_unequal_local_batches_raise_on_every_rank(dist_results):
    for result in dist_results:
        assert result["unequal_error"] is not None
        assert "same local batch size" in result["unequal_error"] and "[1, 2]" in result["unequal_error"]


def test_gather_is_identity_without_process_group():
    x = torch.randn(5, 3, requires_grad=True)
    labels = torch.arange(5)
    assert gather_with_grad(x) is x
    assert gather_labels(labels) is labels
