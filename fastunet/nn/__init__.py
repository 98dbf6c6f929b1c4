"""Building blocks: drop-in modules for the reference toolbox's conv blocks."""
from .conv_bn_relu import ConvBNReLU

__all__ = ["ConvBNReLU"]
