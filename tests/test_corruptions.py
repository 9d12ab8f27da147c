"""Tests for mnistlab.corruptions: MNIST-C's 15 corruptions on real MNIST test digits.

Each corruption keeps shape, dtype and range, is deterministic for a seed and changes every image; where the
original's effect is exact (brightness, stripe, translate, scale, rotate, the lines, Canny) the test checks it;
the two generators whose batched form reorders the original's work (glass blur's sequential pixel swaps, fog's
diamond-square fractal) are checked against straightforward per-image versions drawing the same numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnistlab.data.corruptions import CORRUPTIONS, _plasma, corrupt, glass_blur, motion_blur, parse_names
from mnistlab.errors import MnistlabError

# Corruptions without randomness: the same output whatever the seed.
FIXED = {"scale", "brightness", "stripe", "canny_edges"}


@pytest.fixture(scope="module")
def digits(mnist_data) -> torch.Tensor:
    return mnist_data.test.images[:32].clone()


def centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    """(row, column) of each image's intensity-weighted centre."""
    x = images.double()
    idx = torch.arange(28, dtype=torch.float64)
    total = x.sum((1, 2))
    return torch.stack([(x.sum(2) * idx).sum(1) / total, (x.sum(1) * idx).sum(1) / total], 1)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_keeps_the_format_is_seeded_and_changes_every_image(digits, name: str) -> None:
    out = corrupt(digits, name, seed=0)
    assert out.shape == digits.shape and out.dtype == torch.uint8
    assert torch.equal(out, corrupt(digits, name, seed=0))  # deterministic for a seed
    assert (out != digits).flatten(1).any(1).all()  # every image changed
    assert torch.equal(digits, digits.clone())  # the input is left alone
    other = corrupt(digits, name, seed=1)
    assert torch.equal(out, other) == (name in FIXED)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(list(CORRUPTIONS)),
    n=st.integers(1, 3),
    fill=st.sampled_from(["random", "black", "white"]),
    seed=st.integers(0, 2**16),
)
def test_any_images_stay_uint8_of_the_same_shape(name: str, n: int, fill: str, seed: int) -> None:
    """Blank, saturated and noise images too: nothing divides by zero or leaves the 0-255 range."""
    if fill == "random":
        images = torch.randint(0, 256, (n, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    else:
        images = torch.full((n, 28, 28), 0 if fill == "black" else 255, dtype=torch.uint8)
    out = corrupt(images, name, seed)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, corrupt(images, name, seed))


def test_brightness_adds_half_the_range(digits) -> None:
    out = corrupt(digits, "brightness").int()
    expected = (digits.int() + 127.5).clamp(max=255)
    assert (out - expected).abs().max() <= 0.5


def test_stripe_inverts_the_outer_quarters_only(digits) -> None:
    out = corrupt(digits, "stripe")
    assert torch.equal(out[:, :, 7:21], digits[:, :, 7:21])
    assert torch.equal(out[:, :, :7], 255 - digits[:, :, :7]) and torch.equal(out[:, :, 21:], 255 - digits[:, :, 21:])


def test_translate_shifts_by_three_pixels_each_way(digits) -> None:
    out = corrupt(digits, "translate")
    padded = torch.nn.functional.pad(digits, (3, 3, 3, 3))
    shifts = [(dy, dx) for dy in (-3, 3) for dx in (-3, 3)]
    for image, result in zip(padded, out):
        candidates = [image[3 + dy : 31 + dy, 3 + dx : 31 + dx] for dy, dx in shifts]
        assert any(torch.equal(result, c) for c in candidates)


def test_scale_shrinks_about_the_centre(digits) -> None:
    out = corrupt(digits, "scale")
    expected = 13.5 + 0.7 * (centre_of_mass(digits) - 13.5)
    assert (centre_of_mass(out) - expected).abs().max() < 0.25
    ratio = out.double().sum((1, 2)) / digits.double().sum((1, 2))
    assert ((ratio - 0.49).abs() < 0.06).all()  # the area scales by 0.7 squared


def test_rotate_turns_by_0_4_radians_either_way(digits) -> None:
    out = corrupt(digits, "rotate")
    before, after = centre_of_mass(digits) - 13.5, centre_of_mass(out) - 13.5
    # The output samples the input at R(a) (column, row), so the ink turns by -a about the centre.
    close = []
    for a in (0.4, -0.4):
        col = np.cos(a) * before[:, 1] + np.sin(a) * before[:, 0]
        row = -np.sin(a) * before[:, 1] + np.cos(a) * before[:, 0]
        close.append(((after[:, 0] - row).abs() < 0.35) & ((after[:, 1] - col).abs() < 0.35))
    assert (close[0] | close[1]).all()
    assert (out.double().sum((1, 2)) / digits.double().sum((1, 2)) - 1).abs().max() < 0.05


def test_impulse_noise_salts_and_peppers_17_percent(digits) -> None:
    out = corrupt(digits, "impulse_noise")
    changed = out != digits
    assert torch.isin(out[changed], torch.tensor([0, 255], dtype=torch.uint8)).all()
    black = digits == 0
    assert abs((out[black] == 255).double().mean().item() - 0.085) < 0.01  # half of 17% is salt


def test_dotted_line_and_zigzag_only_add_ink(digits) -> None:
    dotted = corrupt(digits, "dotted_line")
    zigzag = corrupt(digits, "zigzag")
    assert (dotted >= digits).all() and (zigzag >= digits).all()
    columns = (dotted != digits).any(1).any(0).nonzero().flatten()
    assert ((columns // 2) % 2 == 1).all() and (columns < 27).all()  # dashes 2 columns on, 2 off
    # A zigzag spans columns 2 to about 25 and a band of rows a few pixels either side of its line.
    zig_cols = (zigzag != digits).any(1).any(0).nonzero().flatten()
    assert zig_cols.min() >= 0 and zig_cols.max() <= 27 and len(zig_cols) >= 15


def test_spatter_paints_grey_mud(digits) -> None:
    out = corrupt(digits, "spatter").int()
    low, high = torch.minimum(digits.int(), torch.tensor(63)), torch.maximum(digits.int(), torch.tensor(63))
    assert ((out >= low - 1) & (out <= high + 1)).all()  # each pixel moves towards the mud's grey


def test_fog_lifts_the_background_and_lowers_the_contrast(digits) -> None:
    out = corrupt(digits, "fog")
    background = digits == 0
    assert out[background].float().mean() > 50 and (out[background] <= 192).all()  # 3p / (1 + 3) of white at most
    stroke = digits == 255
    assert (out[stroke].float().mean() - out[background].float().mean()) < 90  # contrast divided by about 4


def test_motion_blur_smears_one_way_and_keeps_the_ink() -> None:
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[0, 14, 14] = 255
    out = motion_blur(image.repeat(50, 1, 1), torch.Generator().manual_seed(0)).int()
    assert (out[:, :, 15:] == 0).all()  # each pixel averages pixels to its right: the smear goes left only
    assert ((out.sum((1, 2)) - 255).abs() <= 21).all()  # the weights sum to 1 (up to rounding of 21 taps)
    assert (out[:, 14, 14] > 0).all()  # the first tap is the pixel itself


def test_canny_edges_outline_a_square() -> None:
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[0, 8:20, 8:20] = 255
    edges = corrupt(image, "canny_edges")[0] > 0
    rows, cols = edges.nonzero().T
    ring = ((rows >= 7) & (rows <= 20) & (cols >= 7) & (cols <= 20)) & ~(
        (rows >= 9) & (rows <= 18) & (cols >= 9) & (cols <= 18)
    )
    assert ring.all()  # every edge pixel lies on the square's border (within a pixel)
    for side in (edges[7:21, 7:10], edges[7:21, 18:21], edges[7:10, 7:21], edges[18:21, 7:21]):
        assert side.sum() >= 8  # and every side is traced


def test_glass_blur_swaps_match_a_sequential_loop(digits) -> None:
    """The batched swaps equal MNIST-C's loop, run image by image over the same random draws."""
    images = digits[:3]
    out = glass_blur(images, torch.Generator().manual_seed(5))

    gen = torch.Generator().manual_seed(5)
    n, positions = len(images), range(27, 1, -1)
    steps = 2 * len(positions) ** 2
    swap = torch.rand((steps, n), generator=gen) < 0.5
    moves = torch.randint(-1, 1, (steps, 2, n), generator=gen)
    blurred = _column_blur(images.double() / 255)
    expected = []
    for i in range(n):
        x = np.floor(blurred[i].numpy() * 255)
        step = 0
        for _ in range(2):
            for h in positions:
                for w in positions:
                    if swap[step, i]:
                        dy, dx = int(moves[step, 0, i]), int(moves[step, 1, i])
                        x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w]
                    step += 1
        expected.append(_column_blur(torch.from_numpy(x)[None] / 255)[0])
    reference = (torch.stack(expected).clamp(0, 1) * 255).round()
    # Within one grey level: the two blurs may round a value that lands on an integer differently, while a
    # misplaced swap would move a whole pixel's ink.
    assert (out.double() - reference).abs().max() <= 1


def _column_blur(x: torch.Tensor) -> torch.Tensor:
    """A Gaussian blur (sigma 0.7) down the columns only, edges repeated, written out directly."""
    offsets = np.arange(-3, 4)
    kernel = np.exp(-0.5 * offsets**2 / 0.49)
    kernel /= kernel.sum()
    rows = np.clip(np.arange(28)[:, None] + offsets[None, :], 0, 27)  # (28, 7) source rows per output row
    return torch.from_numpy(np.einsum("nrkc,k->nrc", x.numpy()[:, rows, :], kernel))


def test_plasma_matches_the_strided_diamond_square() -> None:
    """The interleaved plasma equals MNIST-C's in-place diamond-square over the same noise, level by level."""
    size, n = 16, 2
    ours = _plasma(n, torch.Generator().manual_seed(3), size=size)
    gen = torch.Generator().manual_seed(3)
    m = np.zeros((n, size, size))
    step, wibble = size, 100.0

    def noisy(total: np.ndarray) -> np.ndarray:
        noise = (torch.rand(total.shape, generator=gen) * 2 * wibble - wibble) * wibble
        return total / 4 + noise.double().numpy()

    while step >= 2:
        half = step // 2
        corners = m[:, 0:size:step, 0:size:step]
        squares = corners + np.roll(corners, -1, axis=1)
        squares = squares + np.roll(squares, -1, axis=2)
        m[:, half:size:step, half:size:step] = noisy(squares)
        dr, ul = m[:, half:size:step, half:size:step], m[:, 0:size:step, 0:size:step]
        m[:, 0:size:step, half:size:step] = noisy(dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=2))
        m[:, half:size:step, 0:size:step] = noisy(dr + np.roll(dr, 1, axis=2) + ul + np.roll(ul, -1, axis=1))
        step, wibble = half, wibble / 1.4
    m -= m.min(axis=(1, 2), keepdims=True)
    m /= m.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(ours.numpy(), m, atol=1e-5)


def test_unknown_names_and_bad_input() -> None:
    with pytest.raises(MnistlabError, match="unknown corruption 'snow'"):
        corrupt(torch.zeros(1, 28, 28, dtype=torch.uint8), "snow")
    with pytest.raises(ValueError, match="uint8"):
        corrupt(torch.zeros(1, 28, 28), "fog")
    assert parse_names("all") == list(CORRUPTIONS)
    assert parse_names("fog, motion-blur,fog") == ["fog", "motion_blur"]
    with pytest.raises(MnistlabError, match="'nope'"):
        parse_names("fog,nope")
