"""Deep Residual U-Net (Zhang et al., IEEE GRSL 2018): the paper's ResUNet and ResUNet-mod.

Encoder: a stem (conv3x3 -> BN -> ReLU -> conv3x3, plus conv1x1/BN shortcut) with 64 filters,
then full pre-activation residual units with stride 2 at 128 and 256 filters; the bridge is a
residual unit with stride 2 at 512. The decoder mirrors it: nearest x2 upsampling,
concatenation with the encoder skip, a residual unit (256, 128, 64); then conv1x1 to one
channel. 8,223,809 trainable parameters: 7,789,313 (the ResUNet paper's "7.8 M") plus
434,496 in the conv1x1/BN projection shortcuts, which that count leaves out. Inputs must be
multiples of 8.

`resunet` defaults to the MSE loss of the ResUNet paper; `resunet-mod` is the same network
trained with the dice-coefficient loss, the ResUNet++ paper's "ResUNet-mod".
"""

from __future__ import annotations

import torch
from torch import nn

from resunetpp.networks.blocks import ResidualUnit, SegmentationModel, StemBlock, UpConcat
from resunetpp.networks.registry import register_model


class ResUNet(SegmentationModel):
    """ResUNet (module docstring).

    Args:
        filters: the 4 widths: stem, the two encoder units, the bridge.
        in_channels: channels of the input image (3: RGB).
    """

    total_stride = 8
    label = "ResUNet"

    def __init__(self, filters: tuple[int, ...] = (64, 128, 256, 512), in_channels: int = 3):
        super().__init__(filters, 4, in_channels)
        f = self.filters
        self.stem = StemBlock(in_channels, f[0], se=False)
        self.enc1 = ResidualUnit(f[0], f[1], stride=2, se=False)
        self.enc2 = ResidualUnit(f[1], f[2], stride=2, se=False)
        self.bridge = ResidualUnit(f[2], f[3], stride=2, se=False)
        self.up = UpConcat()
        self.dec1 = ResidualUnit(f[3] + f[2], f[2], se=False)
        self.dec2 = ResidualUnit(f[2] + f[1], f[1], se=False)
        self.dec3 = ResidualUnit(f[1] + f[0], f[0], se=False)
        self.head = nn.Conv2d(f[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3 = self.encode(x, self.stem, self.enc1, self.enc2)
        b = self.bridge(c3)
        d = self.dec1(self.up(b, c3))
        d = self.dec2(self.up(d, c2))
        d = self.dec3(self.up(d, c1))
        return self.head(d)


@register_model("resunet", default_loss="mse",
                description="ResUNet (Zhang et al. 2018), the paper's baseline, MSE loss")
def resunet(**kwargs) -> ResUNet:
    return ResUNet(**kwargs)


@register_model("resunet-mod", default_loss="dice",
                description="ResUNet-mod: ResUNet trained with the dice-coefficient loss")
def resunet_mod(**kwargs) -> ResUNet:
    return ResUNet(**kwargs)
