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

from resunetpp.networks.blocks import (
    ConvBNReLU,
    LiteASPP,
    LiteAttentionGate,
    LiteResidualUnit,
    SegmentationModel,
    UpConcat,
)
from resunetpp.networks.registry import register_model
from resunetpp.networks.resunetpp import ResUNetPlusPlus


class ResUNetPlusPlusLite(ResUNetPlusPlus):
    """`ResUNetPlusPlus.forward`'s graph over the lite units; the logits come at half resolution, upsampled x2."""

    total_stride = 16

    def __init__(self, filters: tuple[int, ...] = (16, 16, 32, 64, 128)):
        SegmentationModel.__init__(self)  # the parent's graph, not its units
        f = tuple(filters)
        if len(f) != 5:
            raise ValueError(f"ResUNet++-lite takes 5 filter counts, got {len(f)}: {f}")
        self.filters = f
        # Encoder (stem at half resolution)
        self.stem = nn.Sequential(ConvBNReLU(3, f[0], stride=2), LiteResidualUnit(f[0], f[0]))
        self.enc1 = LiteResidualUnit(f[0], f[1], stride=2)
        self.enc2 = LiteResidualUnit(f[1], f[2], stride=2)
        self.enc3 = LiteResidualUnit(f[2], f[3], stride=2)
        # Bridge
        self.bridge = LiteASPP(f[3], f[4])
        # Decoder: attention(skip, x) -> upsample, concat skip -> residual unit
        self.attn1 = LiteAttentionGate(f[2], f[4])
        self.dec1 = LiteResidualUnit(f[4] + f[2], f[3])
        self.attn2 = LiteAttentionGate(f[1], f[3])
        self.dec2 = LiteResidualUnit(f[3] + f[1], f[2])
        self.attn3 = LiteAttentionGate(f[0], f[2])
        self.dec3 = LiteResidualUnit(f[2] + f[0], f[1])
        self.up = UpConcat()
        # Output: no ASPP head; a conv1x1 at half resolution
        self.head_aspp = nn.Identity()
        self.head = nn.Conv2d(f[1], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(super().forward(x), scale_factor=2.0, mode="bilinear", align_corners=False)


@register_model(
    "resunetpp-lite",
    default_loss="bce+dice",
    description="ResUNet++-lite: the same units cut for real time on a CPU (1.3 GFLOP at 256x256)",
)
def resunetpp_lite(**kwargs) -> ResUNetPlusPlusLite:
    return ResUNetPlusPlusLite(**kwargs)

