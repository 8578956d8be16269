"""Drawing predictions for people: a tinted, outlined polyp region and a text readout.

`draw_label` writes a finding ("no polyp found", or "polyp outlined: 11.3 % of the image; model certainty
high", `resunetpp.inference.findings`) on an overlay, so an image with nothing outlined never looks like a failed run.

All functions take and return (H, W, 3) uint8 **RGB** arrays (as `resunetpp.io.read_image` gives);
convert to BGR yourself before handing frames to OpenCV's writers. Inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

POLYP_COLOR = (0, 255, 0)  # RGB; green reads well against the reddish mucosa
TEXT_COLOR = (255, 255, 255)


def _line_width(shape: Sequence[int]) -> int:
    # thin enough for a 332 px image, still visible on 1920x1080 video
    return max(1, round(min(shape[0], shape[1]) / 250))


def draw_overlay(image: np.ndarray, mask: np.ndarray, color: Sequence[int] = POLYP_COLOR, alpha: float = 0.35,
                 thickness: int | None = None) -> np.ndarray:
    """The image with the mask's region tinted by `color` (blend weight `alpha`) and its
    outline drawn with OpenCV contours. `mask` is (H, W) bool at the image's resolution.

    Inside the mask each pixel becomes `round(v * (1 - alpha) + color * alpha)`; outside it is kept.
    The outline is the outer edge of every connected region (holes are not outlined), anti-aliased,
    `thickness` px wide, by default one pixel per 250 px of the image's shorter side, rounded, at least 1.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"draw_overlay expects an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
    out = image.copy()
    m = mask.astype(bool)
    if not m.any():
        return out
    tint = np.asarray(color, dtype=np.float32)
    out[m] = (out[m].astype(np.float32) * (1 - alpha) + tint * alpha).round().astype(np.uint8)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), thickness or _line_width(image.shape),
                     lineType=cv2.LINE_AA)
    return out


def draw_text(image: np.ndarray, lines: Sequence[str], corner: str = "top-left") -> np.ndarray:
    """Draw `lines` of text on a dark box in a corner, in place, and return the image.

    Used for the live frames-per-second and latency readout of `resunetpp video`.

    Layout, in pixels, with the font scale `s = max(0.4, min(H, W) / 700)` (the text keeps its size
    relative to the frame): white, anti-aliased FONT_HERSHEY_SIMPLEX at scale `s` and thickness
    `max(1, round(2 s))`; a line is `round(8 s)` taller than the tallest line's text (OpenCV's
    getTextSize height); the box is the widest line plus `round(12 s)` wide and the lines' heights plus
    `round(6 s)` high, flush with `corner` ("top-left", "top-right", "bottom-left", "bottom-right"; a box
    larger than the image starts at its top / left edge), and the scene under it is darkened to 0.4 of
    its value (truncated). Line i's baseline is (i + 1) line heights below the box's top, and it starts
    `round(6 s)` right of the box's left edge.
    """
    if not lines:
        return image
    h, w = image.shape[:2]
    scale = max(0.4, min(h, w) / 700)
    thick = max(1, round(scale * 2))
    sizes = [cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0] for t in lines]
    line_h = max(s[1] for s in sizes) + round(8 * scale)
    box_w = max(s[0] for s in sizes) + round(12 * scale)
    box_h = line_h * len(lines) + round(6 * scale)
    x0 = 0 if corner.endswith("left") else max(0, w - box_w)
    y0 = 0 if corner.startswith("top") else max(0, h - box_h)
    region = image[y0:y0 + box_h, x0:x0 + box_w]
    region[:] = (region.astype(np.float32) * 0.4).astype(np.uint8)  # darken, keep the scene visible
    for i, text in enumerate(lines):
        org = (x0 + round(6 * scale), y0 + line_h * (i + 1))
        cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, TEXT_COLOR, thick, cv2.LINE_AA)
    return image


CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def draw_label(image: np.ndarray, text: str, mask: np.ndarray | None = None) -> np.ndarray:
    """Draw one line of `text` (a finding: "no polyp found", or "polyp outlined: ...") with `draw_text`, in place,
    in the corner whose box covers the fewest pixels of `mask` (the first of top-left, top-right, bottom-left,
    bottom-right on a tie), so the label hides as little of the outlined polyp as it can. Returns the image."""
    h, w = image.shape[:2]
    if mask is None or not mask.any():
        return draw_text(image, [text], "top-left")
    scale = max(0.4, min(h, w) / 700)
    thick = max(1, round(scale * 2))
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    box_w, box_h = tw + round(12 * scale), th + round(8 * scale) + round(6 * scale)

    def covered(corner: str) -> int:
        x0 = 0 if corner.endswith("left") else max(0, w - box_w)
        y0 = 0 if corner.startswith("top") else max(0, h - box_h)
        return int(mask[y0:y0 + box_h, x0:x0 + box_w].sum())

    return draw_text(image, [text], min(CORNERS, key=covered))
