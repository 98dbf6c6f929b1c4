"""ConvBNReLU: conv -> BatchNorm -> ReLU with the state_dict of mmcv's ConvModule.

Submodules are registered as ConvModule does (``conv``, ``bn``, ``activate``), so checkpoint keys
are ``conv.weight`` and ``bn.{weight,bias,running_mean,running_var,num_batches_tracked}``.
"""
import torch.nn as nn


def _norm_layer(norm_cfg, channels):
    kind = norm_cfg.get("type", "BN")
    if kind not in ("BN", "BN2d", "SyncBN"):
        raise ValueError(f"unsupported norm_cfg type {kind!r}: fastunet implements BN and SyncBN")
    eps = norm_cfg.get("eps", 1e-5)
    momentum = norm_cfg.get("momentum", 0.1)
    layer = (nn.SyncBatchNorm if kind == "SyncBN" else nn.BatchNorm2d)(channels, eps=eps,
                                                                       momentum=momentum)
    layer.weight.requires_grad_(norm_cfg.get("requires_grad", True))
    layer.bias.requires_grad_(norm_cfg.get("requires_grad", True))
    return layer


class ConvBNReLU(nn.Module):
    """Drop-in for ``mmcv.cnn.ConvModule(..., norm_cfg=dict(type='BN'), act_cfg=dict(type='ReLU'))``.

    ``norm_cfg=None`` or ``act_cfg=None`` drop the BN or the ReLU; ``bias='auto'`` means a conv
    bias only without BN, as in mmcv. Initialisation follows ConvModule: Kaiming normal
    (fan_out, relu) conv weights, zero bias, BN weight 1 and bias 0.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias="auto", conv_cfg=None, norm_cfg=dict(type="BN"),
                 act_cfg=dict(type="ReLU"), inplace=True):
        super().__init__()
        if conv_cfg is not None and conv_cfg.get("type", "Conv2d") not in ("Conv", "Conv2d"):
            raise ValueError(f"unsupported conv_cfg {conv_cfg!r}: only plain Conv2d")
        if act_cfg is not None and act_cfg.get("type", "ReLU") != "ReLU":
            raise ValueError(f"unsupported act_cfg {act_cfg!r}: only ReLU")
        self.with_norm = norm_cfg is not None
        self.with_activation = act_cfg is not None
        if bias == "auto":
            bias = not self.with_norm
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=padding, dilation=dilation, groups=groups, bias=bias)
        if self.with_norm:
            self.bn = _norm_layer(norm_cfg, out_channels)
        if self.with_activation:
            self.activate = nn.ReLU(inplace=inplace)
        self.init_weights()

    @property
    def norm(self):
        return self.bn if self.with_norm else None

    def init_weights(self):
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)
        if self.with_norm:
            nn.init.ones_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)

    def forward(self, x):
        x = self.conv(x)
        if self.with_norm:
            x = self.bn(x)
        if self.with_activation:
            x = self.activate(x)
        return x
