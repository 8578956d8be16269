"""Batched data augmentation with Kornia, on whatever device the batch lives (CPU or GPU).

`Augment(preset)` maps (images float (N, 3, H, W) in [0, 1], masks float (N, 1, H, W) in {0, 1}) to
the same shapes. uint8 images are accepted and divided by 255. Normalisation is not done here
(`resunetpp.preprocess.normalize` does it and checkpoints record it).

Presets (each transform is drawn per sample with its own probability):

``paper`` -- the ResUNet++ paper's list, in this order:
  ============  =====  ======================================================================
  name          p      what (kornia)
  ============  =====  ======================================================================
  centre_crop   0.25   centre crop of 80 % of the side, resized back (RandomAffine, fixed 1.25 zoom
                       about the centre; one warp per sample, unlike kornia's batch-wide CenterCrop)
  random_crop   0.25   crop of 67-80 % of the side at a random place, resized back (RandomAffine
                       zoom 1.25-1.5 with a shift that keeps the crop inside the frame)
  hflip         0.5    RandomHorizontalFlip
  vflip         0.5    RandomVerticalFlip
  scale         0.25   zoom 0.75-1.25 about the centre (RandomAffine; zooming out pads with black /
                       background)
  rotate        0.25   rotation by an angle drawn uniformly from 0-90 degrees (RandomRotation;
                       corners pad with black / background)
  cutout        0.25   one black rectangle of 2-10 % of the area (RandomErasing) -- image only
  brightness    0.25   additive brightness shift in [-0.2, 0.2], clipped to [0, 1] -- image only
  ============  =====  ======================================================================

``light`` -- hflip, vflip and rotation by a multiple of 90 degrees (each p 0.5; exact on square inputs).
``none`` -- identity.

Masks follow every geometric transform with nearest-neighbour resampling (kornia's
AugmentationSequential default for the "mask" key) and are re-binarised (> 0.5) at the end. The
photometric steps run on the image alone, after the geometric ones: cutout occludes the image but
the polyp is still there, so the mask keeps it (kornia's RandomErasing inside AugmentationSequential
would also erase the mask, which is why it runs outside it).

Randomness comes from torch's global RNG on the batch's device (the samplers move with the batch),
so ``torch.manual_seed(s)`` before a call reproduces it.
"""

from __future__ import annotations

import torch
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


def _make(name: str, p: float) -> nn.Module:
    import kornia.augmentation as K

    if name == "centre_crop":
        return K.RandomAffine(degrees=0.0, scale=(1.25, 1.25), p=p)
    if name == "random_crop":
        # translate at most (zoom_min - 1) / 2 of the side keeps the zoomed image covering the frame
        return K.RandomAffine(degrees=0.0, scale=(1.25, 1.5), translate=(0.125, 0.125), p=p)
    if name == "hflip":
        return K.RandomHorizontalFlip(p=p)
    if name == "vflip":
        return K.RandomVerticalFlip(p=p)
    if name == "scale":
        return K.RandomAffine(degrees=0.0, scale=(0.75, 1.25), p=p)
    if name == "rotate":
        return K.RandomRotation(degrees=(0.0, 90.0), p=p)
    if name == "rot90":
        return K.RandomRotation90(times=(-1.49, 2.49), p=p)  # rounds to -1..2 quarter turns, near-equal odds
    if name == "cutout":
        return K.RandomErasing(scale=(0.02, 0.1), ratio=(0.3, 3.3), value=0.0, p=p)
    if name == "brightness":
        return K.RandomBrightness(brightness=(0.8, 1.2), clip_output=True, p=p)
    raise ValueError(f"unknown transform {name!r}; known: {', '.join(GEOMETRIC + PHOTOMETRIC)}")


class Augment(nn.Module):
    """Kornia augmentation of image/mask batches; see the module docstring for the presets.

    `p` overrides every transform's probability; `only` keeps just the named transforms of the preset
    (or, with preset "paper", any known transform name), e.g. ``Augment("paper", p=1.0, only=["rotate"])``.
    """

    def __init__(self, preset: str = "paper", p: float | None = None, only: list[str] | tuple[str, ...] | None = None):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}")
        names = list(PRESET_TRANSFORMS[preset])
        if only is not None:
            unknown = [n for n in only if n not in GEOMETRIC + PHOTOMETRIC]
            if unknown:
                raise ValueError(f"unknown transform(s) {unknown}; known: {', '.join(GEOMETRIC + PHOTOMETRIC)}")
            names = list(only)
        self.preset = preset
        self.names = names
        geo = [_make(n, DEFAULT_P[n] if p is None else p) for n in names if n in GEOMETRIC]
        photo = [_make(n, DEFAULT_P[n] if p is None else p) for n in names if n in PHOTOMETRIC]
        import kornia.augmentation as K

        self.geometric = K.AugmentationSequential(*geo, data_keys=["input", "mask"]) if geo else None
        self.photometric = nn.ModuleList(photo)
        self._rng_device = torch.device("cpu")

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3 or masks.ndim != 4 or masks.shape[1] != 1:
            raise ValueError(f"Augment expects images (N, 3, H, W) and masks (N, 1, H, W), got "
                             f"{tuple(images.shape)} and {tuple(masks.shape)}")
        if images.shape[0] != masks.shape[0] or images.shape[2:] != masks.shape[2:]:
            raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} do not match")
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        masks = masks.float()
        if images.device != self._rng_device:
            self.to(images.device)  # kornia's samplers follow the module, so draws use this device's RNG
            self._rng_device = images.device
        if self.geometric is not None:
            images, masks = self.geometric(images, masks)
        for step in self.photometric:
            images = step(images)
        return images.clamp(0.0, 1.0), (masks > 0.5).float()  # not clamp_: `images` may be the caller's tensor

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, transforms={self.names}"
