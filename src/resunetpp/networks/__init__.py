"""Model definitions; importing this package registers every model."""

from . import lite, resunet, resunetpp, unet  # noqa: F401  (registration side effects)
from .blocks import ASPP, AttentionGate, ResidualUnit, SqueezeExcitation, StemBlock
from .lite import ResUNetPlusPlusLite
from .resunet import ResUNet
from .resunetpp import ResUNetPlusPlus
from .unet import UNet

__all__ = ["ASPP", "AttentionGate", "ResidualUnit", "SqueezeExcitation", "StemBlock",
           "ResUNet", "ResUNetPlusPlus", "ResUNetPlusPlusLite", "UNet"]
