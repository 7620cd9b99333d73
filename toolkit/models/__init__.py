"""Embedders (seed ZFNet, ResNet-18/34, any timm model) and the classifier head, with ``build_*`` factories."""
from __future__ import annotations

from torch import nn

from .heads import ClassifierHead
from .timm_backbone import PREFIX as TIMM_PREFIX, TimmEmbedder, timm_arch_problem, timm_name
from .zfnet import ZFNet, ResNetEmbedder, feature_size

ARCHS = ("zfnet", "resnet18", "resnet34")  # built in; "timm:<name>" builds any timm model (TimmEmbedder)

__all__ = [
    "ARCHS",
    "ClassifierHead",
    "ResNetEmbedder",
    "TIMM_PREFIX",
    "TimmEmbedder",
    "ZFNet",
    "build_embedder",
    "build_head",
    "count_parameters",
    "feature_size",
    "timm_arch_problem",
    "timm_name",
]


def build_embedder(
    *,
    arch: str = "zfnet",
    in_channels: int = 1,
    input_size: int = 220,
    embedding_dim: int = 128,
    pretrained: bool = False,
) -> nn.Module:
    """Embedder mapping (N, in_channels, input_size, input_size) to unit-norm (N, embedding_dim).

    ``arch``: one of :data:`ARCHS`, or ``timm:<name>`` for timm model ``name``. ``pretrained``
    (timm archs only) downloads timm's weights; rebuilding a saved model leaves it False and
    loads the saved weights instead.
    """
    name = timm_name(arch)
    if name is not None:
        return TimmEmbedder(
            name, in_channels=in_channels, embedding_dim=embedding_dim, input_size=input_size, pretrained=pretrained
        )
    if pretrained:
        raise ValueError(f"pretrained=True needs a {TIMM_PREFIX}<name> arch; {arch!r} is always randomly initialised")
    if arch == "zfnet":
        return ZFNet(in_channels=in_channels, input_size=input_size, embedding_dim=embedding_dim)
    if arch in ResNetEmbedder.ARCHS:
        return ResNetEmbedder(
            arch=arch, in_channels=in_channels, embedding_dim=embedding_dim, input_size=input_size
        )
    raise ValueError(f"unknown arch {arch!r}; known archs: {', '.join(ARCHS)}, {TIMM_PREFIX}<timm model name>")


def build_head(
    *,
    embedding_dim: int = 128,
    hidden: int = 64,
    num_classes: int,
    dropout: float = 0.5,
) -> ClassifierHead:
    """The seed's classifier head: embeddings -> log-probabilities over ``num_classes``."""
    return ClassifierHead(
        embedding_dim=embedding_dim, hidden=hidden, num_classes=num_classes, dropout=dropout
    )


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
