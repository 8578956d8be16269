"""Overlay drawing: the tint, the outline and the readout box, checked pixel by pixel against the formulas."""

from __future__ import annotations

import numpy as np
import pytest

from resunetpp.inference.overlay import POLYP_COLOR, draw_overlay, draw_text

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
    from resunetpp.inference.overlay import _line_width

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


def test_line_width_is_one_pixel_per_250_of_the_shorter_side_rounded():
    from resunetpp.inference.overlay import _line_width

    # 374 / 250 = 1.496 and 376 / 250 = 1.504: the rounding edge sits at 375, not a pixel later
    assert [_line_width((n, 2000)) for n in (100, 374, 376, 500, 624, 626)] == [1, 1, 2, 2, 2, 3]
    assert _line_width((2000, 376)) == 2  # the shorter side, whichever it is


def _under(image: np.ndarray, mask: np.ndarray, color, alpha: float) -> np.ndarray:
    """What draw_overlay gives before the outline: the tint inside the mask, the input outside."""
    under = image.astype(np.float64)
    under[mask] = np.round(under[mask] * (1 - alpha) + np.asarray(color, np.float64) * alpha)
    return under


def test_outline_is_an_anti_aliased_blend_towards_the_colour():
    image = np.empty((40, 40, 3), np.uint8)
    image[:] = BASE
    yy, xx = np.mgrid[:40, :40]
    mask = (yy - 20) ** 2 + (xx - 20) ** 2 <= 12 ** 2  # a disc: its outline is curved
    out = draw_overlay(image, mask).astype(np.float64)
    under = _under(image, mask, POLYP_COLOR, 0.35)
    green = np.asarray(POLYP_COLOR, np.float64)
    # each pixel is under * (1 - a) + colour * a for one coverage a per pixel (read off the green channel)
    a = (out[..., 1] - under[..., 1]) / (green[1] - under[..., 1])
    assert (a >= -0.01).all() and (a <= 1.01).all()
    rebuilt = under * (1 - a[..., None]) + green * a[..., None]
    assert np.abs(rebuilt - out).max() <= 2.0  # OpenCV's 8-bit coverage and the rounding of each channel
    # anti-aliased: many outline pixels are only partly covered (LINE_8 would give a in {0, 1} only)
    partial = (a > 0.1) & (a < 0.9)
    assert partial.sum() >= 60
    assert (a > 0.8).sum() >= 40  # and the line itself is there, nearly in full colour
    # the partial pixels hug the disc's edge (radius 12, line width 1 at 40 px)
    r = np.sqrt((yy - 20.0) ** 2 + (xx - 20.0) ** 2)
    assert (np.abs(r[partial] - 12) <= 2).all()


def test_every_region_gets_an_outline_but_holes_do_not():
    image = np.empty((40, 60, 3), np.uint8)
    image[:] = BASE
    mask = np.zeros((40, 60), bool)
    mask[5:15, 5:15] = True  # a small square
    mask[5:35, 25:55] = True  # and a larger one with a hole in it
    mask[15:25, 35:45] = False
    out = draw_overlay(image, mask)
    # both outer edges are outlined in the colour (not only the first contour OpenCV finds)
    for ring in (np.concatenate([out[5, 6:14], out[14, 6:14], out[6:14, 5], out[6:14, 14]]),
                 np.concatenate([out[5, 26:54], out[34, 26:54], out[6:34, 25], out[6:34, 54]])):
        assert (ring[:, 1] >= 225).all() and (ring[:, 0] <= 15).all() and (ring[:, 2] <= 30).all()
    # the hole is outside the mask and only outer contours are drawn: it stays exactly the input
    assert (out[15:25, 35:45] == BASE).all()
    # and its rim is plain tint, not outline
    tint = [round(b * 0.65 + c * 0.35) for b, c in zip(BASE, POLYP_COLOR)]
    assert (out[14, 35:45] == tint).all() and (out[25, 35:45] == tint).all()


# The readout's layout, for the lines below on a plain grey frame: (H, W) -> (box height, box width), and the
# text's extent inside the box (first row, last row, first column, last column, counted from the box's top-left).
# By the documented formulas: s = max(0.4, min(H, W) / 700); thickness max(1, round(2 s)); line height = text
# height (getTextSize) + round(8 s); box = (2 line heights + round(6 s)) x (widest line + round(12 s)); text from
# round(6 s) px right of the box's left edge. 60x160 is at the smallest scale 0.4 (line height 9 + 3, thickness 1),
# 700x1000 at scale 1 (22 + 8, thickness 2), 1080x1920 (HD video) at 1.543 (thickness 3).
READOUT = ["12.0 fps", "  33 ms"]
READOUT_GOLDEN = {
    (60, 160): ((26, 60), (2, 25, 4, 56)),
    (700, 1000): ((66, 149), (7, 62, 10, 140)),
    (1080, 1920): ((101, 230), (11, 95, 15, 216)),
}


@pytest.mark.parametrize("corner", ["top-left", "top-right", "bottom-left", "bottom-right"])
@pytest.mark.parametrize("size", list(READOUT_GOLDEN))
def test_readout_box_and_text_fall_where_the_layout_puts_them(size, corner):
    h, w = size
    (box_h, box_w), (t0, t1, l0, l1) = READOUT_GOLDEN[size]
    image = np.full((h, w, 3), 200, np.uint8)
    draw_text(image, READOUT, corner=corner)
    ys, xs = np.nonzero((image != 200).any(2))
    top = 0 if corner.startswith("top") else h - box_h
    left = 0 if corner.endswith("left") else w - box_w
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (top, top + box_h - 1, left, left + box_w - 1)
    box = image[top:top + box_h, left:left + box_w]
    assert (box >= 80).all() and (box == 80).mean() > 0.5  # the whole box is darkened (or text on it)
    ty, tx = np.nonzero((box > 80).any(2))
    assert (ty.min(), ty.max(), tx.min(), tx.max()) == (t0, t1, l0, l1)


@pytest.mark.parametrize("size,line_h", [((60, 160), 12), ((700, 1000), 30), ((1080, 1920), 46)])
def test_readout_lines_are_one_line_height_apart(size, line_h):
    one = np.full((*size, 3), 200, np.uint8)
    two = one.copy()
    draw_text(one, ["88"])
    draw_text(two, ["88", "88"])
    ys, xs = np.nonzero((one != 200).any(2))
    rows_one, cols = ys.max() + 1, xs.max() + 1
    rows_two = np.nonzero((two != 200).any(2))[0].max() + 1
    assert rows_two - rows_one == line_h  # one more line makes the box one line height taller
    ty = np.nonzero((one[:rows_one, :cols] > 80).any(2))[0]  # the text's rows, inside the box
    assert ty.max() - ty.min() + 1 < line_h
    first, last = ty.min(), ty.max() + 1
    assert np.array_equal(two[first:last], one[first:last])  # the first line is where it was alone
    # and the second is the same pixels, exactly one line height further down
    assert np.array_equal(two[first + line_h:last + line_h], one[first:last])


@pytest.mark.parametrize("size,thickness", [((60, 160), 1), ((700, 1000), 2), ((1080, 1920), 3)])
def test_readout_text_is_anti_aliased_with_the_documented_thickness(size, thickness):
    image = np.full((*size, 3), 200, np.uint8)
    draw_text(image, ["l"])  # FONT_HERSHEY_SIMPLEX's "l" is one vertical stroke
    ys, xs = np.nonzero((image != 200).any(2))
    box = image[:ys.max() + 1, :xs.max() + 1].astype(np.float64)
    assert (box[..., 0] == box[..., 1]).all() and (box[..., 0] == box[..., 2]).all()  # white on grey: grey
    ink = (box[..., 0] - 80) / (255 - 80)  # 0 on the bare box, 1 where the text is fully white
    levels = np.unique(box[..., 0])
    assert levels.min() == 80 and levels.max() >= 210
    assert ((levels > 80) & (levels < 210)).sum() >= 8  # anti-aliased: many grey levels between box and white
    # across the middle of the stroke, the ink per row (its width in pixels, partial pixels counted in part) is
    # the same on every row and set by the thickness: OpenCV's anti-aliased line of thickness t covers about 2t - 0.6
    per_row = ink.sum(1)
    stem = per_row[per_row > 0.5 * per_row.max()]
    middle = np.median(stem)
    assert abs(middle - {1: 1.41, 2: 3.43, 3: 5.37}[thickness]) < 0.1
    assert (np.abs(stem[2:-2] - middle) < 0.1).all()


def test_readout_box_taller_than_the_image_starts_at_its_top():
    image = np.full((20, 200, 3), 200, np.uint8)  # the two-line box is 26 rows high
    draw_text(image, READOUT, corner="bottom-right")
    box = (image != 200).any(2)
    ys, xs = np.nonzero(box)
    assert ys.min() == 0 and ys.max() == 19 and (xs.min(), xs.max()) == (140, 199)
    assert (image[0, 140:] == 80).all()  # the top row is darkened too, not left out of the box
