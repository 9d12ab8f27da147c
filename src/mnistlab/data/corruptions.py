"""MNIST-C's 15 corruptions (Mu and Gilmer 2019), generated from a test set with a seeded generator.

Each corruption takes uint8 images (N, 28, 28) on the CPU and returns uint8 images of the same shape, at the
severity MNIST-C published (the defaults in its `corruptions.py`). The original ran per image through
scikit-image, SciPy, ImageMagick and OpenCV; here each one is a few whole-batch torch operations, with every
random parameter drawn per image from one `torch.Generator`, so the same seed gives the same images.
docs/robustness.md lists where a generator differs from the original.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mnistlab.errors import MnistlabError

Corruption = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
SIZE = 28
CENTRE = (SIZE - 1) / 2  # MNIST-C's affine corruptions keep the pixel (13.5, 13.5) fixed


# ---------------------------------------------------------------------------------------------- helpers


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.to(torch.float64) / 255.0


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round_().to(torch.uint8)


def _uniform(shape: tuple[int, ...], low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low


def _signs(n: int, gen: torch.Generator) -> torch.Tensor:
    """-1 or +1 per image, as MNIST-C's `np.random.choice([-1, 1])`."""
    return torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1


def _gaussian_blur(x: torch.Tensor, sigma: float, mode: str = "replicate", axes: tuple[int, ...] = (1, 2)):
    """SciPy's `gaussian_filter` (truncate 4) over `axes` of (N, H, W): mode "replicate" is its "nearest",
    "constant" its zero padding."""
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * offsets**2 / sigma**2)
    kernel = kernel / kernel.sum()
    out = x.unsqueeze(1)
    for axis in axes:
        if axis == 1:
            pad, weight = (0, 0, radius, radius), kernel.view(1, 1, -1, 1)
        else:
            pad, weight = (radius, radius, 0, 0), kernel.view(1, 1, 1, -1)
        out = F.conv2d(F.pad(out, pad, mode=mode), weight)
    return out.squeeze(1)


def _warp(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """scikit-image's `warp(x, inverse_map)` for affine maps, bilinear with zeros outside: `matrix` (N, 2, 2)
    maps an output pixel's (column, row) to the input's, about the centre pixel (13.5, 13.5)."""
    n = len(x)
    translation = CENTRE * (1 - matrix.sum(2))  # keeps (13.5, 13.5) fixed, as MNIST-C computed it
    theta = torch.cat([matrix, translation.unsqueeze(2)], 2)
    # affine_grid with align_corners=True works in [-1, 1] where -1 and 1 are the centres of the edge pixels,
    # so pixel coordinates p map to p / 13.5 - 1; conjugate the pixel-space matrix by that.
    to_norm = torch.tensor([[1 / CENTRE, 0, -1], [0, 1 / CENTRE, -1], [0, 0, 1]], dtype=x.dtype)
    to_pixels = torch.linalg.inv(to_norm)
    full = torch.cat([theta, torch.tensor([[[0, 0, 1]]], dtype=x.dtype).expand(n, 1, 3)], 1)
    norm_theta = (to_norm @ full @ to_pixels)[:, :2]
    grid = F.affine_grid(norm_theta, [n, 1, SIZE, SIZE], align_corners=True)
    return F.grid_sample(x.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=True).squeeze(1)


def _lines(c0: torch.Tensor, r0: torch.Tensor, c1: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """MNIST-C's `line_from_points` for a batch of segments (N,): a soft line of about two pixels each side,
    brightness log(1 - d / 2.3) + 1 at distance d, kept between the columns floor(c0) and ceil(c1)."""
    cols = torch.arange(SIZE, dtype=torch.float64)
    rows = torch.arange(SIZE, dtype=torch.float64)
    vertical = c1 == c0
    slope = (r1 - r0) / torch.where(vertical, torch.ones_like(c1), c1 - c0)
    centre = slope[:, None] * (cols[None, :] - c0[:, None]) + r0[:, None]  # (N, columns)
    dist = (rows[None, :, None] - centre[:, None, :]).abs().clamp(max=2.3 - 1e-10)
    line = (torch.log(1 - dist / 2.3) + 1).clamp(0, 1)
    kept = (cols[None, :] >= c0.floor()[:, None]) & (cols[None, :] < c1.ceil()[:, None]) & ~vertical[:, None]
    return line * kept[:, None, :]


# ---------------------------------------------------------------------------------------------- noise


def shot_noise(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Poisson noise with 3 photons at full intensity (MNIST-C severity 5)."""
    rate = 3.0
    return _to_uint8(torch.poisson(_to_unit(images) * rate, generator=gen) / rate)


def impulse_noise(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Salt and pepper: 17% of the pixels set to black or white, half each (severity 4)."""
    x = _to_unit(images)
    flipped = torch.rand(x.shape, generator=gen) < 0.17
    salted = torch.rand(x.shape, generator=gen) < 0.5
    return _to_uint8(torch.where(flipped, salted.to(x.dtype), x))


# ---------------------------------------------------------------------------------------------- blur


def glass_blur(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, shuffle neighbouring pixels twice over the image, blur again (severity 1: sigma 0.7, reach 1).

    As in MNIST-C, each blur runs down the columns only (scikit-image's `gaussian(..., multichannel=True)` on
    a 2-D image treats its last axis as channels), the first result is truncated to uint8, and the swaps run
    in sequence from the bottom-right corner, each moving a pixel up and/or left with probability 1/2, so
    pixels can drift several places. The sequence is kept (1,352 steps), each step batched over all images.
    """
    sigma, iterations = 0.7, 2
    x = (_gaussian_blur(_to_unit(images), sigma, axes=(1,)) * 255).floor_()
    n = len(x)
    positions = range(SIZE - 1, 1, -1)
    steps = iterations * len(positions) ** 2
    swap = torch.rand((steps, n), generator=gen) < 0.5
    # numpy's randint(-1, 1) draws -1 or 0: a swap goes up and/or left, or stays.
    moves = torch.randint(-1, 1, (steps, 2, n), generator=gen)
    everyone = torch.arange(n)
    step = 0
    for _ in range(iterations):
        for h in positions:
            for w in positions:
                here = x[:, h, w].clone()
                dy, dx = moves[step]
                there = x[everyone, h + dy, w + dx]
                x[:, h, w] = torch.where(swap[step], there, here)
                x[everyone, h + dy, w + dx] = torch.where(swap[step], here, there)
                step += 1
    return _to_uint8(_gaussian_blur(x / 255, sigma, axes=(1,)))


def motion_blur(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """ImageMagick's one-sided motion blur (radius 10, sigma 3, severity 1) at an angle uniform in [-45, 45]
    degrees: each pixel averages the 21 pixels along the angle with Gaussian weights, edges repeated."""
    radius, sigma = 10, 3.0
    width = 2 * radius + 1
    x = _to_unit(images)
    n = len(x)
    taps = torch.arange(width, dtype=torch.float64)
    weights = torch.exp(-(taps**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    angle = torch.deg2rad(_uniform((n,), -45, 45, gen))
    # ImageMagick rounds each tap's offset with ceil(v - 0.5).
    dx = torch.ceil(taps[None, :] * torch.cos(angle)[:, None] - 0.5).long()
    dy = torch.ceil(taps[None, :] * torch.sin(angle)[:, None] - 0.5).long()
    pad = width - 1
    padded = F.pad(x.unsqueeze(1), (pad, pad, pad, pad), mode="replicate").flatten(1)
    side = SIZE + 2 * pad
    rows = torch.arange(SIZE).view(SIZE, 1) + pad
    cols = torch.arange(SIZE).view(1, SIZE) + pad
    out = torch.zeros(n, SIZE * SIZE, dtype=x.dtype)
    for i in range(width):
        index = (rows + dy[:, i, None, None]) * side + cols + dx[:, i, None, None]
        out += weights[i] * padded.gather(1, index.view(n, -1))
    return _to_uint8(out.view(n, SIZE, SIZE))


# ---------------------------------------------------------------------------------------------- geometry


def shear(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Horizontal shear by 0.4 rad (scikit-image's AffineTransform(shear=0.4)), either direction (severity 2)."""
    s = 0.4 * _signs(len(images), gen)
    matrix = torch.zeros(len(images), 2, 2, dtype=torch.float64)
    matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 1, 1] = 1, -torch.sin(s), torch.cos(s)
    return _to_uint8(_warp(_to_unit(images), matrix))


def scale(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shrunk to 70% about the centre (severity 3)."""
    matrix = torch.eye(2, dtype=torch.float64).expand(len(images), 2, 2) / 0.7
    return _to_uint8(_warp(_to_unit(images), matrix))


def rotate(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Rotated by 0.4 rad (about 23 degrees) about the centre, either direction (severity 2)."""
    a = 0.4 * _signs(len(images), gen)
    cos, sin = torch.cos(a), torch.sin(a)
    matrix = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    return _to_uint8(_warp(_to_unit(images), matrix))


def translate(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shifted 3 pixels along each axis, each direction chosen at random (severity 3)."""
    n = len(images)
    shift = 3 * torch.stack([_signs(n, gen), _signs(n, gen)], 1)  # (dx, dy): the output samples input + shift
    x = F.pad(_to_unit(images), (3, 3, 3, 3))
    rows = torch.arange(SIZE).view(1, SIZE, 1) + 3 + shift[:, 1].long().view(n, 1, 1)
    cols = torch.arange(SIZE).view(1, 1, SIZE) + 3 + shift[:, 0].long().view(n, 1, 1)
    return _to_uint8(x[torch.arange(n).view(n, 1, 1), rows, cols])


# ---------------------------------------------------------------------------------------------- brightness, occlusion


def brightness(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """+0.5 on HSV value (severity 5); for grey pixels that is adding 0.5 and clipping."""
    return _to_uint8(_to_unit(images) + 0.5)


def stripe(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The left and right quarters (7 columns each) inverted."""
    out = images.clone()
    out[:, :, :7] = 255 - out[:, :, :7]
    out[:, :, 21:] = 255 - out[:, :, 21:]
    return out


def _plasma(n: int, gen: torch.Generator, size: int = 256, decay: float = 1.4) -> torch.Tensor:
    """MNIST-C's diamond-square plasma fractal (N, size, size) in [0, 1]: noise wibble * U(-wibble, wibble),
    wibble starting at 100 and divided by `decay` per level, wrapping around the edges as its np.roll does.

    Where the original writes each level into strided slices of one map, this keeps the level's four grids
    (corners, square centres, left and top diamond points) and interleaves them into the next level's corners:
    the same numbers, about 3x faster (whole contiguous tensors instead of strided writes).
    """
    corners = torch.zeros(n, 1, 1)
    wibble = 100.0

    def noisy_mean(total: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(total.shape, generator=gen).mul_(2 * wibble).sub_(wibble).mul_(wibble)
        return noise.add_(total, alpha=0.25)

    while corners.shape[1] < size:
        squares = corners + corners.roll(-1, 1)
        centres = noisy_mean(squares + squares.roll(-1, 2))
        left = noisy_mean(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        top = noisy_mean(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        k = corners.shape[1]
        # Row 2i holds corners and left points, row 2i + 1 top points and centres.
        corners = torch.stack([torch.stack([corners, left], 3), torch.stack([top, centres], 3)], 2)
        corners = corners.view(n, 2 * k, 2 * k)
        wibble /= decay
    corners -= corners.amin((1, 2), keepdim=True)
    return corners / corners.amax((1, 2), keepdim=True)


def fog(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A plasma fractal (its top-left 28x28 of 256x256) times 3 added, then rescaled (severity 5)."""
    strength, chunk = 3.0, 64  # a 256x256 map per image: chunks bound the memory (about 100 MB)
    x = _to_unit(images)
    plasma = torch.cat([_plasma(len(x[i : i + chunk]), gen)[:, :SIZE, :SIZE] for i in range(0, len(x), chunk)])
    peak = x.amax((1, 2), keepdim=True)
    return _to_uint8((x + strength * plasma.to(x.dtype)) * peak / (peak + strength))


def spatter(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mud: blobs from thresholded, blurred Gaussian noise, painted dark grey (63) over the image (severity 4)."""
    x = _to_unit(images)
    liquid = _gaussian_blur(torch.randn(x.shape, generator=gen, dtype=x.dtype) * 0.3 + 0.65, 1.0)
    mask = _gaussian_blur((liquid > 0.65).to(x.dtype), 1.5)
    mask = torch.where(mask < 0.8, 0.0, mask)
    return _to_uint8(x * (1 - mask) + 63 / 255 * mask)


def dotted_line(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A line across the image between random rows of the first and last column, every other 2 columns off."""
    n = len(images)
    r0, r1 = (torch.randint(0, 27, (n,), generator=gen).to(torch.float64) for _ in range(2))
    line = _lines(torch.zeros(n, dtype=torch.float64), r0, torch.full((n,), 27.0, dtype=torch.float64), r1)
    dashes = (torch.arange(SIZE) // 2) % 2 == 1  # columns 0-1 off, 2-3 on, ...
    return _to_uint8(_to_unit(images) + line * dashes)


def _zigzag_template(rise: int) -> np.ndarray:
    """MNIST-C's zigzag endpoints relative to its start (column 2, row r0) for r1 - r0 = `rise`: points 2
    pixels either side of the line, 4 apart, rotated onto it (its odd last point kept as it was)."""
    a = b = 2.0
    theta = np.arctan(rise / 23)
    d = 23 / np.cos(theta)
    points = [(0.0, 0.0)]
    for i in range(int((d - a) // (2 * a)) + 1):
        r_i = (-1) ** i * b
        points.append(((2 * i + 1) * a, r_i))
    max_c = (2 * a) * (d // (2 * a))
    if d != max_c:
        points.append((d, r_i / (2 * (d - max_c))))
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return (rotation @ np.array(points).T).T  # (points, 2): column, row offsets


_RISES = range(-5, 5)  # numpy's randint(-5, 5)


def zigzag(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A zigzag line from column 2 to about column 25, starting at a random row and rising up to 5 rows."""
    n = len(images)
    templates = [_zigzag_template(rise) for rise in _RISES]
    most = max(len(t) for t in templates)
    # Pad each template by repeating its last point: a zero-length segment draws nothing.
    table = torch.tensor(np.stack([np.concatenate([t, np.repeat(t[-1:], most - len(t), 0)]) for t in templates]))
    r0 = torch.randint(0, 27, (n,), generator=gen).to(torch.float64)
    rise = torch.randint(0, len(_RISES), (n,), generator=gen)
    points = table[rise] + torch.stack([torch.full_like(r0, 2.0), r0], 1)[:, None, :]
    x = _to_unit(images)
    for i in range(1, most):
        # Adding every segment and clipping once equals MNIST-C's clip after each (all terms are >= 0).
        x = x + _lines(points[:, i - 1, 0], points[:, i - 1, 1], points[:, i, 0], points[:, i, 1])
    return _to_uint8(x)


def canny_edges(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """scikit-image's Canny edge detector at its defaults (sigma 1, thresholds 0.1 and 0.2): the edges white.

    The steps as scikit-image takes them: a Gaussian blur normalised at the border, Sobel gradients, non-maximum
    suppression with gradient-direction interpolation in four octants (one pixel border excluded), then
    hysteresis: weak edges kept where 8-connected to a strong one.
    """
    x = _to_unit(images)
    ones = torch.ones_like(x[:1])
    smooth = _gaussian_blur(x, 1.0, mode="constant") / (_gaussian_blur(ones, 1.0, mode="constant") + 2.2e-16)
    # SciPy's sobel (mode "reflect", which repeats the edge pixel as "replicate" does for a 1-pixel pad).
    p = F.pad(smooth.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)

    def at(dr: int, dc: int) -> torch.Tensor:  # p shifted: at(dr, dc)[r, c] = smooth[r + dr, c + dc] (padded)
        return p[:, 1 + dr : 1 + dr + SIZE, 1 + dc : 1 + dc + SIZE]

    isobel = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))  # along rows
    jsobel = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))  # along columns
    ai, aj = isobel.abs(), jsobel.abs()
    magnitude = torch.hypot(isobel, jsobel)
    mp = F.pad(magnitude, (1, 1, 1, 1))

    def mag(dr: int, dc: int) -> torch.Tensor:
        return mp[:, 1 + dr : 1 + dr + SIZE, 1 + dc : 1 + dc + SIZE]

    inner = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inner[1:-1, 1:-1] = True
    same_sign = ((isobel >= 0) & (jsobel >= 0)) | ((isobel <= 0) & (jsobel <= 0))
    opposite = ((isobel <= 0) & (jsobel >= 0)) | ((isobel >= 0) & (jsobel <= 0))
    octants = [  # (pixels, weight, (near +, far +), (near -, far -)) in scikit-image's order
        (same_sign & (ai >= aj), aj / ai, ((1, 0), (1, 1)), ((-1, 0), (-1, -1))),
        (same_sign & (ai <= aj), ai / aj, ((0, 1), (1, 1)), ((0, -1), (-1, -1))),
        (opposite & (ai <= aj), ai / aj, ((0, 1), (-1, 1)), ((0, -1), (1, -1))),
        (opposite & (ai >= aj), aj / ai, ((-1, 0), (-1, 1)), ((1, 0), (1, -1))),
    ]
    local_max = torch.zeros_like(magnitude, dtype=torch.bool)
    for pixels, w, (near_p, far_p), (near_m, far_m) in octants:
        plus = mag(*far_p) * w + mag(*near_p) * (1 - w) <= magnitude
        minus = mag(*far_m) * w + mag(*near_m) * (1 - w) <= magnitude
        chosen = pixels & inner
        local_max = torch.where(chosen, plus & minus, local_max)
    low = local_max & (magnitude >= 0.1)
    edges = local_max & (magnitude >= 0.2)
    while True:  # grow the strong edges through the weak ones (8-connected) until nothing changes
        grown = low & (F.max_pool2d(edges.unsqueeze(1).float(), 3, 1, 1).squeeze(1) > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges.to(torch.uint8) * 255


# ---------------------------------------------------------------------------------------------- registry

CORRUPTIONS: dict[str, Corruption] = {
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "shear": shear,
    "scale": scale,
    "rotate": rotate,
    "brightness": brightness,
    "translate": translate,
    "stripe": stripe,
    "fog": fog,
    "spatter": spatter,
    "dotted_line": dotted_line,
    "zigzag": zigzag,
    "canny_edges": canny_edges,
}


def corrupt(images: torch.Tensor, name: str, seed: int = 0) -> torch.Tensor:
    """`images` (uint8, (N, 28, 28)) under corruption `name`, drawn from a generator seeded by `seed` and
    the corruption's place in the list, so each corruption's images do not depend on which others run."""
    if name not in CORRUPTIONS:
        raise MnistlabError(f"unknown corruption {name!r} (choose from {', '.join(CORRUPTIONS)})")
    if images.dtype != torch.uint8 or images.shape[1:] != (SIZE, SIZE):
        raise ValueError(f"corrupt takes uint8 images (N, 28, 28), got {images.dtype} {tuple(images.shape)}")
    gen = torch.Generator().manual_seed(seed * 1000 + list(CORRUPTIONS).index(name))
    return CORRUPTIONS[name](images.cpu(), gen)


def parse_names(text: str) -> list[str]:
    """A comma-separated list of corruption names ("all" for every one), checked against the registry."""
    if text.strip() == "all":
        return list(CORRUPTIONS)
    names = [t.strip().replace("-", "_") for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown or not names:
        raise MnistlabError(
            f"unknown corruption {', '.join(map(repr, unknown)) or '(none given)'} "
            f"(choose from all, {', '.join(CORRUPTIONS)})"
        )
    return list(dict.fromkeys(names))
