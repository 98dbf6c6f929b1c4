"""UNet backbone: mmseg's ``UNet`` (UNet-S5-D16 by default) with the same keywords and state_dict.

Submodule names and registration order follow mmseg exactly, so ``state_dict()`` keys come out in
the same order and an mmseg checkpoint loads with ``strict=True``. Every conv->BN->ReLU is a
:class:`fastunet.nn.ConvBNReLU`, so fused kernels can replace it without touching this file. The
glue between blocks (max-pool, upsample, skip concatenation) is the recipe-aware kind from
``fastunet.ops.recompute``: the same numbers, and in fused training it stores no activation that
a block's saved conv output can rebuild.
"""
import torch.nn as nn
import torch.utils.checkpoint as cp

from ..nn import ConvBNReLU, MaxPool2d
from ..nn.conv_bn_relu import _norm_layer
from ..ops import recompute
from .weight_init import InitWeights, kaiming_conv_constant_norm


def _run(module, x, with_cp):
    # mmseg checkpoints only when the input needs grad: the first block sees the image and is not
    # recomputed. Non-reentrant checkpointing gives the same gradients as the reentrant one.
    if with_cp and x.requires_grad:
        return cp.checkpoint(module, x, use_reentrant=False)
    return module(x)


class BasicConvBlock(nn.Module):
    """``num_convs`` 3x3 conv->BN->ReLU; the first may be strided, the others dilated."""

    def __init__(self, in_channels, out_channels, num_convs=2, stride=1, dilation=1,
                 with_cp=False, conv_cfg=None, norm_cfg=dict(type="BN"),
                 act_cfg=dict(type="ReLU"), dcn=None, plugins=None):
        super().__init__()
        if dcn is not None or plugins is not None:
            raise NotImplementedError("dcn and plugins are not implemented (nor are they in mmseg)")
        self.with_cp = with_cp
        self.convs = nn.Sequential(*[
            ConvBNReLU(in_channels if i == 0 else out_channels, out_channels, kernel_size=3,
                       stride=stride if i == 0 else 1, dilation=1 if i == 0 else dilation,
                       padding=1 if i == 0 else dilation, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                       act_cfg=act_cfg)
            for i in range(num_convs)])

    def forward(self, x):
        return _run(self.convs, x, self.with_cp)


class Upsample(nn.Module):
    """Resize by a scale factor; stateless (mmseg's ``Upsample`` wrapper)."""

    def __init__(self, size=None, scale_factor=None, mode="nearest", align_corners=None):
        super().__init__()
        self.size = size
        self.scale_factor = float(scale_factor) if scale_factor else None
        self.mode = mode
        self.align_corners = align_corners

    def forward(self, x):
        # an explicit output size, as mmseg computes it, keeps the resampling grid identical
        # (integer factors multiply the sizes as integers, so exporters and tracers keep them
        # symbolic: the same sizes, and a graph for any input size)
        f = self.scale_factor
        size = self.size or [t * int(f) if f.is_integer() else int(t * f) for t in x.shape[-2:]]
        # recompute.interpolate is F.interpolate; in fused training it lets the next conv keep a
        # recipe instead of this output (fastunet.ops.recompute)
        return recompute.interpolate(x, size, None, self.mode, self.align_corners)


class InterpConv(nn.Module):
    """Bilinear x2 upsample then a 1x1 conv->BN->ReLU (``interp_upsample.{0,1}``)."""

    def __init__(self, in_channels, out_channels, with_cp=False, norm_cfg=dict(type="BN"),
                 act_cfg=dict(type="ReLU"), *, conv_cfg=None, conv_first=False, kernel_size=1,
                 stride=1, padding=0,
                 upsample_cfg=dict(scale_factor=2, mode="bilinear", align_corners=False)):
        super().__init__()
        self.with_cp = with_cp
        conv = ConvBNReLU(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                          conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg)
        upsample = Upsample(**upsample_cfg)
        layers = (conv, upsample) if conv_first else (upsample, conv)
        self.interp_upsample = nn.Sequential(*layers)

    def forward(self, x):
        return _run(self.interp_upsample, x, self.with_cp)


class DeconvModule(nn.Module):
    """Transposed-conv x2 upsample (4x4, stride 2, pad 1, with bias) -> BN -> ReLU.

    Stored as ``deconv_upsamping`` (mmseg's spelling) so checkpoints keep their keys. As in mmseg,
    the transposed conv keeps PyTorch's default init (mmseg's Kaiming rule matches only Conv2d).
    """

    def __init__(self, in_channels, out_channels, with_cp=False, norm_cfg=dict(type="BN"),
                 act_cfg=dict(type="ReLU"), *, kernel_size=4, scale_factor=2):
        super().__init__()
        if kernel_size < scale_factor or (kernel_size - scale_factor) % 2:
            raise ValueError(f"DeconvModule needs kernel_size >= scale_factor with an even "
                             f"difference, got kernel_size={kernel_size}, "
                             f"scale_factor={scale_factor}")
        if act_cfg is not None and act_cfg.get("type", "ReLU") != "ReLU":
            raise ValueError(f"unsupported act_cfg {act_cfg!r}: only ReLU")
        self.with_cp = with_cp
        deconv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=kernel_size,
                                    stride=scale_factor, padding=(kernel_size - scale_factor) // 2)
        self.deconv_upsamping = nn.Sequential(deconv, _norm_layer(norm_cfg, out_channels),
                                              nn.ReLU(inplace=True))

    def forward(self, x):
        return _run(self.deconv_upsamping, x, self.with_cp)


_UPSAMPLERS = {"InterpConv": InterpConv, "DeconvModule": DeconvModule}


def build_upsample_layer(cfg, **kwargs):
    """Build the decoder's upsampler from ``dict(type='InterpConv'|'DeconvModule', ...)``."""
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind not in _UPSAMPLERS:
        raise ValueError(f"unsupported upsample_cfg type {kind!r}: use one of "
                         f"{sorted(_UPSAMPLERS)}")
    return _UPSAMPLERS[kind](**kwargs, **cfg)


class UpConvBlock(nn.Module):
    """Decoder stage: upsample the deeper map, concatenate ``[skip, up]``, then ``conv_block``."""

    def __init__(self, conv_block, in_channels, skip_channels, out_channels, num_convs=2,
                 stride=1, dilation=1, with_cp=False, conv_cfg=None, norm_cfg=dict(type="BN"),
                 act_cfg=dict(type="ReLU"), upsample_cfg=dict(type="InterpConv"), dcn=None,
                 plugins=None):
        super().__init__()
        # conv_block is registered before upsample, as in mmseg: this fixes the key order
        self.conv_block = conv_block(in_channels=2 * skip_channels, out_channels=out_channels,
                                     num_convs=num_convs, stride=stride, dilation=dilation,
                                     with_cp=with_cp, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                                     act_cfg=act_cfg, dcn=dcn, plugins=plugins)
        if upsample_cfg is not None:
            self.upsample = build_upsample_layer(upsample_cfg, in_channels=in_channels,
                                                 out_channels=skip_channels, with_cp=with_cp,
                                                 norm_cfg=norm_cfg, act_cfg=act_cfg)
        else:  # same resolution: only match the channels
            self.upsample = ConvBNReLU(in_channels, skip_channels, 1, conv_cfg=conv_cfg,
                                       norm_cfg=norm_cfg, act_cfg=act_cfg)

    def forward(self, skip, x):
        x = self.upsample(x)
        return self.conv_block(recompute.cat([skip, x], dim=1))  # torch.cat, recipe-aware


def _check_len(name, value, expected):
    if len(value) != expected:
        raise ValueError(f"UNet: len({name}) must be {expected}, got {name}={tuple(value)}")


class UNet(InitWeights, nn.Module):
    """Drop-in for mmseg's ``UNet`` backbone; returns ``num_stages`` maps, deepest first.

    With the defaults (UNet-S5-D16) the outputs are
    ``[1024ch @H/16, 512ch @H/8, 256ch @H/4, 128ch @H/2, 64ch @H]``; H and W must be divisible by
    16. ``norm_eval=True`` keeps every BN in eval mode during training; ``with_cp=True`` trades
    compute for memory with activation checkpointing. ``pretrained``/``init_cfg`` exist for
    keyword compatibility only: load weights with :func:`fastunet.load_checkpoint`.
    ``init_weights()`` re-initialises as mmseg's UNet: Kaiming normal convolutions (fan_out),
    BatchNorm weight 1 and bias 0 (see :mod:`fastunet.models.weight_init`).
    """

    def __init__(self, in_channels=3, base_channels=64, num_stages=5, strides=(1, 1, 1, 1, 1),
                 enc_num_convs=(2, 2, 2, 2, 2), dec_num_convs=(2, 2, 2, 2),
                 downsamples=(True, True, True, True), enc_dilations=(1, 1, 1, 1, 1),
                 dec_dilations=(1, 1, 1, 1), with_cp=False, conv_cfg=None,
                 norm_cfg=dict(type="BN"), act_cfg=dict(type="ReLU"),
                 upsample_cfg=dict(type="InterpConv"), norm_eval=False, dcn=None, plugins=None,
                 pretrained=None, init_cfg=None):
        super().__init__()
        if dcn is not None or plugins is not None:
            raise NotImplementedError("UNet: dcn and plugins are not implemented (nor in mmseg)")
        if pretrained is not None or init_cfg is not None:
            raise ValueError("UNet: pretrained/init_cfg are not supported; build the model, then "
                             "fastunet.load_checkpoint(model, path)")
        _check_len("strides", strides, num_stages)
        _check_len("enc_num_convs", enc_num_convs, num_stages)
        _check_len("dec_num_convs", dec_num_convs, num_stages - 1)
        _check_len("downsamples", downsamples, num_stages - 1)
        _check_len("enc_dilations", enc_dilations, num_stages)
        _check_len("dec_dilations", dec_dilations, num_stages - 1)
        self.num_stages = num_stages
        self.strides = strides
        self.downsamples = downsamples
        self.norm_eval = norm_eval
        self.base_channels = base_channels

        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in range(num_stages):
            enc_conv_block = []
            if i != 0:
                if strides[i] == 1 and downsamples[i - 1]:
                    # nn.MaxPool2d that saves nothing when fed a fused block's output
                    enc_conv_block.append(MaxPool2d(kernel_size=2))
                upsample = strides[i] != 1 or downsamples[i - 1]
                self.decoder.append(UpConvBlock(
                    conv_block=BasicConvBlock, in_channels=base_channels * 2**i,
                    skip_channels=base_channels * 2**(i - 1),
                    out_channels=base_channels * 2**(i - 1), num_convs=dec_num_convs[i - 1],
                    stride=1, dilation=dec_dilations[i - 1], with_cp=with_cp, conv_cfg=conv_cfg,
                    norm_cfg=norm_cfg, act_cfg=act_cfg,
                    upsample_cfg=upsample_cfg if upsample else None))
            enc_conv_block.append(BasicConvBlock(
                in_channels=in_channels, out_channels=base_channels * 2**i,
                num_convs=enc_num_convs[i], stride=strides[i], dilation=enc_dilations[i],
                with_cp=with_cp, conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg))
            self.encoder.append(nn.Sequential(*enc_conv_block))
            in_channels = base_channels * 2**i

    def _init_own_weights(self):
        kaiming_conv_constant_norm(self)

    @property
    def downsample_rate(self):
        """Total downsampling of the encoder: input H and W must be multiples of it."""
        rate = 1
        for i in range(1, self.num_stages):
            if self.strides[i] == 2 or self.downsamples[i - 1]:
                rate *= 2
        return rate

    def _check_input_divisible(self, x):
        h, w = x.shape[-2:]
        rate = self.downsample_rate
        if h % rate or w % rate:
            raise ValueError(
                f"UNet input size {(h, w)} must be divisible by the encoder's downsample rate "
                f"{rate} (num_stages={self.num_stages}, strides={tuple(self.strides)}, "
                f"downsamples={tuple(self.downsamples)}): pad or crop the image, or use slide "
                f"inference with a crop size that is a multiple of {rate}")

    def forward(self, x):
        self._check_input_divisible(x)
        enc_outs = []
        for enc in self.encoder:
            x = enc(x)
            enc_outs.append(x)
        dec_outs = [x]
        for i in reversed(range(len(self.decoder))):
            x = self.decoder[i](enc_outs[i], x)
            dec_outs.append(x)
        return dec_outs

    def train(self, mode=True):
        """Set train/eval mode; with ``norm_eval`` the BN layers stay in eval mode."""
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self
