"""Any timm model as an embedder: ``arch=timm:<name>`` (``timm:resnet18``, ``timm:efficientnet_b0``, ...).

    backbone  timm.create_model(name, pretrained, num_classes=0, in_chans=C): pooled features (N, F)
    proj      Linear(F -> embedding_dim), output L2-normalised (N, embedding_dim)

the same interface as ZFNet and the torchvision ResNets. ``pretrained=True`` downloads timm's
weights (ImageNet, 3 channels; timm adapts the stem to ``in_chans``) on the machine that builds
the model: the training run only. A saved run is rebuilt with ``pretrained=False`` and its own
weights loaded (:func:`toolkit.artifacts.build_frozen_embedder`), so predict/evaluate/export
never touch the network.

timm is imported lazily: only a ``timm:`` arch needs it.
"""
from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F
from torch import nn

PREFIX = "timm:"


def _timm():
    try:
        import timm
    except ImportError:
        raise ImportError("a timm: arch needs the timm package: pip install timm") from None
    return timm


def timm_name(arch: str) -> str | None:
    """``"timm:resnet18"`` -> ``"resnet18"``; None when ``arch`` is not a timm arch."""
    return arch[len(PREFIX):] if arch.startswith(PREFIX) else None


def timm_arch_problem(name: str, *, pretrained: bool = False) -> str | None:
    """What is wrong with timm model ``name`` (one line, with close names), or None when timm can build it.

    ``name`` may carry a pretrained tag (``resnet18.a1_in1k``). With ``pretrained`` the model
    (and tag) must have weights timm knows how to download.
    """
    try:
        timm = _timm()
    except ImportError as exc:
        return f"{PREFIX}{name}: {exc}"
    if not name.strip():
        return f"{PREFIX} needs a model name, e.g. {PREFIX}resnet18 (timm.list_models() lists them)"
    if not timm.is_model(name):
        base = name.split(".", 1)[0]
        close = difflib.get_close_matches(base.lower(), timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(PREFIX + c for c in close)}?)" if close else " (timm.list_models() lists them)"
        return f"no timm model named {name!r}{hint}"
    if "." in name or pretrained:  # a tag names one set of weights (timm refuses an unknown tag even untrained)
        known = timm.list_pretrained()
        base = name.split(".", 1)[0]
        tags = [k for k in known if k.split(".", 1)[0] == base]
        if name not in known and not (pretrained and name == base and tags):
            hint = f" (it has: {', '.join(tags[:4])}{', ...' if len(tags) > 4 else ''})" if tags else ""
            what = "pretrained weights" if name == base else f"pretrained tag {name.split('.', 1)[1]!r}"
            fix = ": use pretrained=false" if name == base else ""
            return f"timm has no {what} for {base!r}{hint}{fix}"
    return None


def _create(timm, name: str, *, pretrained: bool, in_channels: int, input_size: int) -> nn.Module:
    kwargs = dict(pretrained=pretrained, num_classes=0, in_chans=in_channels)
    try:
        # Transformers (ViT, Swin, PiT, ...) are built for one input size: give them ours.
        return timm.create_model(name, img_size=input_size, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
    return timm.create_model(name, **kwargs)  # CNNs take any size and no img_size argument


class TimmEmbedder(nn.Module):
    """timm model ``name`` (classifier removed) + Linear to ``embedding_dim``: (N, C, S, S) -> unit-norm (N, D)."""

    def __init__(
        self,
        name: str,
        in_channels: int = 1,
        embedding_dim: int = 128,
        input_size: int = 224,
        pretrained: bool = False,
    ):
        super().__init__()
        timm = _timm()
        problem = timm_arch_problem(name, pretrained=pretrained)
        if problem:
            raise ValueError(problem)
        self.name = name
        self.in_channels = in_channels
        self.input_size = input_size
        self.embedding_dim = embedding_dim
        # toolkit.artifacts.in_channels reads a saved model's input channels from its state
        # dict's first 4-D tensor. That is the stem conv for most timm models, not for all
        # (PiT's first is its (1, D, h, w) pos_embed): this buffer, registered first, is that
        # tensor for every timm model. Its shape is the information; its value is unused.
        self.register_buffer("in_channels_marker", torch.zeros(1, in_channels, 1, 1))
        self.backbone = _create(timm, name, pretrained=pretrained, in_channels=in_channels, input_size=input_size)
        # With num_classes=0 the output is the pre-logits features: head_hidden_size wide
        # (MobileNetV3, GhostNet: a conv head after the pool widens num_features).
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.proj = nn.Linear(int(width), embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.backbone(x)), dim=1)  # (N,D), unit L2 norm
