"""The answers' pieces: PNG and base64 encodings, the mask's connected components and the analysis of one
image, as JSON (`result_json`) or as one PNG (`result_png`). Every mask comes from `Segmenter.postprocess`.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from resunetpp.inference.findings import describe, threshold_levels
from resunetpp.inference.overlay import draw_overlay
from resunetpp.inference.segmenter import Segmenter

MAX_COMPONENTS = 100  # components listed per image (largest first); `components_total` counts all


def encode_png(array: np.ndarray) -> bytes:
    """`array` (grey, or BGR as OpenCV takes it) as PNG bytes, fast compression.

    Raises:
        RuntimeError: OpenCV could not encode it.
    """
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("OpenCV could not encode a PNG")
    return buf.tobytes()


def encode_prob16(prob: np.ndarray) -> bytes:
    """The probability map as an RGB PNG with 16 bits: p = (256 R + G) / 65535, B = 0.

    Browsers read 8 bits per channel from a canvas, so a 16-bit grey PNG would lose precision.
    """
    p16 = np.round(np.clip(prob, 0, 1) * 65535).astype(np.uint16)
    bgr = np.stack([np.zeros_like(p16, np.uint8), (p16 & 255).astype(np.uint8), (p16 >> 8).astype(np.uint8)], -1)
    return encode_png(bgr)


def b64(data: bytes) -> str:
    """`data` as base64 text, as the JSON answers carry images."""
    return base64.b64encode(data).decode("ascii")


def components(mask: np.ndarray, prob: np.ndarray, polygons: bool = False) -> tuple[list[dict[str, Any]], int]:
    """Connected components (8-connectivity) of the mask, largest first.

    Args:
        mask: (H, W) bool mask.
        prob: (H, W) probabilities.
        polygons: Add each component's outer contour [[x, y], ...] in image pixels.

    Returns:
        At most MAX_COMPONENTS components (box [x0, y0, x1, y1] with x1/y1 exclusive, area in pixels and as
        a fraction, confidence = mean probability inside), and the number of components in all.
    """
    m = mask.astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return [], 0
    sums = np.bincount(labels.ravel(), weights=prob.ravel().astype(np.float64), minlength=n)
    order = sorted(range(1, n), key=lambda i: -int(stats[i, cv2.CC_STAT_AREA]))
    total = mask.size
    out = []
    for i in order[:MAX_COMPONENTS]:
        x, y, w, h, area = (int(v) for v in stats[i])
        comp: dict[str, Any] = {"box": [x, y, x + w, y + h], "area": area, "area_fraction": round(area / total, 6),
                                "confidence": round(float(sums[i] / area), 4)}
        if polygons:
            sub = (labels[y:y + h, x:x + w] == i).astype(np.uint8)
            contours, _ = cv2.findContours(sub, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            c = max(contours, key=cv2.contourArea)
            c = cv2.approxPolyDP(c, 1.0, True) if len(c) > 8 else c
            comp["polygon"] = [[int(px) + x, int(py) + y] for px, py in c[:, 0, :]]
        out.append(comp)
    return out, n - 1


def analyse(mask: np.ndarray, prob: np.ndarray, polygons: bool = False) -> dict[str, Any]:
    """The finding of one mask: polyp or not, area, confidence, certainty, readout and components."""
    comps, total = components(mask, prob, polygons)
    finding = describe(mask, prob)  # polyp / no polyp, certainty and the readout, as every front end says them
    return {
        "polyp": bool(total),
        "area_fraction": round(float(mask.mean()), 6),
        "confidence": finding.confidence,
        "certainty": finding.certainty,
        "finding": finding.text,
        "max_probability": round(float(prob.max()), 4),
        "components": comps,
        "components_total": total,
    }


def model_brief(seg: Segmenter) -> dict[str, Any]:
    """The model's name, weights, backend, precision and input size, as each JSON answer names them."""
    return {"name": seg.config.get("model"), "weights": Path(seg.weights).name if seg.weights else None,
            "backend": seg.backend, "precision": seg.precision, "input_size": list(seg.input_size)}


def result_json(seg: Segmenter, image: np.ndarray, prob: np.ndarray, threshold: float | None, polygons: bool,
                want_prob: bool, want_levels: bool = False) -> dict[str, Any]:
    """The JSON analysis of one image.

    Args:
        seg: The segmenter that gave `prob`; it post-processes the mask.
        image: (H, W, 3) uint8 RGB.
        prob: (H, W) probabilities.
        threshold: None: the model's.
        polygons: Add each component's outline.
        want_prob: Add `prob_png` (16 bits in R and G).
        want_levels: Add `levels_png` and `min_area`, for redrawing the mask at any threshold (not with a CRF).

    Returns:
        width, height, model, threshold, the analysis (`analyse`) and mask_png (base64 PNG, 0/255).
    """
    mask = seg.postprocess(image, prob, threshold)
    out = {"width": int(image.shape[1]), "height": int(image.shape[0]), "model": model_brief(seg),
           "threshold": seg.threshold if threshold is None else threshold, **analyse(mask, prob, polygons),
           "mask_png": b64(encode_png(mask.astype(np.uint8) * 255))}
    if want_prob:
        out["prob_png"] = b64(encode_prob16(prob))
    if want_levels and seg.crf is None:  # the page's exact post-processing at every slider threshold
        out["levels_png"], out["min_area"] = b64(encode_png(threshold_levels(prob))), seg.min_area
    return out


def result_png(seg: Segmenter, image: np.ndarray, prob: np.ndarray, threshold: float | None, output: str,
               opacity: float) -> tuple[bytes, dict[str, str]]:
    """One image as the answer: the 0/255 mask, the overlay or the 8-bit probability map.

    Args:
        seg: The segmenter that gave `prob`; it post-processes the mask.
        image: (H, W, 3) uint8 RGB.
        prob: (H, W) probabilities.
        threshold: None: the model's.
        output: "mask", "overlay" or "prob".
        opacity: The overlay's tint weight.

    Returns:
        The PNG's bytes and the headers summing it up (X-Polyp, X-Area-Fraction, X-Threshold).
    """
    mask = seg.postprocess(image, prob, threshold)
    if output == "overlay":
        data = encode_png(cv2.cvtColor(draw_overlay(image, mask, alpha=opacity), cv2.COLOR_RGB2BGR))
    elif output == "prob":
        data = encode_png(np.round(prob * 255).astype(np.uint8))
    else:
        data = encode_png(mask.astype(np.uint8) * 255)
    return data, {"X-Polyp": str(int(mask.any())), "X-Area-Fraction": f"{mask.mean():.6f}",
                  "X-Threshold": str(seg.threshold if threshold is None else threshold)}
