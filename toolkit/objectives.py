"""The training objective: the built-in semi-hard triplet loss, or any pytorch-metric-learning loss.

Both run on the *global* batch (every rank's embeddings, all-gathered) and are gradient-exact
under data parallelism: W ranks give the update of one process on the concatenated batch.

- ``loss=triplet`` (default, :class:`TripletObjective`): toolkit/losses.py. Each rank mines
  only its own anchors against the gathered batch (1/W of the mining per rank), the fastest.
- ``loss=pml:<LossName>`` (:class:`PMLObjective`), optionally with ``miner=pml:<MinerName>``:
  every rank runs the same loss L (and miner) on the whole gathered batch, where only its own
  slice carries a gradient (:func:`~toolkit.losses.gather_with_grad`), and backpropagates W·L.
  DDP's gradient average (1/W)·Σ_r W·dL/de_r·de_r/dθ is then dL/dθ, as for the triplet loss.
  A loss with parameters of its own (ProxyAnchorLoss's proxies, ArcFace's class centres) sees
  the whole batch on every rank, so each rank's gradient of W·L is W·dL/dP:
  :meth:`PMLObjective.sync_grads` divides by W and averages it over the ranks, which keeps the
  parameters identical everywhere (they are outside DDP). Every rank pays the whole loss,
  W times the built-in's per-rank share.

Names and keyword arguments come from the config, i.e. from a file or a command line: a name
must be a loss (miner) class exported by pytorch-metric-learning, keyword values are plain
YAML scalars or lists, and ``distance`` / ``reducer`` / ``embedding_regularizer`` /
``weight_regularizer`` may name a class of PML's distances / reducers / regularizers (``loss_kwargs={distance: CosineSimilarity}``).
Nothing else is looked up or run. :func:`objective_problem` tries the loss once on a small
batch when the config is loaded, so a wrong name, keyword or value is one line before any work.
"""
from __future__ import annotations

import difflib
import inspect

import torch
import torch.distributed as dist
from torch import nn

from toolkit.distributed import world
from toolkit.losses import distributed_triplet_loss, gather_labels, gather_with_grad

PML_PREFIX = "pml:"
BUILTIN_LOSSES = ("triplet",)
# Bases and wrappers PML exports beside its losses, and losses that need more than labelled
# embeddings (a second view, or another loss object).
_NOT_LOSSES = frozenset({"BaseMetricLossFunction", "GenericPairLoss", "BaseLossWrapper", "CrossBatchMemory",
                         "MultipleLosses", "SelfSupervisedLoss", "VICRegLoss"})
_NOT_MINERS = frozenset({"BaseMiner", "EmbeddingsAlreadyPackagedAsTriplets"})
# keyword -> the PML module whose classes it may name, and their base class there
_OBJECT_KWARGS = {"distance": ("distances", "BaseDistance"), "reducer": ("reducers", "BaseReducer"),
                  "embedding_regularizer": ("regularizers", "BaseRegularizer"),
                  "weight_regularizer": ("regularizers", "BaseRegularizer")}


class TripletObjective(nn.Module):
    """The built-in loss (margin, mining strategy, squared distances): see toolkit/losses.py."""

    def __init__(self, *, margin: float = 0.2, mining: str = "semihard", squared: bool = False):
        super().__init__()
        self.margin, self.mining, self.squared = margin, mining, squared

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(loss to backpropagate, stats): stats["loss"] is the global-batch loss on every rank."""
        return distributed_triplet_loss(embeddings, labels, margin=self.margin, strategy=self.mining, squared=self.squared)

    def sync_grads(self) -> None:
        """Nothing to do: the triplet loss has no parameters."""


class PMLObjective(nn.Module):
    """A pytorch-metric-learning loss (and miner) on the gathered global batch; see the module docstring."""

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None):
        super().__init__()
        self.loss, self.miner = loss, miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(W·L to backpropagate, stats) with L the loss of the whole gathered batch (logged as stats["loss"])."""
        _, world_size = world()
        with torch.autocast(device_type=embeddings.device.type, enabled=False):  # PML's distances in float32
            emb = gather_with_grad(embeddings.float())  # (W·B, D), this rank's slice differentiable
            all_labels = gather_labels(labels.to(emb.device))  # (W·B,)
            mined = self.miner(emb, all_labels) if self.miner is not None else None
            loss = self.loss(emb, all_labels, mined)
        if mined is not None:
            num_pairs = int(mined[0].numel())  # the triplets (or positive pairs) the miner kept
        else:
            counts = torch.unique(all_labels, return_counts=True)[1]
            num_pairs = int((counts * (counts - 1)).sum())  # ordered positive pairs of the batch
        return loss * world_size, {"loss": float(loss.detach()), "num_pairs": num_pairs}

    def sync_grads(self) -> None:
        """After backward: the loss's own parameters get dL/dP, the same on every rank (one all-reduce)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        _, world_size = world()
        if not grads or world_size == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)  # sum of W identical copies of W·dL/dP: W²·dL/dP
        flat /= world_size * world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _classes(module, base, excluded=frozenset()) -> list[str]:
    """Names of the classes ``module`` exports that subclass ``base`` (not its ``Base*`` ones, nor ``excluded``)."""
    return sorted(n for n, c in vars(module).items()
                  if inspect.isclass(c) and issubclass(c, base) and not n.startswith("Base") and n not in excluded)


def _pml_class(kind: str, name: str):
    """The PML class ``name`` of ``kind`` ("losses" or "miners"), or a one-line problem (str)."""
    from pytorch_metric_learning import losses, miners

    module, base, excluded = ((losses, losses.BaseMetricLossFunction, _NOT_LOSSES) if kind == "losses"
                              else (miners, miners.BaseMiner, _NOT_MINERS))
    known = _classes(module, base, excluded)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else f"; one of {', '.join(known)}"
        return f"{name!r} is not a pytorch-metric-learning {_KIND[kind]} usable here{hint}"
    return getattr(module, name)


_KIND = {"losses": "loss", "miners": "miner"}


def _keywords(cls) -> list[str]:
    """The keyword arguments ``cls(...)`` accepts, through the ``**kwargs`` its bases pass on."""
    names: list[str] = []
    for klass in cls.__mro__:
        if klass is nn.Module or "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(vars(klass)["__init__"]).parameters.values())[1:]  # not self
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def _pml_kwargs(kwargs: dict, *, what: str) -> dict:
    """``kwargs`` with the names of PML distances / reducers / regularizers built into objects."""
    import pytorch_metric_learning

    out = {}
    for key, value in kwargs.items():
        if key in _OBJECT_KWARGS and isinstance(value, str):
            module_name, base_name = _OBJECT_KWARGS[key]
            module = getattr(pytorch_metric_learning, module_name)
            base = getattr(module, base_name)
            cls = getattr(module, value, None) if value.isidentifier() else None
            if not (inspect.isclass(cls) and issubclass(cls, base)):
                known = _classes(module, base)
                raise ValueError(f"{what}: {key}={value!r} is not one of pytorch_metric_learning.{module_name}: {', '.join(known)}")
            value = cls()
        out[key] = value
    return out


def _build(kind: str, spec: str, kwargs: dict, *, num_classes: int, embedding_dim: int, what: str):
    cls = _pml_class(kind, spec[len(PML_PREFIX):])
    if isinstance(cls, str):
        raise ValueError(f"{what}: {cls}")
    accepted = _keywords(cls)
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{what}: {cls.__name__} takes no {key!r} ({hint}it takes {', '.join(accepted)})")
    kwargs = _pml_kwargs(kwargs, what=what)
    params = inspect.signature(cls.__init__).parameters
    # The classes and the embedding width come from the shards and the model, not the user.
    for key, value in (("num_classes", num_classes), ("embedding_size", embedding_dim)):
        if key in params and key not in kwargs:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except Exception as exc:  # noqa: BLE001 - any constructor complaint is a config problem
        raise ValueError(f"{what}: {spec}({_show(kwargs)}) failed: {type(exc).__name__}: {exc}") from None


def _show(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" if not isinstance(v, nn.Module) else f"{k}={type(v).__name__}" for k, v in kwargs.items())


def build_objective(*, loss: str = "triplet", loss_kwargs: dict | None = None, miner: str = "", miner_kwargs: dict | None = None,
                    margin: float = 0.2, mining: str = "semihard", squared: bool = False, num_classes: int = 2,
                    embedding_dim: int = 128) -> nn.Module:
    """The objective a config names; raises ValueError with one line for a bad name or argument.

    ``num_classes`` and ``embedding_dim`` fill the ``num_classes`` / ``embedding_size`` of a
    proxy-based loss (ProxyAnchorLoss, ArcFaceLoss, ...) unless ``loss_kwargs`` sets them.
    """
    if loss == "triplet":
        return TripletObjective(margin=margin, mining=mining, squared=squared)
    if not loss.startswith(PML_PREFIX):
        raise ValueError(f"loss: {loss!r} is not one of {', '.join(BUILTIN_LOSSES)}, {PML_PREFIX}<LossName>")
    built_loss = _build("losses", loss, dict(loss_kwargs or {}), num_classes=num_classes, embedding_dim=embedding_dim, what="loss")
    built_miner = None
    if miner:
        if not miner.startswith(PML_PREFIX):
            raise ValueError(f"miner: {miner!r} is not {PML_PREFIX}<MinerName>")
        built_miner = _build("miners", miner, dict(miner_kwargs or {}), num_classes=num_classes,
                             embedding_dim=embedding_dim, what="miner")
    return PMLObjective(built_loss, built_miner)


def objective_problem(*, loss: str, loss_kwargs: dict, miner: str, miner_kwargs: dict, embedding_dim: int) -> str | None:
    """Why the config's objective cannot train (one line), or None: builds it and runs it once on
    a small labelled batch (4 classes × 4, unit vectors), forward and backward, on CPU."""
    try:
        objective = build_objective(loss=loss, loss_kwargs=loss_kwargs, miner=miner, miner_kwargs=miner_kwargs,
                                    num_classes=4, embedding_dim=embedding_dim)
    except ValueError as exc:
        return str(exc)
    if isinstance(objective, TripletObjective):
        return None
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(16, embedding_dim, generator=g), dim=1).requires_grad_()
    labels = torch.arange(4).repeat_interleave(4)
    try:
        with torch.enable_grad():
            value, _ = objective(emb, labels)
            value.backward()
    except Exception as exc:  # noqa: BLE001 - whatever PML raises on this input is the user's answer
        message = str(exc).splitlines()[0] if str(exc) else ""
        return f"loss={loss}{' miner=' + miner if miner else ''} cannot train on labelled embeddings: {type(exc).__name__}: {message}"
    if not torch.isfinite(value):
        return f"loss={loss} gives a non-finite loss ({float(value)}) on a small labelled batch: check loss_kwargs"
    return None
