"""What every front end says about one image: polyp or "no polyp found", how much of the image is
outlined and how certain the model is, in plain language; and the post-processed masks at every
threshold the page's slider offers (before the min-area filter, which the page applies as `drop_small_components`
does), so the page shows exactly what the API, `predict` and `video` give.

Definitions (shared by the page, the API, `predict`'s CSV and overlays, and `video`):

* The **finding** comes from the post-processed mask (`Segmenter.postprocess`: threshold, or CRF, then
  the components under `min_area` dropped): "polyp" if any pixel is left, else "no polyp found".
* **Area**: the outlined pixels as a fraction of the image.
* **Model certainty**: the mean of the model's probability over the outlined pixels (the API's
  `confidence`), in words: high at 0.90 or more, medium from 0.75, low below. It says how sure the model is
  of the pixels it outlined, not how likely the finding is a polyp; it is not calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

CERTAINTY_LEVELS = ((0.90, "high"), (0.75, "medium"), (0.0, "low"))  # (lowest confidence, word)
NO_POLYP = "no polyp found"
LEVEL_STEPS = 100  # the page's threshold slider: 0.00, 0.01, ..., 1.00
CERTAINTY_DEFINITION = ("Model certainty is the mean of the model's probability over the outlined pixels: "
                        "high at 0.90 or more, medium from 0.75, low below 0.75. It says how sure the model is "
                        "of the pixels it outlined, not how likely the finding is a polyp.")


def certainty(confidence: float | None) -> str | None:
    """'high', 'medium' or 'low' for a mean probability inside the mask (None for no polyp).
    `confidence` is rounded to 4 decimals first, as the API reports it."""
    if confidence is None:
        return None
    c = round(float(confidence), 4)
    return next(word for low, word in CERTAINTY_LEVELS if c >= low)


def percent(fraction: float) -> str:
    """An area fraction as the readout shows it: one decimal, '11.3 %'."""
    return f"{100 * fraction:.1f} %"


@dataclass(frozen=True)
class Finding:
    polyp: bool
    area_fraction: float
    confidence: float | None  # mean probability inside the mask, 4 decimals; None without a polyp
    certainty: str | None

    @property
    def text(self) -> str:
        """'polyp outlined: 11.3 % of the image; model certainty high', or 'no polyp found'."""
        if not self.polyp:
            return NO_POLYP
        return f"polyp outlined: {percent(self.area_fraction)} of the image; model certainty {self.certainty}"

    @property
    def short(self) -> str:
        """One short line for a video frame: 'polyp 11.3 %, certainty high', or 'no polyp found'."""
        return f"polyp {percent(self.area_fraction)}, certainty {self.certainty}" if self.polyp else NO_POLYP

    def as_dict(self) -> dict[str, Any]:
        return {"polyp": self.polyp, "area_fraction": round(self.area_fraction, 6), "confidence": self.confidence,
                "certainty": self.certainty, "finding": self.text}


def describe(mask: np.ndarray, prob: np.ndarray) -> Finding:
    """The finding for a post-processed (H, W) bool `mask` and its (H, W) probability map."""
    mask = np.asarray(mask, dtype=bool)
    inside = prob[mask]
    conf = round(float(inside.mean()), 4) if inside.size else None
    return Finding(polyp=bool(inside.size), area_fraction=float(mask.mean()), confidence=conf,
                   certainty=certainty(conf))


def threshold_levels(prob: np.ndarray, steps: int = LEVEL_STEPS) -> np.ndarray:
    """(H, W) uint8 L with `(L > i) == (prob > i / steps)` for every i in 0..steps, exactly as
    `Segmenter.postprocess` compares (float32 probabilities against the threshold).

    The page gets L once per image and, for any slider threshold i / steps, thresholds it (L > i) and drops
    the 8-connected components under `min_area` of the image, as `drop_small_components` does: the same
    post-processed mask as the API, `predict` and `video`, without asking the server again.
    """
    if not 1 <= steps <= 254:
        raise ValueError(f"steps must lie in 1..254 (a uint8 image), got {steps}")
    levels = np.zeros(prob.shape, np.uint8)
    for i in range(steps + 1):
        levels += prob > i / steps
    return levels
