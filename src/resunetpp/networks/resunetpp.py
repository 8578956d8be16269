"""ResUNet++ (Jha et al., ISM 2019), exactly as in Fig. 2 and the authors' Keras code.

Published choices kept as defaults (where the paper's text and the code disagree, the code wins):

* filters (16, 32, 64, 128, 256): 4,062,993 trainable parameters, 4,070,385 with the BatchNorm
  running statistics (the "Total params" Keras prints). (32, 64, 128, 256, 512) is the wider
  variant of the 2021 follow-up (Jha et al., IEEE JBHI).
* stem: conv3x3 -> BN -> ReLU -> conv3x3 plus a conv1x1/BN shortcut, then SE.
* three encoder residual units with stride 2, full pre-activation, each followed by SE (r = 8).
* bridge and head: ASPP with four *summed* branches at dilations 6, 12, 18, 1, then conv1x1.
* attention: the gate's output multiplies the decoder features directly, with no sigmoid, as in
  the code (the paper's text does not say which activation the gate ends with).
* upsampling: nearest neighbour x2, then concatenation with the encoder skip.
* the output is logits; the code's final sigmoid lives in the losses and in inference.
* convolutions keep their bias and BatchNorm uses eps=1e-3, as in Keras (see `blocks`).

Inputs must be multiples of 8 in height and width (three stride-2 stages).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from resunetpp.networks.blocks import ASPP, AttentionGate, ResidualUnit, SegmentationModel, StemBlock, UpConcat
from resunetpp.networks.registry import register_model


@dataclass(frozen=True)
class Units:
    """The blocks that the ResUNet++ graph is built of, so that a variant (`resunetpp.networks.lite`) can cut
    its own and keep the graph. Each takes (input channels, output channels); `residual` also a stride."""

    stem: Callable[[int, int], nn.Module]
    residual: Callable[..., nn.Module]
    bridge: Callable[[int, int], nn.Module]
    gate: Callable[[int, int], nn.Module]        # (skip channels, decoder channels)
    head: Callable[[int, int], nn.Module] | None  # before the output conv1x1; None: the conv1x1 alone


PAPER_UNITS = Units(stem=StemBlock, residual=ResidualUnit, bridge=ASPP, gate=AttentionGate, head=ASPP)


class ResUNetPlusPlus(SegmentationModel):
    """ResUNet++ (module docstring).

    Args:
        filters: the 5 widths: stem, the three encoder units, the bridge.
        in_channels: channels of the input image (3: RGB).
        units: the blocks of the graph (`PAPER_UNITS`; ResUNet++-lite passes its own).
    """

    total_stride = 8
    label = "ResUNet++"

    def __init__(self, filters: tuple[int, ...] = (16, 32, 64, 128, 256), in_channels: int = 3, *,
                 units: Units = PAPER_UNITS):
        super().__init__(filters, 5, in_channels)
        f = self.filters
        # Encoder
        self.stem = units.stem(in_channels, f[0])
        self.enc1 = units.residual(f[0], f[1], stride=2)
        self.enc2 = units.residual(f[1], f[2], stride=2)
        self.enc3 = units.residual(f[2], f[3], stride=2)
        # Bridge
        self.bridge = units.bridge(f[3], f[4])
        # Decoder: attention(skip, x) -> upsample, concat skip -> residual unit
        self.attn1 = units.gate(f[2], f[4])
        self.dec1 = units.residual(f[4] + f[2], f[3])
        self.attn2 = units.gate(f[1], f[3])
        self.dec2 = units.residual(f[3] + f[1], f[2])
        self.attn3 = units.gate(f[0], f[2])
        self.dec3 = units.residual(f[2] + f[0], f[1])
        self.up = UpConcat()
        # Output
        self.head_aspp = units.head(f[1], f[0]) if units.head else nn.Identity()
        self.head = nn.Conv2d(f[0] if units.head else f[1], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3, c4 = self.encode(x, self.stem, self.enc1, self.enc2, self.enc3)

        b = self.bridge(c4)

        d = self.dec1(self.up(self.attn1(c3, b), c3))
        d = self.dec2(self.up(self.attn2(c2, d), c2))
        d = self.dec3(self.up(self.attn3(c1, d), c1))

        return self.head(self.head_aspp(d))


@register_model(
    "resunetpp",
    default_loss="dice",
    description="ResUNet++ (Jha et al. 2019): residual U-Net with SE, ASPP and attention",
)
def resunetpp(**kwargs) -> ResUNetPlusPlus:
    return ResUNetPlusPlus(**kwargs)
