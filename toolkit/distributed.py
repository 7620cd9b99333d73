"""Who am I among the processes, and the few collectives the toolkit uses outside the model.

Every helper works unchanged in a single process (torch.distributed not initialised, or a
world of one): then it returns at once, without a collective. Collectives must be called by
every rank at the same point; each helper says what it sends.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def any_rank(flag: bool, device) -> bool:
    """True on every rank if ``flag`` is True on any rank (one tiny all-reduce)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def float_from_main(value: float, device) -> float:
    """Rank 0's ``value`` on every rank (one tiny broadcast): one clock for all, say."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled: small objects only)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (a list in rank order); None on the other ranks."""
    if not is_distributed():
        return [obj]
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts if dist.get_rank() == 0 else None


def buffers_from_main(module: torch.nn.Module) -> None:
    """Overwrite every buffer of ``module`` (BatchNorm running statistics) with rank 0's, in place.

    Each rank updates its BatchNorm statistics from its own batches; DDP re-broadcasts rank
    0's only at the start of the next training forward. Before every rank embeds its share
    of a split in eval mode, the statistics must be rank 0's (the ones the saved model
    holds), or the shares are embedded by slightly different models.
    """
    _tensors_from_main(module.buffers())


def state_from_main(module: torch.nn.Module) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank 0's, in place: a module that
    DDP does not wrap (a loss's proxies, initialised from each rank's random state)."""
    _tensors_from_main([*module.parameters(), *module.buffers()])


def _tensors_from_main(tensors) -> None:
    if not is_distributed():
        return
    for t in tensors:
        dist.broadcast(t.data, src=0)


def from_main(obj: Any, device, group=None) -> Any:
    """``obj`` as rank 0 has it, on every rank (the broadcast is also a barrier). ``group``: a
    CPU (gloo) group such as :func:`waiting_group`'s, whose timeout then applies."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group, device=device if group is None else torch.device("cpu"))
    return box[0]


def waiting_group(timeout_s: float):
    """A gloo group of every rank with its own timeout, for the waits on work rank 0 does alone
    (the default group's timeout, collective_timeout_s, is for ranks in lockstep). A
    collective: every rank creates it, at the same point. None when not distributed."""
    if not is_distributed():
        return None
    from datetime import timedelta

    return dist.new_group(backend="gloo", timeout=timedelta(seconds=float(timeout_s)))
