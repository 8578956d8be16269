"""Augment: masks stay binary and aligned with their images, per transform and for whole presets."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.data import blob_mask
from resunetpp.data import Augment
from resunetpp.data.augment import DEFAULT_P, PRESET_TRANSFORMS

N, H, W = 24, 64, 64


def encoded_batch(n: int = N, h: int = H, w: int = W) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose colour encodes the mask: red > green exactly where the mask is 1.

    Zero padding and cutout give red == green, so those pixels are recognisable and left out of the
    comparison; brightness shifts all channels alike, so it keeps red > green.
    """
    masks = torch.stack([torch.from_numpy(blob_mask(h, w, k)) for k in range(n)])[:, None].float()
    images = torch.empty(n, 3, h, w)
    images[:, 0] = 0.25 + 0.5 * masks[:, 0]
    images[:, 1] = 0.75 - 0.5 * masks[:, 0]
    images[:, 2] = 0.5
    return images, masks


def mismatch(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-sample fraction of compared pixels where the colour code disagrees with the mask."""
    r, g = images[:, 0], images[:, 1]
    decided = r != g
    code = r > g
    bad = (code != masks[:, 0].bool()) & decided
    return bad.flatten(1).float().sum(1) / decided.flatten(1).float().sum(1).clamp(min=1)


def check_output(images, masks, out_images, out_masks):
    assert out_images.shape == images.shape and out_masks.shape == masks.shape
    assert out_images.dtype == torch.float32 and out_masks.dtype == torch.float32
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    assert out_images.min() >= 0 and out_images.max() <= 1


GEOMETRIC = ["centre_crop", "random_crop", "hflip", "vflip", "scale", "rotate", "rot90"]


@pytest.mark.parametrize("name", GEOMETRIC + ["brightness"])
def test_each_transform_keeps_masks_aligned(name):
    images, masks = encoded_batch()
    torch.manual_seed(1)
    out_images, out_masks = Augment("paper", p=1.0, only=[name])(images, masks)
    check_output(images, masks, out_images, out_masks)
    # interpolation blurs a one-pixel rim at the mask's edges; a misaligned mask would be off by far more
    assert mismatch(out_images, out_masks).max() < 0.015
    if name != "brightness":
        changed = (out_masks != masks).flatten(1).any(1)
        assert changed.float().mean() > 0.5, "p=1 should change most masks"
    else:
        assert torch.equal(out_masks, masks)
        assert not torch.allclose(out_images, images)


def test_a_misaligned_mask_would_be_caught():
    images, masks = encoded_batch()
    assert mismatch(images, masks).max() == 0
    assert mismatch(images, masks.flip(-1)).min() > 0.05
    assert mismatch(images, masks.roll(3, -1)).min() > 0.03


def test_rotation_angles_are_drawn_from_0_to_90_degrees():
    aug = Augment("paper", p=1.0, only=["rotate"])
    images, masks = encoded_batch(n=64)
    torch.manual_seed(0)
    aug(images, masks)
    degrees = aug.params()["angle"] * 180 / math.pi
    assert degrees.min() >= 0 and degrees.max() <= 90 and degrees.max() - degrees.min() > 45


def test_cutout_touches_only_the_image():
    images, masks = encoded_batch()
    torch.manual_seed(2)
    out_images, out_masks = Augment("paper", p=1.0, only=["cutout"])(images, masks)
    check_output(images, masks, out_images, out_masks)
    assert torch.equal(out_masks, masks)
    erased = (out_images == 0).all(1)
    frac = erased.flatten(1).float().mean(1)
    assert (frac > 0.01).all() and (frac < 0.15).all()
    assert torch.equal(out_images[~erased.unsqueeze(1).expand_as(out_images)],
                       images[~erased.unsqueeze(1).expand_as(images)])


@pytest.mark.parametrize("preset", ["paper", "light"])
def test_whole_preset_keeps_masks_aligned(preset):
    images, masks = encoded_batch()
    aug = Augment(preset)
    assert aug.names == list(PRESET_TRANSFORMS[preset])
    for seed in range(3):
        torch.manual_seed(seed)
        out_images, out_masks = aug(images, masks)
        check_output(images, masks, out_images, out_masks)
        assert mismatch(out_images, out_masks).max() < 0.02
    if preset == "light":  # quarter turns and flips of a square image are exact permutations
        assert torch.equal(out_masks.sum((1, 2, 3)), masks.sum((1, 2, 3)))
        assert mismatch(out_images, out_masks).max() == 0


def test_same_seed_same_batch_and_other_seed_differs():
    images, masks = encoded_batch()
    aug = Augment("paper")
    torch.manual_seed(7)
    a = aug(images, masks)
    torch.manual_seed(7)
    b = Augment("paper")(images, masks)  # a fresh module draws the same too
    torch.manual_seed(8)
    c = aug(images, masks)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_none_preset_uint8_and_non_square_input():
    images, masks = encoded_batch(n=4, h=48, w=80)
    out = Augment("none")(images, masks)
    assert torch.equal(out[0], images) and torch.equal(out[1], masks)
    over = images * 2  # out of range: clamped in the output, the caller's tensor left as it was
    kept = over.clone()
    assert Augment("none")(over, masks)[0].max() == 1 and torch.equal(over, kept)
    u8 = (images * 255).round().to(torch.uint8)
    torch.manual_seed(0)
    out_images, out_masks = Augment("paper")(u8, masks.to(torch.uint8))
    assert out_images.shape == (4, 3, 48, 80) and out_images.dtype == torch.float32
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown augmentation preset 'heavy'"):
        Augment("heavy")
    with pytest.raises(ValueError, match="unknown transform"):
        Augment("paper", only=["elastic"])
    images, masks = encoded_batch(n=2)
    with pytest.raises(ValueError, match=r"masks \(N, 1, H, W\)"):
        Augment("light")(images, masks[:, 0])


def test_crops_stay_inside_the_frame():
    images, masks = encoded_batch()
    for name in ("centre_crop", "random_crop"):
        torch.manual_seed(3)
        aug = Augment("paper", p=1.0, only=[name])
        out_images, _ = aug(images, masks)
        assert (out_images[:, 2] > 0.45).all(), f"{name} let the zero padding in"
        zoom = aug.params()["crop_zoom" if name == "random_crop" else "centre_zoom"]
        lo, hi = (1.25, 1.5) if name == "random_crop" else (1.25, 1.25)
        assert zoom.min() >= lo and zoom.max() <= hi


def test_zooming_out_pads_and_quarter_turns_are_exact():
    images, masks = encoded_batch()
    torch.manual_seed(4)
    aug = Augment("paper", p=1.0, only=["scale"])
    out_images, _ = aug(images, masks)
    zoom = aug.params()["zoom"]
    assert zoom.min() >= 0.75 and zoom.max() <= 1.25
    padded = (out_images[:, 2] < 0.25).flatten(1).any(1)  # blue is 0.5 everywhere but the padding
    assert torch.equal(padded, zoom < 1 - 1 / W)
    torch.manual_seed(5)
    aug = Augment("light", p=1.0, only=["rot90"])
    out_images, out_masks = aug(images, masks)
    turns = aug.params()["quarter_turns"].long()
    assert set(turns.tolist()) == {0, 1, 2, 3}
    for k in range(4):
        pick = turns == k
        expected = torch.rot90(masks[pick], k, (2, 3))
        other_way = torch.rot90(masks[pick], -k, (2, 3))
        same = torch.equal(out_masks[pick], expected) or torch.equal(out_masks[pick], other_way)
        assert same, f"{k} quarter turns are not an exact rotation"


def test_probabilities_match_the_table():
    aug = Augment("paper")
    images, masks = encoded_batch(n=4000, h=8, w=8)
    torch.manual_seed(6)
    aug(images, masks)
    p = aug.params()
    for name in PRESET_TRANSFORMS["paper"]:
        assert p[f"use_{name}"].float().mean().item() == pytest.approx(DEFAULT_P[name], abs=0.03), name
    assert not p["use_rot90"].any()


def test_one_augmented_batch_is_few_operator_calls():
    """The whole paper preset is a fixed ~80 operator calls per batch (kernel launches on a GPU), whatever the
    batch size: every transform is composed into one warp and the photometric steps are batched."""
    from torch.profiler import ProfilerActivity, profile

    aug = Augment("paper")
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    masks = torch.randint(0, 2, (16, 1, 64, 64), dtype=torch.uint8)
    aug(images, masks)  # first call builds the cutout coordinate grid
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        aug(images, masks)
    ops = [e for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    assert 20 < len(ops) <= 80, sorted(e.name for e in ops)


@pytest.mark.parametrize("name", ["rotate", "scale", "hflip", "vflip"])
def test_warp_matches_kornias_transforms_on_a_non_square_image(name):
    """An independent recomputation: Kornia's own rotate / scale / flips of the same image, with the angles
    and zooms this batch drew, agree with the composed warp away from the border."""
    import kornia.geometry.transform as KT

    torch.manual_seed(0)
    images = torch.rand(6, 3, 48, 80)
    aug = Augment("paper", p=1.0, only=[name])
    out, _ = aug(images, torch.zeros(6, 1, 48, 80))
    p = aug.params()
    ref = {"rotate": lambda x: KT.rotate(x, p["angle"] * 180 / math.pi, align_corners=True),
           "scale": lambda x: KT.scale(x, p["zoom"][:, None].expand(-1, 2), align_corners=True),
           "hflip": KT.hflip, "vflip": KT.vflip}[name](images)
    assert (out - ref.clamp(0, 1))[:, :, 8:-8, 8:-8].abs().max() < 1e-4


def test_cutout_rectangle_has_the_drawn_area_ratio_and_place():
    """The erased box, measured on the output, against the documented definition: area a * H * W, height
    sqrt(area / ratio), width sqrt(area * ratio), its top-left at (cutout_y, cutout_x) of the free play."""
    h, w = 48, 80
    images = torch.full((64, 3, h, w), 0.5)
    torch.manual_seed(11)
    aug = Augment("paper", p=1.0, only=["cutout"])
    out, _ = aug(images, torch.zeros(64, 1, h, w))
    p = aug.params()
    for i in range(64):
        ys, xs = torch.nonzero((out[i] == 0).all(0), as_tuple=True)
        area = p["cutout_area"][i].item() * h * w
        ratio = math.exp(p["cutout_log_ratio"][i].item())
        bh, bw = min(h, math.sqrt(area / ratio)), min(w, math.sqrt(area * ratio))
        top, left = p["cutout_y"][i].item() * (h - bh), p["cutout_x"][i].item() * (w - bw)
        # pixel centres (y + 0.5) strictly inside [top, top + bh): at most one pixel of rounding per edge
        assert abs(ys.min().item() - top) <= 1 and abs(ys.max().item() + 1 - (top + bh)) <= 1, i
        assert abs(xs.min().item() - left) <= 1 and abs(xs.max().item() + 1 - (left + bw)) <= 1, i
        assert abs(len(ys) - bh * bw) <= bh + bw + 1, i
        assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # a full rectangle
    # the cached pixel grid is per size: another size right after gets its own
    out2, _ = aug(torch.full((4, 3, 16, 24), 0.5), torch.zeros(4, 1, 16, 24))
    frac = (out2 == 0).all(1).flatten(1).float().mean(1)
    assert ((frac > 0.01) & (frac < 0.15)).all()


def test_crops_compose_as_documented_on_a_coordinate_ramp():
    """Images whose red/green channels are the x/y pixel coordinate (bilinear sampling is exact on them):
    after both crops, x_in = x_out / (zc zr) + shift, shift = crop_x (1 - 1/zr) / zc in half-sides."""
    n, h, w = 32, 64, 96
    xs = (torch.arange(w) + 0.5) / w * 2 - 1  # normalised pixel centres
    ys = (torch.arange(h) + 0.5) / h * 2 - 1
    images = torch.zeros(n, 3, h, w)
    images[:, 0] = (xs[None, None, :] + 1) / 4 + 0.25  # in [0.25, 0.75]: never clamped
    images[:, 1] = (ys[None, :, None] + 1) / 4 + 0.25
    torch.manual_seed(12)
    aug = Augment("paper", p=1.0, only=["centre_crop", "random_crop"])
    out, _ = aug(images, torch.zeros(n, 1, h, w))
    p = aug.params()
    zoom = p["centre_zoom"] * p["crop_zoom"]
    x_in = (out[:, 0, h // 2, 8:-8] - 0.25) * 4 - 1
    y_in = (out[:, 1, 8:-8, w // 2] - 0.25) * 4 - 1
    x_expected = xs[None, 8:-8] / zoom[:, None] + (p["crop_x"] * (1 - 1 / p["crop_zoom"]) / p["centre_zoom"])[:, None]
    y_expected = ys[None, 8:-8] / zoom[:, None] + (p["crop_y"] * (1 - 1 / p["crop_zoom"]) / p["centre_zoom"])[:, None]
    assert (x_in - x_expected).abs().max() < 1e-4 and (y_in - y_expected).abs().max() < 1e-4
    assert p["crop_x"].abs().max() > 0.5  # the crops really moved


def test_quarter_turns_one_and_three_are_opposite():
    images, masks = encoded_batch()
    torch.manual_seed(5)
    aug = Augment("light", p=1.0, only=["rot90"])
    _, out = aug(images, masks)
    turns = aug.params()["quarter_turns"].long()
    one, three = (turns == 1).nonzero()[0, 0], (turns == 3).nonzero()[0, 0]
    direction = 1 if torch.equal(out[one], torch.rot90(masks[one], 1, (1, 2))) else -1
    assert torch.equal(out[one], torch.rot90(masks[one], direction, (1, 2)))
    assert torch.equal(out[three], torch.rot90(masks[three], -direction, (1, 2)))


def test_inputs_are_scaled_and_checked_and_nothing_is_persistent():
    images, masks = encoded_batch(n=4, h=16, w=16)
    u8 = (images * 255).round().to(torch.uint8)
    out, _ = Augment("none")(u8, masks)
    assert torch.equal(out, u8.float() / 255)  # uint8 / 255
    torch.manual_seed(3)
    a, _ = Augment("light")(u8, masks)
    torch.manual_seed(3)
    b, _ = Augment("light")(u8.float() / 255, masks)
    assert torch.equal(a, b)  # the same warp of the same [0, 1] values
    low, _ = Augment("none")(images - 1, masks)
    assert low.min() == 0 and low.max() <= 1  # clamped below too
    aug = Augment()
    assert aug.names == list(PRESET_TRANSFORMS["paper"]) and "preset='paper'" in repr(aug)
    assert aug.state_dict() == {} and aug.last_params == {}  # nothing to checkpoint, nothing drawn yet
    good_images, good_masks = torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 8)
    for bad_images, bad_masks in ((torch.zeros(2, 4, 8, 8), good_masks), (good_images, torch.zeros(2, 2, 8, 8)),
                                  (torch.zeros(3, 8, 8), good_masks), (good_images, torch.zeros(2, 8, 8))):
        with pytest.raises(ValueError, match=r"Augment expects images \(N, 3, H, W\) and masks \(N, 1, H, W\)"):
            Augment("light")(bad_images, bad_masks)
    with pytest.raises(ValueError, match=r"^images \(2, 3, 8, 8\) and masks \(3, 1, 8, 8\) do not match$"):
        Augment("light")(good_images, torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match=r"^images \(2, 3, 8, 8\) and masks \(2, 1, 8, 4\) do not match$"):
        Augment("light")(good_images, torch.zeros(2, 1, 8, 4))
    with pytest.raises(ValueError,
                       match=r"^unknown augmentation preset 'heavy'; choose one of paper, light, strong, none$"):
        Augment("heavy")
    with pytest.raises(ValueError, match=r"^unknown transform\(s\) \['elastic'\]; known: centre_crop, random_crop, "
                                         r"hflip, vflip, scale, rotate, rot90, cutout, brightness, shear, "
                                         r"translate, gain, contrast, saturation, hue, blur, jpeg$"):
        Augment("paper", only=["elastic"])


def test_brightness_adds_the_drawn_shift_and_clips_to_one():
    images = torch.full((64, 3, 8, 8), 0.9)
    images[:, :, :4] = 0.1
    torch.manual_seed(13)
    aug = Augment("paper", p=1.0, only=["brightness"])
    out, _ = aug(images, torch.zeros(64, 1, 8, 8))
    shift = aug.params()["brightness"].view(-1, 1, 1, 1)
    assert shift.min() < -0.1 and shift.max() > 0.15  # both signs drawn
    assert torch.allclose(out, (images + shift).clamp(0, 1), atol=1e-6)
    assert out.max() == 1.0 and (out[:, :, 4:] == 1.0).flatten(1).all(1).eq(shift.view(-1) >= 0.1).all()


@pytest.mark.parametrize("preset", ["none", "paper"])
def test_soft_targets_read_uint8_as_probabilities_and_must_match_the_masks(preset):
    """A teacher's probabilities come as uint8 x 255 or as floats: both give the same soft targets in [0, 1]
    (warped like the masks with the same draw), and a soft tensor of another shape is refused by name."""
    torch.manual_seed(0)
    images = torch.rand(4, 3, 24, 24)
    masks = torch.stack([torch.from_numpy(blob_mask(24, 24, k)) for k in range(4)])[:, None].float()
    soft_u8 = torch.randint(0, 256, (4, 1, 24, 24), dtype=torch.uint8)
    torch.manual_seed(1)
    _, _, from_u8 = Augment(preset)(images, masks, soft_u8)
    torch.manual_seed(1)
    _, _, from_float = Augment(preset)(images, masks, soft_u8.float() / 255.0)
    assert from_u8.shape == masks.shape and 0 <= from_u8.min() and from_u8.max() <= 1
    assert torch.allclose(from_u8, from_float, atol=1e-6)
    if preset == "none":  # nothing moves: the soft targets are the teacher's own values
        assert torch.allclose(from_u8, soft_u8.float() / 255.0)
    with pytest.raises(ValueError, match=r"soft targets \(4, 1, 12, 12\) and masks \(4, 1, 24, 24\) do not match"):
        Augment(preset)(images, masks, soft_u8[..., :12, :12])
