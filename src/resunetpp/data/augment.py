"""Batched data augmentation as one warp, on whatever device the batch lives (CPU or GPU).

`Augment(preset)` maps (images (N, 3, H, W) uint8 or float in [0, 1], masks (N, 1, H, W) in {0, 1})
to (float images in [0, 1], float masks in {0, 1}) of the same shapes. Normalisation is not done here
(`resunetpp.inference.transforms.normalize` does it and checkpoints record it).

How: every random number of a batch comes from one ``torch.rand`` on the batch's device; the
geometric transforms of each sample are composed into one affine matrix; one ``grid_sample``
(bilinear, zero padding) warps image and mask together, and the mask is re-binarised at 0.5. Then
the photometric steps run as batched tensor ops on the image alone: a cutout hides the polyp, it does
not remove it. A batch costs a fixed, small number of operator calls (no per-transform passes, no
per-sample loop, no host-device sync but the JPEG step's, see ``strong``), so a GPU is not kept
waiting on launches. ``torch.manual_seed(s)`` before a call reproduces it.

Presets (each transform is drawn per sample with its own probability; applied in this order):

``paper`` -- the ResUNet++ paper's list:
  ============  =====  ======================================================================
  name          p      what
  ============  =====  ======================================================================
  centre_crop   0.25   centre crop of 80 % of the side (zoom 1.25 about the centre)
  random_crop   0.25   crop of 67-80 % of the side (zoom 1.25-1.5) at a uniformly drawn place
                       that keeps it inside the frame
  hflip         0.5    horizontal flip
  vflip         0.5    vertical flip
  scale         0.25   zoom 0.75-1.25 about the centre (zooming out pads with black / background)
  rotate        0.25   rotation by an angle drawn uniformly from 0-90 degrees (corners pad black)
  cutout        0.25   one black rectangle of 2-10 % of the area, aspect ratio 0.3-3.3
                       (log-uniform), placed inside the image -- image only
  brightness    0.25   additive brightness shift in [-0.2, 0.2], clipped to [0, 1] -- image only
  ============  =====  ======================================================================

``light`` -- hflip, vflip and rotation by a multiple of 90 degrees (each p 0.5; exact on square inputs).

``strong`` -- what the strong polyp-segmentation recipes (PraNet's lineage, EffiSegNet) share, for training
from scratch: a wide affine warp, then colour, blur and JPEG noise from Kornia (imported only here, so
the other presets do not need it):
  ============  =====  ======================================================================
  name          p      what
  ============  =====  ======================================================================
  hflip, vflip  0.5    flips
  scale         0.5    zoom 0.5-1.5 about the centre (zooming out pads black)
  rotate        0.5    rotation by -180 to 180 degrees, uniform
  shear         0.3    x and y shear, each by -15 to 15 degrees
  translate     0.3    shift by up to 10 % of the side, each axis
  gain          0.5    multiplicative brightness 0.6-1.6, clipped to [0, 1] -- image only
  contrast      0.5    blend with the image's mean grey, factor 0.7-1.3 -- image only
  saturation    0.3    HSV saturation x 0.7-1.3 -- image only
  hue           0.3    hue turned by -0.05 to 0.05 of the circle (greys stay grey) -- image only
  blur          0.3    Gaussian blur, sigma 0.1-2 pixels (13-tap kernel, edges replicated) -- image only
  jpeg          0.3    JPEG compression at quality 30-95 (Kornia's differentiable codec) -- image only
  ============  =====  ======================================================================
  The geometric ones are composed into the one warp like the others; the photometric steps run in the
  order of the table on the whole batch, and a sample that did not draw one keeps its pixels exactly.
  On a GPU the JPEG step costs a host-device sync per batch (Kornia reads the quality range).
  The older presets draw exactly the numbers they drew before ``strong`` existed: the new transforms' random
  columns are drawn only when one of them is used.

``none`` -- identity.

`Augment.last_params` holds the parameters drawn for the last batch (for inspection and tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PRESETS = ("paper", "light", "strong", "none")
# The first nine are the columns of the draw as it was before `strong`: presets that use only these draw
# exactly the same numbers as before; the rest come after them.
_BASE = ("centre_crop", "random_crop", "hflip", "vflip", "scale", "rotate", "rot90", "cutout", "brightness")
_TRANSFORMS = _BASE + ("shear", "translate", "gain", "contrast", "saturation", "hue", "blur", "jpeg")
GEOMETRIC = ("centre_crop", "random_crop", "hflip", "vflip", "scale", "rotate", "rot90", "shear", "translate")
PHOTOMETRIC = ("cutout", "brightness", "gain", "contrast", "saturation", "hue", "blur", "jpeg")
PRESET_TRANSFORMS = {
    "paper": ("centre_crop", "random_crop", "hflip", "vflip", "scale", "rotate", "cutout", "brightness"),
    "light": ("hflip", "vflip", "rot90"),
    "strong": ("hflip", "vflip", "scale", "rotate", "shear", "translate", "gain", "contrast", "saturation", "hue",
               "blur", "jpeg"),
    "none": (),
}
STRONG_P = {"hflip": 0.5, "vflip": 0.5, "scale": 0.5, "rotate": 0.5, "shear": 0.3, "translate": 0.3, "gain": 0.5,
            "contrast": 0.5, "saturation": 0.3, "hue": 0.3, "blur": 0.3, "jpeg": 0.3}
DEFAULT_P = {"centre_crop": 0.25, "random_crop": 0.25, "hflip": 0.5, "vflip": 0.5, "scale": 0.25, "rotate": 0.25,
             "rot90": 0.5, "cutout": 0.25, "brightness": 0.25,
             **{n: STRONG_P[n] for n in _TRANSFORMS if n not in _BASE}}
RANGES = {"centre_crop": (1.25, 1.25), "random_crop": (1.25, 1.5), "scale": (0.75, 1.25), "rotate": (0.0, 90.0),
          "cutout_area": (0.02, 0.1), "cutout_ratio": (0.3, 3.3), "brightness": (-0.2, 0.2),
          "shear": (-15.0, 15.0),        # degrees, x and y drawn separately
          "translate": (-0.1, 0.1),      # fraction of the side
          "gain": (0.6, 1.6),            # multiplicative brightness
          "contrast": (0.7, 1.3),        # blend with the image's mean grey
          "saturation": (0.7, 1.3),
          "hue": (-0.05, 0.05),          # fraction of the colour circle
          "blur": (0.1, 2.0),            # Gaussian sigma, pixels
          "jpeg": (30.0, 95.0)}          # quality
STRONG_RANGES = {**RANGES, "scale": (0.5, 1.5), "rotate": (-180.0, 180.0)}


def _value_table(r: dict) -> tuple:
    """The one uniform draw per batch: a "use it" column per transform, then value columns. Each value
    column maps u in [0, 1) to lo + u (hi - lo), gated by its transform: `neutral` when not used."""
    #    name            transform     lo, hi                        neutral
    return (
        ("centre_zoom", "centre_crop", 1.25, 1.25, 1.0),
        ("crop_zoom", "random_crop", *r["random_crop"], 1.0),
        ("zoom", "scale", *r["scale"], 1.0),
        ("crop_x", "random_crop", -1.0, 1.0, 0.0),         # crop centre, in units of its free play
        ("crop_y", "random_crop", -1.0, 1.0, 0.0),
        ("angle", "rotate", *(math.radians(a) for a in r["rotate"]), 0.0),
        ("quarter_turns", "rot90", 0.0, 4.0, 0.0),        # truncated to 0..3
        ("hflip", "hflip", -1.0, -1.0, 1.0),              # the sign of x
        ("vflip", "vflip", -1.0, -1.0, 1.0),
        ("brightness", "brightness", *r["brightness"], 0.0),
        ("cutout_area", "cutout", *r["cutout_area"], 0.0),   # fraction of H x W; 0 erases nothing
        ("cutout_log_ratio", "cutout", *(math.log(x) for x in r["cutout_ratio"]), 0.0),
        ("cutout_y", "cutout", 0.0, 1.0, 0.0),             # place, in units of the free play
        ("cutout_x", "cutout", 0.0, 1.0, 0.0),
        # the columns added with `strong`, after all of the above
        ("shear_x", "shear", *(math.radians(a) for a in r["shear"]), 0.0),
        ("shear_y", "shear", *(math.radians(a) for a in r["shear"]), 0.0),
        ("translate_x", "translate", *r["translate"], 0.0),
        ("translate_y", "translate", *r["translate"], 0.0),
        ("gain", "gain", *r["gain"], 1.0),
        ("contrast", "contrast", *r["contrast"], 1.0),
        ("saturation", "saturation", *r["saturation"], 1.0),
        ("hue", "hue", *r["hue"], 0.0),
        ("blur_sigma", "blur", *r["blur"], 0.0),           # sigma 0 is the identity kernel
        ("jpeg_quality", "jpeg", *r["jpeg"], 100.0),
    )


VALUE_NAMES = tuple(v[0] for v in _value_table(RANGES))
_V = {name: i for i, name in enumerate(VALUE_NAMES)}
_BLUR_SIZE = 2 * math.ceil(3 * RANGES["blur"][1]) + 1  # +-3 sigma of the widest blur
_COLOUR = ("gain", "contrast", "saturation", "hue", "blur", "jpeg")  # the photometric steps done with Kornia


class Augment(nn.Module):
    """Image/mask batch augmentation on the device; see the module docstring for the presets.

    Call it on uint8 images (N, 3, H, W) and masks (N, 1, H, W): it returns float images in [0, 1] and
    {0, 1} masks, each image with its own random draw.

    Args:
        preset: "paper", "light", "strong" or "none".
        p: every transform's probability (None: each its own default).
        only: keep just the named transforms (any known name), e.g. ``Augment("paper", p=1.0, only=["rotate"])``.

    Raises:
        ValueError: an unknown preset or transform name.
    """

    def __init__(self, preset: str = "paper", p: float | None = None, only: list[str] | tuple[str, ...] | None = None):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}")
        names = list(PRESET_TRANSFORMS[preset])
        if only is not None:
            unknown = [n for n in only if n not in _TRANSFORMS]
            if unknown:
                raise ValueError(f"unknown transform(s) {unknown}; known: {', '.join(_TRANSFORMS)}")
            names = list(only)
        self.preset = preset
        self.names = names
        self.geometric = any(n in GEOMETRIC for n in names)
        # only the original columns unless a newer transform is used: the old presets' draws stay as they were
        self.transforms = _BASE if set(names) <= set(_BASE) else _TRANSFORMS
        values = [v for v in _value_table(STRONG_RANGES if preset == "strong" else RANGES) if v[1] in self.transforms]
        self.value_names = tuple(v[0] for v in values)
        defaults = {**DEFAULT_P, **STRONG_P} if preset == "strong" else DEFAULT_P
        # probability 0 switches a transform off: its "use it" draw is never below 0
        probs = [(defaults[n] if p is None else p) if n in names else 0.0 for n in self.transforms]
        buffers = {"probs": torch.tensor(probs),
                   "lo": torch.tensor([v[2] for v in values]),
                   "width": torch.tensor([v[3] - v[2] for v in values]),
                   "neutral": torch.tensor([v[4] for v in values]),
                   "gate": torch.tensor([self.transforms.index(v[1]) for v in values]),
                   # exact cos + i sin of 0, 90, 180 and 270 degrees, so quarter turns move whole pixels
                   "quarter": torch.tensor([1, 1j, -1, -1j], dtype=torch.complex64),
                   "side_sign": torch.tensor([-0.5, 0.5])}
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)
        self._grids: dict[tuple, torch.Tensor] = {}
        self.last_params: dict[str, torch.Tensor] = {}

    def forward(self, images: torch.Tensor, masks: torch.Tensor, soft: torch.Tensor | None = None):
        """(images, masks) -> (images, masks); with `soft` (N, 1, H, W) probabilities (uint8 x 255 or float),
        (images, masks, soft): soft targets get the masks' warp, not their binarisation."""
        if images.ndim != 4 or images.shape[1] != 3 or masks.ndim != 4 or masks.shape[1] != 1:
            raise ValueError(f"Augment expects images (N, 3, H, W) and masks (N, 1, H, W), got "
                             f"{tuple(images.shape)} and {tuple(masks.shape)}")
        if images.shape[0] != masks.shape[0] or images.shape[2:] != masks.shape[2:]:
            raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} do not match")
        if self.probs.device != images.device:
            self.to(images.device)
        if soft is not None and soft.shape != masks.shape:
            raise ValueError(f"soft targets {tuple(soft.shape)} and masks {tuple(masks.shape)} do not match")
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        masks = masks.float()
        extra = () if soft is None else (soft.float() / 255.0 if soft.dtype == torch.uint8 else soft.float(),)
        if not self.names:
            return (images.clamp(0.0, 1.0), (masks > 0.5).float(), *extra)
        n, _, h, w = images.shape
        t = len(self.transforms)
        u = torch.rand(n, t + len(self.value_names), device=images.device)
        use = u[:, :t] < self.probs
        v = torch.where(use[:, self.gate], u[:, t:] * self.width + self.lo, self.neutral)
        self.last_params = {"use": use, "values": v}
        if self.geometric:
            x = torch.cat([images, masks, *extra], 1)
            grid = F.affine_grid(self._matrices(v, h, w), [n, x.shape[1], h, w], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            images, masks, extra = x[:, :3], (x[:, 3:4] > 0.5).float(), (x[:, 4:],) if extra else ()
        if "brightness" in self.names:
            images = images + v[:, _V["brightness"]].view(n, 1, 1, 1)
        if any(name in _COLOUR for name in self.names):
            images = self._colour(images, use, v)
        if "cutout" in self.names:
            images = images.masked_fill(self._cutout(v, h, w), 0.0)
        return (images.clamp(0.0, 1.0), masks, *extra)  # not clamp_: `images` may be the caller's tensor

    def params(self) -> dict[str, torch.Tensor]:
        """The last batch's drawn values by name (each (N,)), and which transforms it used ("use_<name>")."""
        p = {name: self.last_params["values"][:, i] for i, name in enumerate(self.value_names)}
        p.update({f"use_{name}": self.last_params["use"][:, i] for i, name in enumerate(self.transforms)})
        return p

    def _matrices(self, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(N, 2, 3) sampling matrices (output -> input, normalised coordinates) of the composed transforms.

        In centred coordinates the chain is input <- translation <- centre crop <- random crop <- flips <-
        scale <- rotation <- quarter turns <- shear <- output. The zooms are scalars, so the linear part is
        flips x rotation x shear / (product of the zooms); the shift is the translation's plus the random
        crop's, which moves its centre at most (1 - 1/zoom) of the half-side, then shrinks by the centre
        crop's zoom.
        """
        zc, zr = v[:, _V["centre_zoom"]], v[:, _V["crop_zoom"]]
        inv = v[:, :3].prod(1).reciprocal()
        shift = v[:, _V["crop_x"]:_V["crop_y"] + 1] * ((zr - 1) / (zr * zc)).unsqueeze(1)
        angle = v[:, _V["angle"]]
        turn = torch.polar(torch.ones_like(angle), angle) * self.quarter[v[:, _V["quarter_turns"]].long()]
        cos, sin = turn.real, turn.imag
        # a pixel-space rotation in normalised coordinates: the off-diagonals carry the aspect ratio
        rot = torch.stack([cos, sin * (-h / w), sin * (w / h), cos], 1).view(-1, 2, 2)
        if "shear" in self.names:  # x += tan(sx) y, y += tan(sy) x in pixels, then rotated
            tan = v[:, _V["shear_x"]:_V["shear_y"] + 1].tan()
            ones = torch.ones_like(cos)
            rot = rot @ torch.stack([ones, tan[:, 0] * (h / w), tan[:, 1] * (w / h), ones], 1).view(-1, 2, 2)
        if "translate" in self.names:  # a fraction of the side is twice that in normalised coordinates
            shift = shift + 2 * v[:, _V["translate_x"]:_V["translate_y"] + 1]
        flip_zoom = v[:, _V["hflip"]:_V["vflip"] + 1] * inv.unsqueeze(1)
        return torch.cat([rot * flip_zoom.unsqueeze(2), shift.unsqueeze(2)], 2)

    def _colour(self, images: torch.Tensor, use: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Gain, contrast, saturation and hue, blur, JPEG (Kornia), in that order, on the whole batch; a sample
        that did not draw a step keeps its image exactly (the HSV round trip and the codec are not exact)."""
        import kornia  # only `strong` and its transforms need it

        n = len(images)
        col = {name: v[:, i] for i, name in enumerate(self.value_names)}
        drew = {name: use[:, i].view(n, 1, 1, 1) for i, name in enumerate(self.transforms)}
        images = images.clamp(0.0, 1.0)  # HSV and the codec expect [0, 1]
        if "gain" in self.names:
            images = (images * col["gain"].view(n, 1, 1, 1)).clamp(0.0, 1.0)
        if "contrast" in self.names:  # factor 1 is exact: x * 1 + mean * 0
            images = kornia.enhance.adjust_contrast_with_mean_subtraction(images, col["contrast"])
        if "saturation" in self.names or "hue" in self.names:
            hsv = kornia.color.rgb_to_hsv(images)
            if "saturation" in self.names:
                hsv = kornia.enhance.adjust_saturation_raw(hsv, col["saturation"])
            if "hue" in self.names:  # Kornia's hue is in radians
                hsv = kornia.enhance.adjust_hue_raw(hsv, col["hue"] * (2 * math.pi))
            images = torch.where(drew["saturation"] | drew["hue"], kornia.color.hsv_to_rgb(hsv).clamp(0.0, 1.0), images)
        if "blur" in self.names:  # one kernel per sample, built on the device: no host read of sigma
            kernel = kornia.filters.get_gaussian_kernel1d(_BLUR_SIZE, col["blur_sigma"].unsqueeze(1))
            blurred = kornia.filters.filter2d_separable(images, kernel, kernel, border_type="replicate")
            images = torch.where(drew["blur"], blurred, images)
        if "jpeg" in self.names:
            coded = kornia.enhance.jpeg_codec_differentiable(images, col["jpeg_quality"])
            images = torch.where(drew["jpeg"], coded, images)
        return images

    def _cutout(self, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(N, 1, H, W) bool: the erased rectangle of each sample (empty where no cutout was drawn)."""
        key = (h, w, v.device)
        if key not in self._grids:  # pixel-centre coordinates, made once per size
            ys, xs = torch.meshgrid(torch.arange(h, device=v.device), torch.arange(w, device=v.device), indexing="ij")
            self._grids[key] = (torch.stack([ys, xs]).float() + 0.5, torch.tensor([h, w], device=v.device))
        coords, hw = self._grids[key]
        area = v[:, _V["cutout_area"]] * (h * w)
        # height, width = sqrt(area / ratio), sqrt(area * ratio), at most the image's
        sides = torch.minimum((area.log().unsqueeze(1) + v[:, _V["cutout_log_ratio"], None] * self.side_sign * 2)
                              .mul(0.5).exp(), hw)
        centre = sides * 0.5 + v[:, _V["cutout_y"]:_V["cutout_x"] + 1] * (hw - sides)
        n = len(v)
        inside = (coords - centre.view(n, 2, 1, 1)).abs() < (sides * 0.5).view(n, 2, 1, 1)
        return inside.all(1, keepdim=True)

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, transforms={self.names}"
