"""Image transforms on the device: the seed's preprocessing as batched tensor maths, and augmentation.

The seed ran ``Resize(220) -> ToTensor() -> Normalize(0.5, 0.5)`` with PIL on every image,
in the data workers. Here shards already hold small preprocessed images (e.g. 32×32 grey),
the loader ships uint8 tensors, and :func:`to_model_input` converts, normalises and (for the
seed recipe) upsamples on the device -- on a GPU that is almost free, and it keeps worker-to-
trainer traffic 4× (uint8) to 190× (32² vs 220² floats) smaller. :func:`random_affine`
augments on the device too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MEAN, STD = 0.5, 0.5


def to_model_input(images: torch.Tensor, *, input_size: int, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised float (B, C, input_size, input_size) on images' device.

    Bilinear resize without antialias equals torchvision's Resize when upsampling (the seed
    upsamples 32 -> 220); normalisation commutes with the (linear) interpolation.
    """
    x = images.float().div_(255.0).sub_(MEAN).div_(STD)  # (B, C, H, W) in [-1, 1]
    if x.shape[-1] != input_size or x.shape[-2] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=False)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def random_affine(
    x: torch.Tensor,
    *,
    degrees: float = 10.0,
    translate: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random rotation/translation/scale per image, on the device (one grid_sample call).

    ``x``: normalised float (B, C, H, W). Borders are filled with the background value -1
    (black after Normalize(0.5, 0.5)), which suits dark-background character images.
    """
    b = x.shape[0]
    opts = {"device": x.device, "dtype": x.dtype}
    u = torch.rand(b, 4, generator=generator, device="cpu").to(**opts)  # (B, 4) in [0, 1)
    angle = (u[:, 0] * 2 - 1) * degrees * torch.pi / 180
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    tx, ty = (u[:, 2] * 2 - 1) * translate * 2, (u[:, 3] * 2 - 1) * translate * 2  # grid units span 2
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1

