"""ResUNet++-lite: the paper's Fig. 2 at a width and with operations chosen for real time on a CPU.

The same graph as `resunetpp.ResUNetPlusPlus` (residual SE encoder, ASPP bridge, attention decoder),
with these changes, each measured on 2-core CPUs (benchmarks/lite_design.py, docs/models.md):

* a stride-2 stem: every feature map is at half the input resolution or less, and the logits are
  upsampled x2 (bilinear) at the end. At 256x256 the full-resolution stem alone of ResUNet++ costs
  more than the whole lite model.
* post-activation conv3x3 -> BN -> ReLU units (`blocks.ConvBNReLU`), which ONNX Runtime and OpenVINO
  fold into single fused convolutions; pre-activation BN cannot be folded into the convolution before it.
* 1x1 attention gates with a sigmoid, a three-branch ASPP at dilations 1, 2, 4 (the bridge is 16x16).
* widths (16, 16, 32, 64, 128): 1.3 GFLOP at 256x256 (ResUNet++: 31), 525,332 parameters. The cost sits in
  the two half-resolution levels, so they stay at 16 channels (multiples of 16 fill the AVX-512 channel
  blocks of oneDNN and OpenVINO; 8 channels trained slower here), and the capacity goes to the 1/8 and
  1/16 levels, where it is cheap.

Inputs must be multiples of 16 in height and width (stem + three stride-2 stages).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from resunetpp.networks.blocks import ConvBNReLU, LiteASPP, LiteAttentionGate, LiteResidualUnit
from resunetpp.networks.registry import register_model
from resunetpp.networks.resunetpp import ResUNetPlusPlus, Units


def lite_stem(cin: int, cout: int) -> nn.Module:
    """The stem at half resolution: a stride-2 conv-BN-ReLU, then a residual unit."""
    return nn.Sequential(ConvBNReLU(cin, cout, stride=2), LiteResidualUnit(cout, cout))


# no ASPP head: a conv1x1 at half resolution
LITE_UNITS = Units(stem=lite_stem, residual=LiteResidualUnit, bridge=LiteASPP, gate=LiteAttentionGate, head=None)


class ResUNetPlusPlusLite(ResUNetPlusPlus):
    """`ResUNetPlusPlus`'s graph (and arguments, but `units`) over `LITE_UNITS`; the logits come at half
    resolution, upsampled x2."""

    total_stride = 16
    label = "ResUNet++-lite"

    def __init__(self, filters: tuple[int, ...] = (16, 16, 32, 64, 128), in_channels: int = 3):
        super().__init__(filters, in_channels, units=LITE_UNITS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(super().forward(x), scale_factor=2.0, mode="bilinear", align_corners=False)


@register_model("resunetpp-lite", default_loss="bce+dice",
                description="ResUNet++-lite: the same units cut for real time on a CPU (1.3 GFLOP at 256x256)")
def resunetpp_lite(**kwargs) -> ResUNetPlusPlusLite:
    return ResUNetPlusPlusLite(**kwargs)

