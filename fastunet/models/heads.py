"""Decode heads: mmseg's FCNHead, PSPHead and ASPPHead with the same state_dict layout.

As in mmseg's ``BaseDecodeHead``, the loss modules, ``conv_seg`` and ``dropout`` are created in
the base ``__init__`` before each head's own modules, which fixes the state_dict key order.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import ConvBNReLU
from .losses import build_loss
from .weight_init import InitWeights


def resize(x, size, mode="bilinear", align_corners=False):
    """Resize a (N, C, h, w) map to ``size`` = (H, W) (mmseg's ``resize``, without its warnings)."""
    # symbolic and traced sizes stay as they are, so exported graphs take any input size
    size = tuple(s if isinstance(s, (torch.SymInt, torch.Tensor)) else int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size, None, mode, align_corners)


class BaseDecodeHead(InitWeights, nn.Module):
    """Shared part of every head: input selection, dropout + 1x1 ``conv_seg``, and the losses.

    ``init_weights()`` re-initialises as mmseg: ``conv_seg`` Normal(std=0.01), bias 0, and each
    Conv-BN-ReLU that is a direct child (e.g. ``bottleneck``) Kaiming normal again.
    """

    def __init__(self, in_channels, channels, *, num_classes, out_channels=None, threshold=None,
                 dropout_ratio=0.1, conv_cfg=None, norm_cfg=None, act_cfg=dict(type="ReLU"),
                 in_index=-1, input_transform=None,
                 loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                 ignore_index=255, sampler=None, align_corners=False, init_cfg=None):
        super().__init__()
        if out_channels is not None and out_channels != num_classes:
            raise NotImplementedError(f"out_channels={out_channels}: fastunet heads predict one "
                                      f"channel per class (out_channels=num_classes)")
        if sampler is not None:
            raise NotImplementedError("pixel samplers (sampler=...) are not implemented")
        self._init_inputs(in_channels, in_index, input_transform)
        self.channels = channels
        self.num_classes = num_classes
        self.out_channels = num_classes
        self.threshold = threshold
        self.dropout_ratio = dropout_ratio
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg
        self.act_cfg = act_cfg
        self.ignore_index = ignore_index
        self.align_corners = align_corners

        if isinstance(loss_decode, dict):
            self.loss_decode = build_loss(loss_decode)
        elif isinstance(loss_decode, (list, tuple)):
            self.loss_decode = nn.ModuleList(build_loss(c) for c in loss_decode)
        else:
            raise TypeError(f"loss_decode must be a dict or a list of dicts, got "
                            f"{type(loss_decode).__name__}")

        self.conv_seg = nn.Conv2d(channels, self.out_channels, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        self._init_own_weights()

    def _init_own_weights(self):
        # mmseg's init_cfg: Normal(std=0.01) on conv_seg only, bias 0
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def _init_inputs(self, in_channels, in_index, input_transform):
        if input_transform not in (None, "resize_concat", "multiple_select"):
            raise ValueError(f"input_transform must be None, 'resize_concat' or "
                             f"'multiple_select', got {input_transform!r}")
        self.input_transform = input_transform
        self.in_index = in_index
        if input_transform is None:
            if not (isinstance(in_channels, int) and isinstance(in_index, int)):
                raise ValueError("with input_transform=None, in_channels and in_index are ints")
            self.in_channels = in_channels
        else:
            if not (isinstance(in_channels, (list, tuple)) and isinstance(in_index, (list, tuple))
                    and len(in_channels) == len(in_index)):
                raise ValueError(f"input_transform={input_transform!r} needs in_channels and "
                                 f"in_index as sequences of the same length")
            self.in_channels = (sum(in_channels) if input_transform == "resize_concat"
                                else in_channels)

    def extra_repr(self):
        return (f"input_transform={self.input_transform}, ignore_index={self.ignore_index}, "
                f"align_corners={self.align_corners}")

    def _transform_inputs(self, inputs):
        if self.input_transform == "resize_concat":
            inputs = [inputs[i] for i in self.in_index]
            return torch.cat([resize(x, inputs[0].shape[2:], align_corners=self.align_corners)
                              for x in inputs], dim=1)
        if self.input_transform == "multiple_select":
            return [inputs[i] for i in self.in_index]
        return inputs[self.in_index]

    def cls_seg(self, feat):
        """Dropout, then the 1x1 classifier."""
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)

    def _forward_feature(self, inputs):
        raise NotImplementedError

    def forward(self, inputs):
        """Backbone feature maps -> class logits at the selected map's resolution."""
        return self.cls_seg(self._forward_feature(inputs))

    @property
    def losses(self):
        """The loss modules as a list."""
        if isinstance(self.loss_decode, nn.ModuleList):
            return list(self.loss_decode)
        return [self.loss_decode]

    def loss_by_feat(self, seg_logits, seg_label):
        """Weighted losses of logits against an int64 (N, H, W) label (logits resized to it)."""
        if seg_label.dim() == 4:
            seg_label = seg_label.squeeze(1)
        seg_logits = resize(seg_logits, seg_label.shape[-2:], align_corners=self.align_corners)
        out = {}
        for loss in self.losses:
            value = loss(seg_logits, seg_label, ignore_index=self.ignore_index)
            out[loss.loss_name] = out[loss.loss_name] + value if loss.loss_name in out else value
        return out

    def loss(self, inputs, seg_label):
        """Forward on the feature maps, then :meth:`loss_by_feat`."""
        return self.loss_by_feat(self.forward(inputs), seg_label)


class FCNHead(BaseDecodeHead):
    """``num_convs`` conv->BN->ReLU (optionally concatenated with the input) then classify."""

    def __init__(self, num_convs=2, kernel_size=3, concat_input=True, dilation=1, **kwargs):
        if num_convs < 0 or dilation <= 0 or not isinstance(dilation, int):
            raise ValueError(f"FCNHead needs num_convs >= 0 and an int dilation > 0, got "
                             f"num_convs={num_convs}, dilation={dilation}")
        self.num_convs = num_convs
        self.concat_input = concat_input
        self.kernel_size = kernel_size
        super().__init__(**kwargs)
        if num_convs == 0 and self.in_channels != self.channels:
            raise ValueError("FCNHead with num_convs=0 needs in_channels == channels")
        padding = (kernel_size // 2) * dilation
        convs = [ConvBNReLU(self.in_channels if i == 0 else self.channels, self.channels,
                            kernel_size, padding=padding, dilation=dilation,
                            conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg, act_cfg=self.act_cfg)
                 for i in range(num_convs)]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        if concat_input:
            self.conv_cat = ConvBNReLU(self.in_channels + self.channels, self.channels,
                                       kernel_size, padding=kernel_size // 2,
                                       conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg,
                                       act_cfg=self.act_cfg)

    def _forward_feature(self, inputs):
        x = self._transform_inputs(inputs)
        feats = self.convs(x)
        if self.concat_input:
            feats = self.conv_cat(torch.cat([x, feats], dim=1))
        return feats


class PPM(nn.ModuleList):
    """Pyramid pooling: per scale, adaptive average pool -> 1x1 conv->BN->ReLU -> upsample."""

    def __init__(self, pool_scales, in_channels, channels, conv_cfg, norm_cfg, act_cfg,
                 align_corners):
        super().__init__()
        self.pool_scales = pool_scales
        self.align_corners = align_corners
        for scale in pool_scales:
            self.append(nn.Sequential(
                nn.AdaptiveAvgPool2d(scale),
                ConvBNReLU(in_channels, channels, 1, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                           act_cfg=act_cfg)))

    def forward(self, x):
        return [resize(ppm(x), x.shape[2:], align_corners=self.align_corners) for ppm in self]


class PSPHead(BaseDecodeHead):
    """PSPNet head: input + pyramid-pooled maps concatenated, 3x3 ``bottleneck``, classify."""

    def __init__(self, pool_scales=(1, 2, 3, 6), **kwargs):
        super().__init__(**kwargs)
        if not isinstance(pool_scales, (list, tuple)):
            raise ValueError(f"pool_scales must be a list or tuple, got {pool_scales!r}")
        self.pool_scales = pool_scales
        self.psp_modules = PPM(pool_scales, self.in_channels, self.channels,
                               conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg,
                               act_cfg=self.act_cfg, align_corners=self.align_corners)
        self.bottleneck = ConvBNReLU(self.in_channels + len(pool_scales) * self.channels,
                                     self.channels, 3, padding=1, conv_cfg=self.conv_cfg,
                                     norm_cfg=self.norm_cfg, act_cfg=self.act_cfg)

    def _forward_feature(self, inputs):
        x = self._transform_inputs(inputs)
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))


class ASPPModule(nn.ModuleList):
    """Parallel conv->BN->ReLU branches: 1x1 for dilation 1, else 3x3 dilated."""

    def __init__(self, dilations, in_channels, channels, conv_cfg, norm_cfg, act_cfg):
        super().__init__()
        self.dilations = dilations
        for d in dilations:
            self.append(ConvBNReLU(in_channels, channels, 1 if d == 1 else 3, dilation=d,
                                   padding=0 if d == 1 else d, conv_cfg=conv_cfg,
                                   norm_cfg=norm_cfg, act_cfg=act_cfg))

    def forward(self, x):
        return [m(x) for m in self]


class ASPPHead(BaseDecodeHead):
    """DeepLabV3 head: image pooling + ASPP branches concatenated, 3x3 ``bottleneck``, classify."""

    def __init__(self, dilations=(1, 6, 12, 18), **kwargs):
        super().__init__(**kwargs)
        if not isinstance(dilations, (list, tuple)):
            raise ValueError(f"dilations must be a list or tuple, got {dilations!r}")
        self.dilations = dilations
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            ConvBNReLU(self.in_channels, self.channels, 1, conv_cfg=self.conv_cfg,
                       norm_cfg=self.norm_cfg, act_cfg=self.act_cfg))
        self.aspp_modules = ASPPModule(dilations, self.in_channels, self.channels,
                                       conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg,
                                       act_cfg=self.act_cfg)
        self.bottleneck = ConvBNReLU((len(dilations) + 1) * self.channels, self.channels, 3,
                                     padding=1, conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg,
                                     act_cfg=self.act_cfg)

    def _forward_feature(self, inputs):
        x = self._transform_inputs(inputs)
        pooled = resize(self.image_pool(x), x.shape[2:], align_corners=self.align_corners)
        return self.bottleneck(torch.cat([pooled, *self.aspp_modules(x)], dim=1))


HEADS = {"FCNHead": FCNHead, "PSPHead": PSPHead, "ASPPHead": ASPPHead}


def build_head(cfg):
    """Build a head from an mmseg-style ``dict(type='FCNHead'|'PSPHead'|'ASPPHead', ...)``."""
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind not in HEADS:
        raise ValueError(f"unsupported head type {kind!r}: use one of {sorted(HEADS)}")
    return HEADS[kind](**cfg)
