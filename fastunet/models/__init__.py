"""The segmentation model: UNet backbone, decode heads, losses, segmentor, configs, checkpoints."""
from .checkpoint import load_checkpoint, save_checkpoint
from .configs import apply_overrides, get_config, list_configs
from .heads import ASPPHead, BaseDecodeHead, FCNHead, PSPHead, build_head
from .losses import CrossEntropyLoss, DiceLoss, build_loss
from .segmentor import EncoderDecoder, build_segmentor
from .unet import UNet, BasicConvBlock, DeconvModule, InterpConv, UpConvBlock

__all__ = ["UNet", "BasicConvBlock", "UpConvBlock", "InterpConv", "DeconvModule",
           "BaseDecodeHead", "FCNHead", "PSPHead", "ASPPHead", "build_head",
           "CrossEntropyLoss", "DiceLoss", "build_loss", "EncoderDecoder", "build_segmentor",
           "get_config", "list_configs", "apply_overrides", "load_checkpoint", "save_checkpoint"]
