"""Overlay drawing: the tint, the outline and the readout box, checked pixel by pixel against the formulas."""

from __future__ import annotations

import numpy as np
import pytest

from resunetpp.overlay import POLYP_COLOR, draw_overlay, draw_text

BASE = (100, 50, 200)


def _square(h: int = 20, w: int = 20, top: int = 5, side: int = 10) -> tuple[np.ndarray, np.ndarray]:
    image = np.empty((h, w, 3), np.uint8)
    image[:] = BASE
    mask = np.zeros((h, w), bool)
    mask[top:top + side, top:top + side] = True
    return image, mask


def test_inside_is_the_alpha_blend_outside_is_untouched_and_the_outline_is_the_colour():
    image, mask = _square()
    kept = image.copy()
    out = draw_overlay(image, mask)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(image, kept)  # the input is never modified
    # inside, away from the outline: round(v (1 - 0.35) + c 0.35) per channel, by hand
    expected = [round(b * 0.65 + c * 0.35) for b, c in zip(BASE, POLYP_COLOR)]
    assert expected == [65, 122, 130]
    assert (out[7:13, 7:13] == expected).all()
    # two pixels or more away from the square: exactly the input
    far = np.ones((20, 20), bool)
    far[3:17, 3:17] = False
    assert (out[far] == BASE).all()
    # the outline runs along the mask's edge in the polyp colour (anti-aliased: nearly pure green)
    ring = np.concatenate([out[5, 6:14], out[14, 6:14], out[6:14, 5], out[6:14, 14]])
    assert (ring[:, 1] >= 225).all() and (ring[:, 0] <= 15).all() and (ring[:, 2] <= 30).all()


def test_other_colour_alpha_and_a_thick_outline():
    image, mask = _square(40, 40, 10, 20)
    out = draw_overlay(image, mask, color=(255, 0, 0), alpha=0.5, thickness=3)
    expected = [round(b * 0.5 + c * 0.5) for b, c in zip(BASE, (255, 0, 0))]
    assert (out[15:25, 15:25] == expected).all()
    edge = out[10, 14:26]  # a 3 px line covers the edge row fully
    assert (edge[:, 0] >= 240).all() and (edge[:, 1] <= 15).all()
    assert (out[:6] == BASE).all() and (out[35:] == BASE).all()


def test_empty_mask_gives_an_identical_copy_and_bad_inputs_are_refused():
    image, mask = _square()
    out = draw_overlay(image, np.zeros_like(mask))
    assert np.array_equal(out, image) and out is not image
    with pytest.raises(ValueError, match="uint8"):
        draw_overlay(image.astype(np.float32), mask)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        draw_overlay(image[..., 0], mask)
    with pytest.raises(ValueError, match="does not match"):
        draw_overlay(image, mask[:10])


@pytest.mark.parametrize("corner", ["top-left", "bottom-right"])
def test_readout_box_darkens_its_corner_and_writes_white_text(corner):
    image = np.full((60, 160, 3), 200, np.uint8)
    same = draw_text(image, ["12.0 fps", "  33 ms"], corner=corner)
    assert same is image  # drawn in place
    changed = (image != 200).any(2)
    ys, xs = np.nonzero(changed)
    box = image[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert (box == 80).mean() > 0.5  # darkened to 0.4 of the scene, int(200 * 0.4)
    assert box.max() > 200  # white (anti-aliased) text on it, brighter than the scene
    assert box.min() == 80  # nothing darker than the box: text blends from the box towards white
    if corner == "top-left":
        assert ys.min() == 0 and xs.min() == 0 and (image[:, -40:] == 200).all()
    else:
        assert ys.max() == 59 and xs.max() == 159 and (image[:, :40] == 200).all()
    assert changed.mean() < 0.8
    blank = np.full((10, 10, 3), 7, np.uint8)
    assert (draw_text(blank, []) == 7).all()


@pytest.mark.parametrize("corner", ["top-left", "bottom-right"])
@pytest.mark.parametrize("h,w", [(60, 160), (900, 1400)])
def test_readout_text_lies_inside_its_box(corner, h, w):
    image = np.full((h, w, 3), 200, np.uint8)
    draw_text(image, ["12.0 fps", "  33 ms"], corner=corner)
    box = (image == 80).all(2)  # the darkened box (text pixels are brighter)
    by, bx = np.nonzero(box)
    top, bottom, left, right = by.min(), by.max(), bx.min(), bx.max()
    ty, tx = np.nonzero((image > 120).all(2) & (image != 200).any(2))  # text: brighter than the box
    assert len(ty) > 20
    assert top < ty.min() and ty.max() <= bottom and left < tx.min() and tx.max() < right
    assert (image[top:bottom + 1, left:right + 1] <= 255).all() and (image[top:bottom + 1, left:right + 1] >= 80).all()
    assert ty.min() - top < ty.max() - ty.min()  # the first line starts near the top, not a line further down
    if corner == "top-left":
        assert (top, left) == (0, 0)
    else:
        assert (bottom, right) == (h - 1, w - 1)


def test_readout_box_wider_than_a_tiny_image_starts_at_its_edge():
    image = np.full((40, 30, 3), 200, np.uint8)
    draw_text(image, ["123.4 fps"], corner="bottom-right")
    ys, xs = np.nonzero((image != 200).any(2))
    assert xs.min() == 0 and xs.max() == 29


def test_outline_width_grows_with_the_image():
    from resunetpp.overlay import _line_width

    assert _line_width((332, 487, 3)) == 1 and _line_width((1080, 1920, 3)) == 4 and _line_width((1920, 1080)) == 4
    image = np.zeros((1080, 1920, 3), np.uint8)
    mask = np.zeros((1080, 1920), bool)
    mask[300:700, 600:1200] = True
    out = draw_overlay(image, mask)
    row = out[500, 560:640, 1]  # across the left edge: the green outline is about 4 px wide
    assert 3 <= (row >= 200).sum() <= 6


def test_mask_size_error_names_both_shapes():
    image, mask = _square()
    with pytest.raises(ValueError, match=r"^mask shape \(10, 20\) does not match image shape \(20, 20\)$"):
        draw_overlay(image, mask[:10])
