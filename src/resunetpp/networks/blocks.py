"""The paper's building blocks, shared by every model in `resunetpp.networks`.

Each block mirrors a unit of the authors' Keras code (DebeshJha/ResUNetPlusPlus), so that the
parameter tensors line up one to one:

* convolutions keep their bias (Keras' default), even before BatchNorm;
* BatchNorm uses eps=1e-3, Keras' default;
* BatchNorm momentum is PyTorch's 0.1 (Keras' 0.99 is the same rule with a slower rate).

Converted Keras weights would still not give the same outputs: TensorFlow's "same" padding of a
stride-2 convolution pads 0 before and 1 after, where PyTorch's `padding=1` pads 1 on both sides, and
the authors' data generator feeds BGR images where ours are RGB. Nobody has converted their weights
(they were never released); the layout matches so that it could be done with those two changes.
"""

from __future__ import annotations

import torch
from torch import nn

BN_EPS = 1e-3


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation)


class BNReLUConv(nn.Sequential):
    """Full pre-activation unit: BN -> ReLU -> conv3x3 (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(bn(cin), nn.ReLU(inplace=True), conv3x3(cin, cout, stride))


class Projection(nn.Sequential):
    """Shortcut of a residual unit: conv1x1 (with the unit's stride) + BN."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, 1, stride=stride), bn(cout))


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): GAP -> FC C/r -> ReLU -> FC C -> sigmoid -> scale.

    The FC layers have no bias, as in the authors' code; r = 8.
    """

    def __init__(self, channels: int, ratio: int = 8):
        super().__init__()
        self.ratio = ratio
        self.fc1 = nn.Linear(channels, channels // ratio, bias=False)
        self.fc2 = nn.Linear(channels // ratio, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return x * s[:, :, None, None]


class ResidualUnit(nn.Module):
    """Pre-activation residual unit: (BN-ReLU-conv) x2 + conv1x1/BN shortcut, then optional SE.

    With `se=True` this is the ResUNet++ encoder/decoder block; with `se=False` it is the
    residual unit of ResUNet (Zhang et al. 2018).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, se: bool = True):
        super().__init__()
        self.conv1 = BNReLUConv(cin, cout, stride)
        self.conv2 = BNReLUConv(cout, cout)
        self.shortcut = Projection(cin, cout, stride)
        self.se = SqueezeExcitation(cout) if se else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.conv2(self.conv1(x)) + self.shortcut(x))


class StemBlock(nn.Module):
    """First block: conv3x3 -> BN -> ReLU -> conv3x3, plus conv1x1/BN shortcut, then optional SE.

    It cannot be pre-activated: its input is the raw image.
    """

    def __init__(self, cin: int, cout: int, se: bool = True):
        super().__init__()
        self.conv1 = conv3x3(cin, cout)
        self.conv2 = BNReLUConv(cout, cout)
        self.shortcut = Projection(cin, cout)
        self.se = SqueezeExcitation(cout) if se else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.conv2(self.conv1(x)) + self.shortcut(x))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling as in the ResUNet++ code.

    Four parallel conv3x3 + BN branches (no activation) at dilations 6, 12, 18 and 1, *summed*
    (DeepLab concatenates), then a conv1x1.
    """

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...] = (6, 12, 18, 1)):
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(nn.Sequential(conv3x3(cin, cout, dilation=r), bn(cout)) for r in rates)
        self.project = nn.Conv2d(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        return self.project(y)


class AttentionGate(nn.Module):
    """ResUNet++ attention block; g is the encoder skip (2x the resolution), x the decoder input.

    g -> BN-ReLU-conv3x3 -> maxpool2, plus x -> BN-ReLU-conv3x3; the sum -> BN-ReLU-conv3x3,
    which multiplies x. The published code applies no sigmoid to the attention map, and neither
    do we. (The paper's text does not describe the gate's activation at all.)
    """

    def __init__(self, g_channels: int, x_channels: int):
        super().__init__()
        self.g_conv = BNReLUConv(g_channels, x_channels)
        self.pool = nn.MaxPool2d(2)
        self.x_conv = BNReLUConv(x_channels, x_channels)
        self.gc_conv = BNReLUConv(x_channels, x_channels)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        attn = self.gc_conv(self.pool(self.g_conv(g)) + self.x_conv(x))
        return attn * x


class DoubleConv(nn.Sequential):
    """U-Net level: (conv3x3 -> [BN] -> ReLU) x2, padded so the size is kept."""

    def __init__(self, cin: int, cout: int, batch_norm: bool = False):
        layers: list[nn.Module] = []
        for c in (cin, cout):
            layers.append(nn.Conv2d(c, cout, 3, padding=1))
            if batch_norm:
                layers.append(bn(cout))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UpConcat(nn.Module):
    """The decoders' join: nearest x2 upsampling of `x`, then concatenation with the encoder skip."""

    def __init__(self):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.up(x), skip], dim=1)


class SegmentationModel(nn.Module):
    """Base class: checks the input's channels and size against the network's `in_channels` and total stride."""

    total_stride: int = 1
    label: str = "model"  # in messages

    def __init__(self, filters: tuple[int, ...], count: int, in_channels: int = 3):
        """Keep `filters` (`count` widths, else a ValueError) and `in_channels`; the subclass builds the layers."""
        super().__init__()
        f = tuple(filters)
        if len(f) != count:
            raise ValueError(f"{self.label} takes {count} filter counts, got {len(f)}: {f}")
        self.filters = f
        self.in_channels = in_channels

    def encode(self, x: torch.Tensor, *stages: nn.Module) -> list[torch.Tensor]:
        """Check `x`, then run `stages` one after another, keeping each output (the decoder's skips)."""
        self.check_input(x)
        outputs = []
        for stage in stages:
            x = stage(x)
            outputs.append(x)
        return outputs

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects an (N, {self.in_channels}, H, W) tensor, got shape "
                             f"{tuple(x.shape)}")
        h, w = x.shape[-2:]
        s = self.total_stride
        if h % s or w % s:
            raise ValueError(
                f"{type(self).__name__} cannot take a {h}x{w} input: height and width must be multiples "
                f"of {s} (e.g. {max(s, h // s * s)}x{max(s, w // s * s)} or {(h // s + 1) * s}x{(w // s + 1) * s})"
            )


# ------------------------------------------------------------------------------------------ lite units
# The paper's units re-cut for CPU speed (resunetpp-lite): post-activation conv3x3 -> BN -> ReLU, which
# onnxruntime and OpenVINO fold into one fused convolution, and 1x1 attention. No bias before BN.


class ConvBNReLU(nn.Sequential):
    """conv3x3 (no bias) -> BN -> ReLU; `relu=False` leaves the activation to the caller."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1, relu: bool = True):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                                   nn.BatchNorm2d(cout)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class LiteResidualUnit(nn.Module):
    """Post-activation residual unit with SE: conv-BN-ReLU, conv-BN, plus shortcut, ReLU, then SE.

    The shortcut is the identity when shape is kept, else conv1x1 (stride) + BN.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, se: bool = True):
        super().__init__()
        self.conv1 = ConvBNReLU(cin, cout, stride)
        self.conv2 = ConvBNReLU(cout, cout, relu=False)
        self.shortcut = (nn.Identity() if cin == cout and stride == 1 else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        self.se = SqueezeExcitation(cout, ratio=4) if se else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x)))


class LiteASPP(ASPP):
    """`ASPP`'s summed branches at dilations that fit a 16x16 bridge (1, 2, 4), with foldable conv-BN units."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...] = (1, 2, 4)):
        nn.Module.__init__(self)  # ASPP's forward over these units
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(ConvBNReLU(cin, cout, dilation=r, relu=False) for r in rates)
        self.project = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 1, bias=False),
                                     nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class LiteAttentionGate(nn.Module):
    """The attention gate with 1x1 convolutions and a sigmoid map (Oktay et al. 2018): g (the encoder
    skip, 2x the resolution) -> conv1x1 -> maxpool2, plus x -> conv1x1; ReLU -> conv1x1 -> sigmoid,
    which scales x. The 3x3 gate of ResUNet++ costs as much as a decoder unit."""

    def __init__(self, g_channels: int, x_channels: int, inner: int | None = None):
        super().__init__()
        inner = inner or max(x_channels // 2, 4)
        self.g_conv = nn.Sequential(nn.Conv2d(g_channels, inner, 1, bias=False), nn.BatchNorm2d(inner))
        self.pool = nn.MaxPool2d(2)
        self.x_conv = nn.Sequential(nn.Conv2d(x_channels, inner, 1, bias=False), nn.BatchNorm2d(inner))
        self.psi = nn.Conv2d(inner, 1, 1)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.pool(self.g_conv(g)) + self.x_conv(x))
        return torch.sigmoid(self.psi(a)) * x
