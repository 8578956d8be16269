"""U-Net (Ronneberger et al., MICCAI 2015), the paper's first baseline.

Four down and four up levels with 64..1024 filters, two padded conv3x3 per level (so the output
size equals the input size), 2x2 max-pooling, 2x2 transposed-conv upsampling and skip
concatenation: 31,031,745 parameters. The original has no BatchNorm; `batch_norm=True` adds it.
Inputs must be multiples of 16.
"""

from __future__ import annotations

import torch
from torch import nn

from resunetpp.networks.blocks import DoubleConv, SegmentationModel
from resunetpp.networks.registry import register_model


class UNet(SegmentationModel):
    """U-Net (module docstring).

    Args:
        filters: the 5 widths, from the first level down.
        in_channels: channels of the input image (3: RGB).
        batch_norm: BatchNorm after each convolution (the original has none).
    """

    total_stride = 16
    label = "U-Net"

    def __init__(self, filters: tuple[int, ...] = (64, 128, 256, 512, 1024), in_channels: int = 3,
                 batch_norm: bool = False):
        super().__init__(filters, 5, in_channels)
        f = self.filters
        self.pool = nn.MaxPool2d(2)
        self.down = nn.ModuleList(
            DoubleConv(cin, cout, batch_norm) for cin, cout in zip((in_channels,) + f[:-1], f)
        )
        self.upconv = nn.ModuleList(nn.ConvTranspose2d(f[i], f[i - 1], 2, stride=2) for i in range(4, 0, -1))
        self.up = nn.ModuleList(DoubleConv(2 * f[i - 1], f[i - 1], batch_norm) for i in range(4, 0, -1))
        self.head = nn.Conv2d(f[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        skips = []
        for i, level in enumerate(self.down):
            x = level(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for upconv, level in zip(self.upconv, self.up):
            x = level(torch.cat([upconv(x), skips.pop()], dim=1))
        return self.head(x)


@register_model("unet", default_loss="bce",
                description="U-Net (Ronneberger et al. 2015), 64-1024 filters, transposed-conv upsampling")
def unet(**kwargs) -> UNet:
    return UNet(**kwargs)
