"""Model definitions; importing this package registers every model."""

from resunetpp.networks import lite, resunet, resunetpp, unet  # noqa: F401  (registration side effects)
from resunetpp.networks.blocks import ASPP, AttentionGate, ResidualUnit, SqueezeExcitation, StemBlock
from resunetpp.networks.lite import ResUNetPlusPlusLite
from resunetpp.networks.resunet import ResUNet
from resunetpp.networks.resunetpp import ResUNetPlusPlus
from resunetpp.networks.unet import UNet

__all__ = ["ASPP", "AttentionGate", "ResidualUnit", "SqueezeExcitation", "StemBlock",
           "ResUNet", "ResUNetPlusPlus", "ResUNetPlusPlusLite", "UNet"]
