"""The seed's modified ZFNet embedder, usable at any square input size.

Layer for layer (LReLU = LeakyReLU(0.001), every conv/linear has a bias):

    stem   conv 7x7/2 pad 3 (C->64) + BN + LReLU + maxpool 3/2 pad 1
    block  conv 1x1 (w->w) + BN + LReLU + conv 3x3 pad 1 (w->w') + BN + LReLU
           64->192, maxpool | 192->384, maxpool | 384->256 | 256->256 | 256->256, maxpool
    head   flatten + Linear(flat->4096) + BN1d + LReLU + Linear(4096->D), L2-normalised

Every stride-2 stage maps S -> (S - 1) // 2 + 1; there are five (stem conv, stem pool, three
block pools), so the flatten width is 256 * s * s with s = 7 at 220x220 (the seed: 55,085,760
parameters with one channel), s = 2 at 64x64 and s = 1 at 32x32 (native-resolution configs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NEGATIVE_SLOPE = 0.001  # the seed's LeakyReLU slope

# (in width, out width, maxpool after the block?)
BLOCKS: tuple[tuple[int, int, bool], ...] = (
    (64, 192, True),
    (192, 384, True),
    (384, 256, False),
    (256, 256, False),
    (256, 256, True),
)


def _halve(size: int) -> int:
    """Spatial size after conv 7x7/2 pad 3 or maxpool 3/2 pad 1 (same formula)."""
    return (size - 1) // 2 + 1


def feature_size(input_size: int) -> int:
    """Side of the last feature map after the five stride-2 stages (220 -> 7, 64 -> 2, 32 -> 1)."""
    size = input_size
    for _ in range(1 + 1 + sum(pool for _, _, pool in BLOCKS)):  # stem conv, stem pool, block pools
        size = _halve(size)
    return size


def _conv_bn_act(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(NEGATIVE_SLOPE),
    ]


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)


class ZFNet(nn.Module):
    """Seed ZFNet: (N, C, S, S) images -> (N, embedding_dim) unit-norm embeddings."""

    def __init__(self, in_channels: int = 1, input_size: int = 220, embedding_dim: int = 128):
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.in_channels = in_channels
        self.input_size = input_size
        self.embedding_dim = embedding_dim

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),  # (N,64,S/2,S/2)
            nn.BatchNorm2d(64),
            nn.LeakyReLU(NEGATIVE_SLOPE),
            _pool(),  # (N,64,S/4,S/4): 220 -> 55
        ]
        for c_in, c_out, pool in BLOCKS:
            layers += _conv_bn_act(c_in, c_in, 1)  # 1x1 keeps the width
            layers += _conv_bn_act(c_in, c_out, 3)  # 3x3 changes it
            if pool:
                layers.append(_pool())
        # at 220: (N,192,28,28) -> (N,384,14,14) -> (N,256,14,14) x2 -> (N,256,7,7)
        self.features = nn.Sequential(*layers)

        side = feature_size(input_size)
        self.flat_dim = 256 * side * side  # 12544 at 220, 256 at 32
        self.head = nn.Sequential(
            nn.Linear(self.flat_dim, 4096),
            nn.BatchNorm1d(4096),  # needs N > 1 in train mode
            nn.LeakyReLU(NEGATIVE_SLOPE),
            nn.Linear(4096, embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"ZFNet built for {self.input_size}x{self.input_size} inputs, "
                f"got {tuple(x.shape[-2:])}"
            )
        x = self.features(x)  # (N,256,s,s)
        x = torch.flatten(x, 1)  # (N,256*s*s); flatten copies if channels_last, view would fail
        x = self.head(x)  # (N,D)
        return F.normalize(x, dim=1)  # unit L2 norm per row


# --------------------------------------------------------------------------------------
# ResNet alternative (lives here because the models package keeps embedders in one file).

SMALL_INPUT_MAX = 64  # inputs up to this side get the CIFAR-style stem


class ResNetEmbedder(nn.Module):
    """torchvision ResNet-18/34 (random init, never downloads weights) as an embedder.

    - conv1 takes ``in_channels`` instead of 3.
    - For small inputs (``input_size <= 64``) conv1 becomes 3x3 stride 1 and the stem
      maxpool is dropped (CIFAR style): the ImageNet stem would shrink 32x32 to 8x8 before
      the first residual stage and 1x1 by the last, throwing away most of the image.
    - fc becomes Linear(512 -> embedding_dim); the output is L2-normalised.
    The adaptive average pool makes any input size work; ``input_size`` only picks the stem.
    """

    ARCHS = ("resnet18", "resnet34")

    def __init__(
        self,
        arch: str = "resnet18",
        in_channels: int = 1,
        embedding_dim: int = 128,
        input_size: int = 220,
    ):
        super().__init__()
        import torchvision  # lazy: only this embedder needs it

        if arch not in self.ARCHS:
            raise ValueError(f"unknown ResNet arch {arch!r}; known: {', '.join(self.ARCHS)}")
        self.arch = arch
        self.in_channels = in_channels
        self.input_size = input_size
        self.embedding_dim = embedding_dim
        self.small_input = input_size <= SMALL_INPUT_MAX

        net = getattr(torchvision.models, arch)(weights=None)
        if self.small_input:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        else:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Linear(net.fc.in_features, embedding_dim)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)  # (N,D), unit L2 norm
