"""Cross-process triplet mining under DDP, launched by tests/test_losses_distributed.py:

    torchrun --nproc_per_node 2 --master_port PORT tests/dist_scripts/grad_equality.py OUT_DIR

Each rank embeds its half of a fixed global batch with an identical model wrapped in
DistributedDataParallel (gloo, CPU), backpropagates `distributed_triplet_loss` and writes
OUT_DIR/rank{R}.pt: per strategy the (DDP-averaged) parameter gradients and the stats. The
test compares them with one process computing `triplet_loss` on the concatenated batch,
using `build_model`, `embed` and `global_batch` from this file.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root, for `toolkit`
from toolkit.losses import distributed_triplet_loss, gather_with_grad  # noqa: E402

STRATEGIES = ("semihard", "hard", "all")
LOCAL_BATCH = 24
NUM_CLASSES = 6
MARGIN = 0.2


def build_model() -> nn.Module:
    """Same weights on every call (and every rank); no BatchNorm, so no cross-sample state."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(model(x), dim=1)  # (B, 16) unit rows


def global_batch(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W * LOCAL_BATCH, 32) inputs and labels, NUM_CLASSES equal classes, shuffled so every
    rank's slice mixes classes (and positives of an anchor often live on another rank)."""
    n = world_size * LOCAL_BATCH
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 32, generator=g)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(n // NUM_CLASSES)
    return x, labels[torch.randperm(n, generator=g)]


def uneven_labels(world_size: int, case: str) -> torch.Tensor:
    """Labels of the global batch (rank-major) whose ranks hold different numbers of pairs.

    "uneven": rank 0 holds 4 classes x 6; every other rank one image of each of those classes
    (their positives are all remote) and singletons. "zero": the other ranks hold singletons
    only, so their anchors have no pair at all (their loss share is 0, their gradient is not).
    """
    first = torch.arange(4).repeat_interleave(LOCAL_BATCH // 4)
    rest = []
    for r in range(1, world_size):
        singletons = 100 * r + torch.arange(LOCAL_BATCH)
        rest.append(torch.cat([torch.arange(4), singletons[4:]]) if case == "uneven" else singletons)
    return torch.cat([first, *rest])


UNEVEN_CASES = ("uneven", "zero")
# loss=..., miner=..., loss_kwargs: one pair-based loss with its miner, one proxy-based loss
PML_CASES = {
    "MultiSimilarityLoss": {"loss": "pml:MultiSimilarityLoss", "miner": "pml:MultiSimilarityMiner",
                            "miner_kwargs": {"epsilon": 0.5}},
    "ProxyAnchorLoss": {"loss": "pml:ProxyAnchorLoss", "loss_kwargs": {"margin": 0.1, "alpha": 32}, "loss_lr": 0.05},
}
PML_STEPS, PML_LR = 3, 0.01


def build_pml(name: str, seed: int):
    """The objective training builds for PML_CASES[name] (toolkit.engine.embed.make_objective),
    its parameters initialised from ``seed`` (then rank 0's, under a process group)."""
    from toolkit.config import EmbedConfig
    from toolkit.engine.embed import make_objective

    torch.manual_seed(seed)
    cfg = EmbedConfig(embedding_dim=16, **{k: v for k, v in PML_CASES[name].items() if k != "loss_lr"})
    return make_objective(cfg, num_classes=NUM_CLASSES, device=torch.device("cpu"))


def pml_steps(model, objective, x, labels) -> dict:
    """PML_STEPS Adam steps on (x, labels) as training takes them (model, then the loss's own
    parameters at their own rate); the final weights of both."""
    groups = [{"params": list(model.parameters())}]
    if list(objective.parameters()):
        groups.append({"params": list(objective.parameters()), "lr": PML_CASES[type(objective.loss).__name__].get("loss_lr", PML_LR)})
    opt = torch.optim.Adam(groups, lr=PML_LR)
    for _ in range(PML_STEPS):
        loss, _ = objective(embed(model, x), labels)
        loss.backward()
        objective.sync_grads()
        opt.step()
        opt.zero_grad()
    inner = getattr(model, "module", model)
    return {"model": {n: p.detach().clone() for n, p in inner.named_parameters()},
            "loss": {n: p.detach().clone() for n, p in objective.named_parameters()}}


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    x, labels = global_batch(world_size)
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)

    result = {}
    for strategy in STRATEGIES:
        model = DDP(build_model())  # DDP averages gradients across ranks in backward
        loss, stats = distributed_triplet_loss(
            embed(model, x[mine]), labels[mine], margin=MARGIN, strategy=strategy
        )
        loss.backward()
        result[strategy] = {
            "grads": {name: p.grad.clone() for name, p in model.module.named_parameters()},
            "stats": stats,
            "loss_for_backward": loss.item(),
        }

    # Ranks holding different numbers of pairs (own-anchor mining normalises by the global
    # count), and both anchor modes.
    for case in UNEVEN_CASES:
        y = uneven_labels(world_size, case)
        for strategy in STRATEGIES:
            for anchors in ("own", "all"):
                model = DDP(build_model())
                loss, stats = distributed_triplet_loss(
                    embed(model, x[mine]), y[mine], margin=MARGIN, strategy=strategy, anchors=anchors
                )
                loss.backward()
                result[(case, strategy, anchors)] = {
                    "grads": {name: p.grad.clone() for name, p in model.module.named_parameters()},
                    "stats": stats,
                    "loss_for_backward": loss.item(),
                }

    # pytorch-metric-learning losses on the gathered batch (toolkit/objectives.py), built the
    # way training builds them: each rank initialises the loss from its own random state and
    # make_objective gives every rank rank 0's parameters.
    for name in PML_CASES:
        model = DDP(build_model())
        objective = build_pml(name, seed=10 + rank)
        loss, stats = objective(embed(model, x[mine]), labels[mine])
        loss.backward()
        objective.sync_grads()
        result[("pml", name)] = {
            "grads": {n: p.grad.clone() for n, p in model.module.named_parameters()},
            "loss_grads": {n: p.grad.clone() for n, p in objective.named_parameters()},
            "stats": stats, "loss_for_backward": loss.item(),
        }
        model, objective = DDP(build_model()), build_pml(name, seed=10 + rank)
        result[("pml-steps", name)] = pml_steps(model, objective, x[mine], labels[mine])

    # Unequal local batches must raise on every rank (not hang in the collective).
    try:
        gather_with_grad(torch.zeros(rank + 1, 4))
        result["unequal_error"] = None
    except ValueError as err:
        result["unequal_error"] = str(err)

    torch.save(result, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
