"""Fully-connected CRF post-processing (Krähenbühl & Koltun 2011) via the optional `pydensecrf2`.

Install it with `pip install "resunetpp[crf]"`; without it `crf_refine` raises `CRFUnavailableError`
saying so. Two modes, both with two labels (background, polyp):

* ``"mask"`` (the default): the ResUNet++ follow-up's settings (Jha et al., IEEE JBHI 2021, their
  `apply_crf`): the unary comes from the *thresholded* mask with ground-truth probability 0.7, a
  Gaussian (position-only) pairwise term with sxy=3 and compat=3, 10 mean-field iterations. It is
  the default because it is the published protocol whose numbers can be compared; it only
  smooths the mask's outline and removes specks, it never looks at colours.
  One deliberate fix: the follow-up relabels the mask with `np.unique`, which turns an all-polyp
  mask into all-background; here the labels are the mask itself.
* ``"bilateral"``: the soft probabilities are the unary (-log p), plus the Gaussian term and a
  bilateral term on the image's colours (sxy=80, srgb=13, compat=10, the values of the DenseCRF
  and DeepLab examples), so edges can move toward colour boundaries.

`crf_refine` returns the posterior probability of the polyp label, float32 (H, W); the refined
mask is `posterior > 0.5` (the MAP labelling for two labels).
"""

from __future__ import annotations

import numpy as np

CRF_MODES = ("mask", "bilateral")


class CRFUnavailableError(ImportError):
    def __init__(self) -> None:
        super().__init__("CRF post-processing needs the optional package pydensecrf2: "
                         "pip install \"resunetpp[crf]\" (or pip install pydensecrf2)")


def _pydensecrf():
    """The modules (densecrf, utils) of pydensecrf2, or `CRFUnavailableError`."""
    try:
        from pydensecrf import densecrf, utils  # the optional extra resunetpp[crf]
    except ImportError:
        raise CRFUnavailableError() from None
    return densecrf, utils


def crf_available() -> bool:
    """Whether pydensecrf2 (the `crf` extra) is installed."""
    try:
        _pydensecrf()
    except CRFUnavailableError:
        return False
    return True


def crf_refine(image: np.ndarray, prob: np.ndarray, mode: str = "mask", threshold: float = 0.5,
               iterations: int = 10, gt_prob: float = 0.7, sxy_gaussian: float = 3, compat_gaussian: float = 3,
               sxy_bilateral: float = 80, srgb: float = 13, compat_bilateral: float = 10) -> np.ndarray:
    """Refine a polyp probability map with a dense CRF; see the module docstring for the modes.

    Args:
        image: (H, W, 3) uint8 RGB.
        prob: (H, W) float in [0, 1], at the image's resolution.
        mode: "mask" (the thresholded mask as unary, position-only pairwise term) or "bilateral" (the
            probabilities as unary, plus a term on the image's colours).
        threshold: The threshold of the "mask" mode's unary.
        iterations: Mean-field iterations.
        gt_prob: The "mask" mode's confidence in its labels.
        sxy_gaussian: Spatial scale of the Gaussian pairwise term.
        compat_gaussian: Weight of the Gaussian pairwise term.
        sxy_bilateral: Spatial scale of the bilateral term ("bilateral" mode).
        srgb: Colour scale of the bilateral term ("bilateral" mode).
        compat_bilateral: Weight of the bilateral term ("bilateral" mode).

    Returns:
        The posterior probability of the polyp label, float32 (H, W); the refined mask is `> 0.5`.

    Raises:
        CRFUnavailableError: pydensecrf2 is not installed.
        ValueError: An unknown mode, or image and probability map of different sizes.
    """
    dcrf, utils = _pydensecrf()
    if mode not in CRF_MODES:
        raise ValueError(f"unknown CRF mode {mode!r}; choose one of {', '.join(CRF_MODES)}")
    if image.shape[:2] != prob.shape:
        raise ValueError(f"image {image.shape[:2]} and probability map {prob.shape} differ in size")
    h, w = prob.shape
    d = dcrf.DenseCRF2D(w, h, 2)
    if mode == "mask":
        labels = (prob > threshold).astype(np.int32).ravel()
        d.setUnaryEnergy(utils.unary_from_labels(labels, 2, gt_prob=gt_prob, zero_unsure=False))
    else:
        p = np.clip(prob.astype(np.float32), 1e-5, 1 - 1e-5)
        d.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(np.stack([1 - p, p]))))
    d.addPairwiseGaussian(sxy=(sxy_gaussian, sxy_gaussian), compat=compat_gaussian, kernel=dcrf.DIAG_KERNEL,
                          normalization=dcrf.NORMALIZE_SYMMETRIC)
    if mode == "bilateral":
        d.addPairwiseBilateral(sxy=(sxy_bilateral, sxy_bilateral), srgb=(srgb, srgb, srgb),
                               rgbim=np.require(image, np.uint8, ["C", "W"]), compat=compat_bilateral,
                               kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
    q = np.asarray(d.inference(iterations), dtype=np.float32).reshape(2, h, w)
    return q[1]
