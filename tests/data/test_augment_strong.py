"""Augment("strong"): flips, a wide affine (zoom, any rotation, shear, shift) and Kornia's colour, blur and JPEG
steps; each checked on synthetic images with its probability forced to 1, plus the older presets' draws unchanged."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from resunetpp.data import Augment
from resunetpp.data.augment import PRESET_TRANSFORMS, PRESETS, STRONG_P, STRONG_RANGES

GEOMETRIC = ["hflip", "vflip", "scale", "rotate", "shear", "translate"]


def disc_batch(n: int = 4, h: int = 64, w: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """White discs on black, off-centre (so flips and turns move them), with their masks."""
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    masks = torch.stack([((ys - h * (0.35 + 0.05 * k)) ** 2 + (xs - w * 0.4) ** 2 < (0.18 * h) ** 2).float()
                         for k in range(n)])[:, None]
    return masks.expand(n, 3, h, w).clone(), masks


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of two (N, 1, H, W) boolean maps."""
    return (a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1).clamp(min=1)


def run(only: list[str] | None, images: torch.Tensor, masks: torch.Tensor, seed: int = 0, p: float | None = 1.0):
    aug = Augment("strong", p=p, only=only)
    torch.manual_seed(seed)
    out_images, out_masks = aug(images, masks)
    return out_images, out_masks, aug.params()


def test_strong_is_a_preset_with_valid_outputs():
    assert "strong" in PRESETS
    assert Augment("strong").names == list(PRESET_TRANSFORMS["strong"]) == GEOMETRIC + [
        "gain", "contrast", "saturation", "hue", "blur", "jpeg"]
    images, masks = disc_batch()
    soft = torch.rand(4, 1, 64, 64)
    for p, seed in ((None, 0), (None, 1), (1.0, 2)):
        torch.manual_seed(seed)
        out_images, out_masks, out_soft = Augment("strong", p=p)((images * 255).to(torch.uint8), masks, soft)
        assert out_images.shape == images.shape and out_masks.shape == masks.shape and out_soft.shape == soft.shape
        assert out_images.dtype == out_masks.dtype == torch.float32
        assert 0 <= out_images.min() and out_images.max() <= 1 and 0 <= out_soft.min() and out_soft.max() <= 1
        assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
        assert torch.isfinite(out_images).all()


def test_geometry_keeps_the_mask_on_the_bright_disc():
    images, masks = disc_batch(n=8)
    out_images, out_masks, p = run(GEOMETRIC, images, masks)
    bright = out_images.mean(1, keepdim=True) > 0.5
    # interpolation blurs a one-pixel rim; a mask flipped or shifted by a few pixels would score far lower
    assert iou(bright, out_masks.bool()).min() > 0.9
    assert iou(bright, out_masks.flip(-1).bool()).max() < 0.8  # the check can fail
    assert (iou(out_masks.bool(), masks.bool()) < 0.9).all(), "p=1 should move every disc"
    assert p["use_rotate"].all() and p["use_shear"].all() and not p["use_gain"].any()


def test_the_whole_preset_keeps_masks_aligned():
    """With its colour steps too: gain, contrast, blur and JPEG change levels, not which side of 0.3 a disc is."""
    images, masks = disc_batch(n=8)
    for seed in range(3):
        out_images, out_masks, _ = run(None, images, masks, seed=seed, p=None)
        assert iou(out_images.mean(1, keepdim=True) > 0.3, out_masks.bool()).min() > 0.8


def test_shear_and_translation_follow_the_drawn_values_on_a_coordinate_ramp():
    """Red/green are the x/y pixel coordinates (bilinear sampling is exact on them). In pixels about the centre,
    x_in = x + tan(shear_x) y + 2 tx (w/2), y_in = y + tan(shear_y) x + 2 ty (h/2), on a non-square image."""
    n, h, w = 16, 48, 80
    xs, ys = torch.arange(w) + 0.5 - w / 2, torch.arange(h) + 0.5 - h / 2
    images = torch.zeros(n, 3, h, w)
    images[:, 0] = 0.5 + xs / (4 * w)  # in [0.375, 0.625]: never clamped
    images[:, 1] = 0.5 + ys[:, None] / (4 * h)
    out, _, p = run(["shear", "translate"], images, torch.zeros(n, 1, h, w), seed=3)
    x_in = ((out[:, 0] - 0.5) * 4 * w)[:, 16:-16, 24:-24]
    y_in = ((out[:, 1] - 0.5) * 4 * h)[:, 16:-16, 24:-24]
    y, x = ys[16:-16, None], xs[None, 24:-24]
    sx, sy = p["shear_x"].tan().view(n, 1, 1), p["shear_y"].tan().view(n, 1, 1)
    tx, ty = p["translate_x"].view(n, 1, 1) * w, p["translate_y"].view(n, 1, 1) * h
    assert (x_in - (x + sx * y + tx)).abs().max() < 1e-2
    assert (y_in - (y + sy * x + ty)).abs().max() < 1e-2
    limit = math.radians(STRONG_RANGES["shear"][1])
    assert p["shear_x"].abs().max() <= limit and p["shear_x"].min() < -limit / 3 and p["shear_x"].max() > limit / 3
    assert p["translate_x"].abs().max() <= 0.1 and p["translate_y"].abs().max() > 0.05


def test_shear_changes_the_masks_shape():
    """A centred square sheared is a parallelogram: about the same area, a wider bounding box."""
    masks = torch.zeros(8, 1, 64, 64)
    masks[:, :, 20:44, 20:44] = 1
    _, out, p = run(["shear"], masks.expand(8, 3, 64, 64), masks, seed=4)
    area = out.flatten(1).sum(1)
    rows, cols = out[:, 0].amax(2), out[:, 0].amax(1)
    box = rows.sum(1) * cols.sum(1)
    strong_shear = p["shear_x"].abs().maximum(p["shear_y"].abs()) > math.radians(5)
    assert strong_shear.sum() >= 4
    assert ((area - 24 * 24).abs() < 0.1 * 24 * 24).all()
    assert (area[strong_shear] < 0.95 * box[strong_shear]).all()


def test_scale_and_rotation_use_the_wide_ranges():
    images, masks = disc_batch(n=256, h=16, w=16)
    *_, p = run(["scale", "rotate"], images, masks, seed=5)
    zoom, degrees = p["zoom"], p["angle"] * 180 / math.pi
    assert 0.5 <= zoom.min() < 0.6 and 1.4 < zoom.max() <= 1.5
    assert -180 <= degrees.min() < -150 and 150 < degrees.max() <= 180


def test_gain_scales_the_image_and_clips():
    images = torch.full((16, 3, 8, 8), 0.5)
    images[:, :, :4] = 0.8
    masks = torch.zeros(16, 1, 8, 8)
    masks[:, :, 2:5, 2:5] = 1
    out, out_masks, p = run(["gain"], images, masks, seed=6)
    gain = p["gain"].view(-1, 1, 1, 1)
    assert gain.min() < 0.8 and gain.max() > 1.3 and 0.6 <= gain.min() and gain.max() <= 1.6
    assert torch.allclose(out, (images * gain).clamp(0, 1), atol=1e-6)
    assert torch.allclose(out[:, :, 4:].mean((1, 2, 3)), 0.5 * gain.view(-1), atol=1e-6)  # the mean scales
    assert torch.equal(out_masks, masks)


def test_contrast_scales_the_spread_about_the_mean():
    images = torch.full((16, 3, 8, 8), 0.4)
    images[:, :, ::2] = 0.6
    out, _, p = run(["contrast"], images, torch.zeros(16, 1, 8, 8), seed=7)
    factor = p["contrast"]
    assert torch.allclose(out.mean((1, 2, 3)), images.mean((1, 2, 3)), atol=1e-6)
    assert torch.allclose(out.std((1, 2, 3)), factor * images.std((1, 2, 3)), atol=1e-5)
    assert factor.min() < 0.85 and factor.max() > 1.15


def colour_batch(n: int = 16) -> torch.Tensor:
    """Left half: a grey ramp (R = G = B); right half: saturated colours of all hues."""
    torch.manual_seed(100)
    images = torch.rand(n, 3, 16, 16) * 0.8 + 0.1
    images[:, :, :, :8] = torch.linspace(0.05, 0.95, 16).view(1, 1, 16, 1)
    return images


def test_hue_turns_colours_but_not_greys():
    images = colour_batch()
    out, _, p = run(["hue"], images, torch.zeros(16, 1, 16, 16), seed=8)
    hue = p["hue"]
    assert hue.abs().max() <= 0.05 and hue.min() < -0.02 and hue.max() > 0.02
    assert torch.allclose(out[..., :8], images[..., :8], atol=1e-6)  # the grey axis stays where it was
    moved = (out[..., 8:] - images[..., 8:]).abs().amax((1, 2, 3))
    assert (moved[hue.abs() > 0.01] > 0.02).all()
    # a hue turn keeps each pixel's max and min channel (HSV value and saturation)
    assert torch.allclose(out.amax(1), images.amax(1), atol=1e-5)
    assert torch.allclose(out.amin(1), images.amin(1), atol=1e-5)


def test_saturation_scales_the_spread_between_channels():
    images = colour_batch()
    out, _, p = run(["saturation"], images, torch.zeros(16, 1, 16, 16), seed=9)
    top, bottom = images.amax(1)[..., 8:], images.amin(1)[..., 8:]
    expected = ((top - bottom) / top * p["saturation"].view(-1, 1, 1)).clamp(max=1) * top  # HSV: S = spread / V
    assert torch.allclose((out.amax(1) - out.amin(1))[..., 8:], expected, atol=1e-5)
    assert p["saturation"].min() < 0.85 and p["saturation"].max() > 1.15
    assert torch.allclose(out[..., :8], images[..., :8], atol=1e-6)


def high_frequency(x: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared difference of horizontal and vertical neighbours."""
    return (x.diff(dim=-1) ** 2).mean((1, 2, 3)) + (x.diff(dim=-2) ** 2).mean((1, 2, 3))


def test_blur_lowers_high_frequencies_more_with_a_larger_sigma():
    import kornia

    torch.manual_seed(10)
    images = torch.rand(16, 3, 32, 32)
    masks = (torch.rand(16, 1, 32, 32) > 0.5).float()
    out, out_masks, p = run(["blur"], images, masks, seed=10)
    sigma = p["blur_sigma"]
    assert torch.equal(out_masks, masks)
    ratio = high_frequency(out) / high_frequency(images)
    assert (ratio <= 1 + 1e-6).all() and (ratio[sigma > 0.5] < 0.5).all()
    order = sigma.argsort()
    assert (ratio[order].diff() < 1e-3).all(), "a wider blur should leave less high-frequency energy"
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0
    ref = kornia.filters.gaussian_blur2d(images, 13, sigma.view(-1, 1).expand(-1, 2), border_type="replicate")
    assert (out - ref).abs().max() < 1e-5


def test_jpeg_changes_the_image_not_the_mask():
    torch.manual_seed(11)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 48), indexing="ij")
    images = torch.stack([xs, ys, (xs + ys) / 2]).expand(16, 3, 48, 48) * 0.7 + 0.3 * torch.rand(16, 3, 48, 48)
    masks = (torch.rand(16, 1, 48, 48) > 0.5).float()
    out, out_masks, p = run(["jpeg"], images, masks, seed=11)
    quality = p["jpeg_quality"]
    assert torch.equal(out_masks, masks)
    error = (out - images).abs().mean((1, 2, 3))
    assert (error > 1e-3).all() and (error < 0.1).all()
    assert 30 <= quality.min() < 45 and 80 < quality.max() <= 95
    low, high = quality.argmin(), quality.argmax()
    assert error[low] > error[high], "lower quality should lose more"


def test_a_sample_that_draws_no_colour_step_is_left_exactly():
    images = colour_batch(n=64)
    out, _, p = run(["saturation", "hue", "blur", "jpeg"], images, torch.zeros(64, 1, 16, 16), seed=12, p=None)
    untouched = ~(p["use_saturation"] | p["use_hue"] | p["use_blur"] | p["use_jpeg"])
    assert 5 < untouched.sum() < 64
    assert torch.equal(out[untouched], images[untouched])
    assert ((out[~untouched] - images[~untouched]).abs().amax((1, 2, 3)) > 1e-4).all()


def test_same_seed_same_batch_and_the_draw_is_recorded():
    images, masks = disc_batch()
    a = run(None, images, masks, seed=13, p=None)
    b = run(None, images, masks, seed=13, p=None)
    c = run(None, images, masks, seed=14, p=None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert set(a[2]) >= {"zoom", "angle", "shear_x", "translate_y", "gain", "hue", "blur_sigma", "jpeg_quality",
                         "use_shear", "use_jpeg"}


def test_probabilities_match_the_table():
    images, masks = disc_batch(n=4000, h=16, w=16)
    *_, p = run(None, images, masks, seed=15, p=None)
    for name in PRESET_TRANSFORMS["strong"]:
        assert p[f"use_{name}"].float().mean().item() == pytest.approx(STRONG_P[name], abs=0.03), name
    for name in ("centre_crop", "random_crop", "rot90", "cutout", "brightness"):
        assert not p[f"use_{name}"].any(), name


def test_batched_the_operator_count_does_not_grow_with_the_batch():
    """No per-sample Python loop: a batch of 2 and one of 8 run the same operators."""
    from torch.profiler import ProfilerActivity, profile

    aug = Augment("strong", p=1.0)
    counts = []
    for n in (2, 8):
        images, masks = disc_batch(n=n, h=32, w=32)
        aug(images, masks)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            aug(images, masks)
        counts.append(sum(e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith(
            "aten::")) for e in prof.events()))
    assert counts[0] == counts[1]


def test_the_older_presets_draw_what_they_drew_before_strong():
    """Fingerprints taken from the code before `strong` was added: the same seed gives the same draw and output."""
    images = torch.zeros(4, 3, 32, 32)
    images[:, 0] = torch.linspace(0, 1, 32)
    images[:, 1] = torch.linspace(0, 1, 32)[:, None]
    images[:, 2] = 0.5
    masks = torch.zeros(4, 1, 32, 32)
    masks[:, :, 8:20, 10:26] = 1
    expected = {
        "paper": ([[0, 0, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0, 0],
                   [0, 1, 1, 0, 0, 0, 0, 0, 1]], [1536.0, 1046.268, 1536.0, 1454.203], [192, 130, 192, 334]),
        "light": ([[0, 0, 1, 1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0, 0],
                   [0, 0, 1, 0, 0, 0, 0, 0, 0]], [1536.0] * 4, [192] * 4),
    }
    for preset, (use, image_sums, mask_sums) in expected.items():
        torch.manual_seed(0)
        aug = Augment(preset)
        out_images, out_masks = aug(images, masks)
        assert aug.last_params["use"].int().tolist() == use, preset
        assert out_images.sum((1, 2, 3)).tolist() == pytest.approx(image_sums, abs=0.01), preset
        assert (out_masks.sum((1, 2, 3)) - torch.tensor(mask_sums)).abs().max() <= 2, preset
    assert aug.last_params["values"].shape == (4, 14)  # no columns added to the older presets' draw


def test_only_strong_needs_kornia():
    code = ("import sys; sys.modules['kornia'] = None\n"
            "import torch\nfrom resunetpp.data import Augment\n"
            "x, m = torch.rand(2, 3, 16, 16), torch.zeros(2, 1, 16, 16)\n"
            "for preset in ('paper', 'light', 'none'):\n    Augment(preset, p=1.0)(x, m)\n"
            "Augment('strong', only=['hflip', 'shear'])(x, m)\n"
            "try:\n    Augment('strong', p=1.0)(x, m)\nexcept ImportError:\n    print('needs kornia')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "needs kornia"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_strong_on_cuda():
    images, masks = disc_batch(n=8)
    images, masks = images.cuda(), masks.cuda()
    for seed in range(2):
        torch.manual_seed(seed)
        out_images, out_masks = Augment("strong", p=1.0)(images, masks)
        assert out_images.device.type == "cuda" and out_images.shape == images.shape
        assert 0 <= out_images.min() and out_images.max() <= 1
        assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    torch.manual_seed(3)
    a = Augment("strong")(images, masks)
    torch.manual_seed(3)
    b = Augment("strong")(images, masks)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
