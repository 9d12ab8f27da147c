"""Batched data augmentation on the training device: one random affine (and optional elastic) warp per image,
applied to the whole batch with a single `affine_grid` + `grid_sample`. No per-sample Python.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mnistlab.config import AugmentConfig


def is_active(config: AugmentConfig) -> bool:
    return any((config.rotate, config.scale, config.shear, config.translate, config.elastic_alpha, config.flip))


def _uniform(n: int, bound: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=generator, device=device) * 2 - 1) * bound


def augment_batch(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator, share: tuple[int, int] | None = None
) -> torch.Tensor:
    """Randomly warp float images (B, 28, 28) in [0, 1]; the result stays in [0, 1] with a black background.

    Each image gets its own rotation, scale, shear and translation (uniform within the configured bounds), and
    with `flip` a left-right mirror half of the time.
    The matrix maps output coordinates to input ones, which is what `affine_grid` wants; the distributions
    are symmetric, so sampling the inverse transform is as good as sampling the transform.

    `share = (start, total)`: `images` are rows start... of a batch of `total` (one rank's share in distributed
    training); the random draws are made for the whole batch and this share's are used, so the images get the
    very warps they would get in one process.
    """
    rows = slice(None) if share is None else slice(share[0], share[0] + len(images))
    _, h, w = images.shape
    b = len(images) if share is None else share[1]
    dev = images.device
    angle = _uniform(b, math.radians(config.rotate), generator, dev)
    shear = _uniform(b, math.radians(config.shear), generator, dev)
    scale = 1 + _uniform(b, config.scale, generator, dev)
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size.
    tx = _uniform(b, config.translate * 2 / w, generator, dev)
    ty = _uniform(b, config.translate * 2 / h, generator, dev)
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
    theta = torch.stack(
        [
            torch.stack([scale * cos, scale * (cos * tan - sin), tx], 1),
            torch.stack([scale * sin, scale * (sin * tan + cos), ty], 1),
        ],
        1,
    )
    if config.flip:  # a mirror image is the same warp with the output's x negated: no extra pass
        theta[:, :, 0] *= torch.where(torch.rand(b, generator=generator, device=dev) < 0.5, -1.0, 1.0)[:, None]
    grid = F.affine_grid(theta[rows], [len(images), 1, h, w], align_corners=False)
    if config.elastic_alpha:
        grid = grid + _elastic_field(b, h, w, config, generator, dev, rows)
    out = F.grid_sample(images.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(1).clamp_(0, 1)


def _elastic_field(
    b: int, h: int, w: int, config: AugmentConfig, generator: torch.Generator, dev: torch.device, rows: slice
) -> torch.Tensor:
    """Smooth random displacements (Simard et al. 2003): uniform noise blurred by a Gaussian, in grid units,
    drawn for the `b` images of the batch and returned for `rows`."""
    noise = (torch.rand(b, 2, h, w, generator=generator, device=dev) * 2 - 1)[rows]
    radius = max(1, round(3 * config.elastic_sigma))
    xs = torch.arange(-radius, radius + 1, device=dev, dtype=noise.dtype)
    kernel = torch.exp(-(xs**2) / (2 * config.elastic_sigma**2))
    kernel = kernel / kernel.sum()
    # Separable blur: rows then columns, both displacement channels at once (grouped convolution).
    noise = F.conv2d(noise, kernel.view(1, 1, 1, -1).expand(2, 1, 1, -1), padding=(0, radius), groups=2)
    noise = F.conv2d(noise, kernel.view(1, 1, -1, 1).expand(2, 1, -1, 1), padding=(radius, 0), groups=2)
    noise = noise / noise.abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-8)  # peak displacement = alpha
    scale = torch.tensor([2 * config.elastic_alpha / w, 2 * config.elastic_alpha / h], device=dev)
    return noise.permute(0, 2, 3, 1) * scale
