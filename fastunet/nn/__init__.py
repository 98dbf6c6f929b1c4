"""Building blocks: drop-in modules for the reference toolbox's conv blocks, and fuse()."""
from .conv_bn_relu import ConvBNReLU, fused_enabled
from .fuse import FoldedConv2d, cpu_fused_layout, fuse
from .recompute import MaxPool2d

__all__ = ["ConvBNReLU", "FoldedConv2d", "MaxPool2d", "cpu_fused_layout", "fuse",
           "fused_enabled"]
