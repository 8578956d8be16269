"""Batched data augmentation as one warp, on whatever device the batch lives (CPU or GPU).

`Augment(preset)` maps (images (N, 3, H, W) uint8 or float in [0, 1], masks (N, 1, H, W) in {0, 1})
to (float images in [0, 1], float masks in {0, 1}) of the same shapes. Normalisation is not done here
(`resunetpp.inference.transforms.normalize` does it and checkpoints record it).

How: every random number of a batch comes from one ``torch.rand`` on the batch's device; the
geometric transforms of each sample are composed into one affine matrix; one ``grid_sample``
(bilinear, zero padding) warps image and mask together, and the mask is re-binarised at 0.5. Then
brightness and cutout run as batched tensor ops on the image alone: a cutout hides the polyp, it does
not remove it. A batch costs a fixed, small number of operator calls (no per-transform passes, no
host-device sync), so a GPU is not kept waiting on launches. ``torch.manual_seed(s)`` before a call
reproduces it.

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
``none`` -- identity.

`Augment.last_params` holds the parameters drawn for the last batch (for inspection and tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PRESETS = ("paper", "light", "none")
GEOMETRIC = ("centre_crop", "random_crop", "hflip", "vflip", "scale", "rotate", "rot90")
PHOTOMETRIC = ("cutout", "brightness")
PRESET_TRANSFORMS = {
    "paper": ("centre_crop", "random_crop", "hflip", "vflip", "scale", "rotate", "cutout", "brightness"),
    "light": ("hflip", "vflip", "rot90"),
    "none": (),
}
DEFAULT_P = {"centre_crop": 0.25, "random_crop": 0.25, "hflip": 0.5, "vflip": 0.5, "scale": 0.25, "rotate": 0.25,
             "rot90": 0.5, "cutout": 0.25, "brightness": 0.25}
RANGES = {"centre_crop": (1.25, 1.25), "random_crop": (1.25, 1.5), "scale": (0.75, 1.25), "rotate": (0.0, 90.0),
          "cutout_area": (0.02, 0.1), "cutout_ratio": (0.3, 3.3), "brightness": (-0.2, 0.2)}
# The one uniform draw per batch: a "use it" column per transform, then value columns. Each value
# column maps u in [0, 1) to lo + u (hi - lo), gated by its transform: `neutral` when not used.
#   name            transform     lo, hi                        neutral
_VALUES = (
    ("centre_zoom", "centre_crop", 1.25, 1.25, 1.0),
    ("crop_zoom", "random_crop", *RANGES["random_crop"], 1.0),
    ("zoom", "scale", *RANGES["scale"], 1.0),
    ("crop_x", "random_crop", -1.0, 1.0, 0.0),         # crop centre, in units of its free play
    ("crop_y", "random_crop", -1.0, 1.0, 0.0),
    ("angle", "rotate", 0.0, math.radians(RANGES["rotate"][1]), 0.0),
    ("quarter_turns", "rot90", 0.0, 4.0, 0.0),        # truncated to 0..3
    ("hflip", "hflip", -1.0, -1.0, 1.0),              # the sign of x
    ("vflip", "vflip", -1.0, -1.0, 1.0),
    ("brightness", "brightness", *RANGES["brightness"], 0.0),
    ("cutout_area", "cutout", *RANGES["cutout_area"], 0.0),   # fraction of H x W; 0 erases nothing
    ("cutout_log_ratio", "cutout", *(math.log(r) for r in RANGES["cutout_ratio"]), 0.0),
    ("cutout_y", "cutout", 0.0, 1.0, 0.0),             # place, in units of the free play
    ("cutout_x", "cutout", 0.0, 1.0, 0.0),
)
VALUE_NAMES = tuple(v[0] for v in _VALUES)
_V = {name: i for i, name in enumerate(VALUE_NAMES)}
_TRANSFORMS = GEOMETRIC + PHOTOMETRIC


class Augment(nn.Module):
    """Image/mask batch augmentation on the device; see the module docstring for the presets.

    Call it on uint8 images (N, 3, H, W) and masks (N, 1, H, W): it returns float images in [0, 1] and
    {0, 1} masks, each image with its own random draw.

    Args:
        preset: "paper", "light" or "none".
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
        # probability 0 switches a transform off: its "use it" draw is never below 0
        probs = [(DEFAULT_P[n] if p is None else p) if n in names else 0.0 for n in _TRANSFORMS]
        buffers = {"probs": torch.tensor(probs),
                   "lo": torch.tensor([v[2] for v in _VALUES]),
                   "width": torch.tensor([v[3] - v[2] for v in _VALUES]),
                   "neutral": torch.tensor([v[4] for v in _VALUES]),
                   "gate": torch.tensor([_TRANSFORMS.index(v[1]) for v in _VALUES]),
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
        t = len(_TRANSFORMS)
        u = torch.rand(n, t + len(_VALUES), device=images.device)
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
        if "cutout" in self.names:
            images = images.masked_fill(self._cutout(v, h, w), 0.0)
        return (images.clamp(0.0, 1.0), masks, *extra)  # not clamp_: `images` may be the caller's tensor

    def params(self) -> dict[str, torch.Tensor]:
        """The last batch's drawn values by name (each (N,)), and which transforms it used ("use_<name>")."""
        p = {name: self.last_params["values"][:, i] for i, name in enumerate(VALUE_NAMES)}
        p.update({f"use_{name}": self.last_params["use"][:, i] for i, name in enumerate(_TRANSFORMS)})
        return p

    def _matrices(self, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(N, 2, 3) sampling matrices (output -> input, normalised coordinates) of the composed transforms.

        In centred coordinates the chain is input <- centre crop <- random crop <- flips <- scale <-
        rotation <- quarter turns <- output. The zooms are scalars, so the linear part is flips x
        rotation / (product of the zooms); the only shift is the random crop's, which moves its centre
        at most (1 - 1/zoom) of the half-side, then shrinks by the centre crop's zoom.
        """
        zc, zr = v[:, _V["centre_zoom"]], v[:, _V["crop_zoom"]]
        inv = v[:, :3].prod(1).reciprocal()
        shift = v[:, _V["crop_x"]:_V["crop_y"] + 1] * ((zr - 1) / (zr * zc)).unsqueeze(1)
        angle = v[:, _V["angle"]]
        turn = torch.polar(torch.ones_like(angle), angle) * self.quarter[v[:, _V["quarter_turns"]].long()]
        cos, sin = turn.real, turn.imag
        # a pixel-space rotation in normalised coordinates: the off-diagonals carry the aspect ratio
        rot = torch.stack([cos, sin * (-h / w), sin * (w / h), cos], 1).view(-1, 2, 2)
        flip_zoom = v[:, _V["hflip"]:_V["vflip"] + 1] * inv.unsqueeze(1)
        return torch.cat([rot * flip_zoom.unsqueeze(2), shift.unsqueeze(2)], 2)

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
