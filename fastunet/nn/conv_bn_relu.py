"""ConvBNReLU: conv -> BatchNorm -> ReLU with the state_dict of mmcv's ConvModule, fused.

Submodules are registered as ConvModule does (``conv``, ``bn``, ``activate``), so checkpoint keys
are ``conv.weight`` and ``bn.{weight,bias,running_mean,running_var,num_batches_tracked}``.

Which path a block runs (``is_fused_for``): ``fused=True`` the fused kernels, ``fused=False`` the
plain modules, ``fused=None`` (the default) the device's default from fastunet/defaults.py (CPU:
fused; CUDA: the plain modules, which the committed GPU results show faster).
``FASTUNET_FUSED=0``/``1`` overrides the default for every block (``0`` also beats ``fused=True``).
The fused paths:

- eval: BN folded into the conv weight and bias once per model state, then conv + bias + ReLU in
  one native call (the convolution algorithm: fastunet/conv_plan.py). The fold is cached on the
  module and checked on each call against one number, the sum of the six source tensors' version
  counters (any in-place change raises it); ``train()``, ``.to()``/``.half()``, ``load_state_dict``
  and assigning a new parameter, buffer or submodule anywhere drop it. Edits through
  ``tensor.data`` are invisible to version counters: call ``clear_fold_cache()`` after them. With
  autograd recording (e.g. BN frozen in eval while the conv trains) the plain modules run.
- training: ``fastunet.ops.conv_bn_relu_train`` (one saved activation per block, fused BN+ReLU
  kernels, nn.BatchNorm2d's running-statistics update, SyncBN across ranks).

Under TorchScript, tracing, ONNX export and ``torch.export`` a block runs standard ATen ops only
(eval: the convolution with BN folded in, then ReLU; else the plain modules), so exported graphs
carry no fastunet op.
"""
import itertools

import torch
import torch.nn as nn

from .. import _native, defaults, settings
from ..ops import conv_bn_relu as cbr


def fused_enabled():
    """False when the environment sets FASTUNET_FUSED=0: then every block runs unfused."""
    return settings.current().fused is not False


# Bumped whenever a parameter, buffer or submodule is assigned anywhere (rare after a model is
# built): a fold cache made before holds tensors that may no longer be the module's.
_ASSIGNMENTS = itertools.count()
_EPOCH = [0]


def _assigned(*_):
    _EPOCH[0] = next(_ASSIGNMENTS)


for _hook in (nn.modules.module.register_module_parameter_registration_hook,
              nn.modules.module.register_module_buffer_registration_hook,
              nn.modules.module.register_module_module_registration_hook):
    _hook(_assigned)


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch.export


@torch.jit.unused
def _exporting() -> bool:
    """Whether a tracer or exporter records this call (its graph must hold standard ops only)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or _is_exporting()


def _cast(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


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


def _sync_group(bn):
    """SyncBN's process group when it must synchronise (as nn.SyncBatchNorm decides), else None."""
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def pack_for_onednn(weight, conv, x):
    """oneDNN-packed copy of a folded conv weight for CPU inference, or None if not applicable.

    Packing once saves the weight reorder that oneDNN otherwise repeats on every call (most of
    the time of a deep, small-spatial layer such as the 1024-channel stage at 4x4). A packed
    weight makes oneDNN answer in channels_last, so for NCHW inputs (converted back) only large
    weights are packed.
    """
    if x.device.type != "cpu" or not _native.LOADED or not torch.backends.mkldnn.is_available():
        return None  # only the native CPU kernel takes packed weights
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last)
    if not channels_last and weight.numel() < (1 << 22):
        return None
    if weight.dtype == torch.bfloat16:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
    elif weight.dtype != torch.float32:
        return None
    try:
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to_mkldnn(), list(conv.padding), list(conv.stride), list(conv.dilation),
            conv.groups, list(x.shape))
    except RuntimeError:  # an oneDNN build without this layout: the dense weight works too
        return None


class ConvBNReLU(nn.Module):
    """Drop-in for ``mmcv.cnn.ConvModule(..., norm_cfg=dict(type='BN'), act_cfg=dict(type='ReLU'))``.

    ``norm_cfg=None`` or ``act_cfg=None`` drop the BN or the ReLU; ``bias='auto'`` means a conv
    bias only without BN, as in mmcv. Initialisation follows ConvModule: Kaiming normal
    (fan_out, relu) conv weights, zero bias, BN weight 1 and bias 0. ``fused``: None (default)
    follows the device's default (fused on CPU, the plain modules on CUDA), True asks for the
    fused kernels, False always runs the plain modules; FASTUNET_FUSED=0 runs the plain modules
    everywhere. Without the native library the plain modules run.
    """

    __jit_unused_properties__ = ["norm"]  # TorchScript: the modules are enough

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias="auto", conv_cfg=None, norm_cfg=dict(type="BN"),
                 act_cfg=dict(type="ReLU"), inplace=True, fused=None):
        super().__init__()
        if conv_cfg is not None and conv_cfg.get("type", "Conv2d") not in ("Conv", "Conv2d"):
            raise ValueError(f"unsupported conv_cfg {conv_cfg!r}: only plain Conv2d")
        if act_cfg is not None and act_cfg.get("type", "ReLU") != "ReLU":
            raise ValueError(f"unsupported act_cfg {act_cfg!r}: only ReLU")
        self.with_norm = norm_cfg is not None
        self.with_activation = act_cfg is not None
        self.fused = fused
        self._fold_cache = None
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

    def extra_repr(self):
        return "" if self.fused is None else f"fused={self.fused}"

    # -- cache of the folded weights ---------------------------------------------------------

    def clear_fold_cache(self):
        """Drop the folded weights; needed only after in-place edits through ``tensor.data``,
        which version counters cannot see."""
        self._fold_cache = None

    def __getstate__(self):  # copies and pickles leave the cache (and oneDNN tensors) behind
        state = self.__dict__.copy()
        state["_fold_cache"] = None
        return state

    def _apply(self, fn, *args, **kwargs):
        self._fold_cache = None
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode=True):
        self._fold_cache = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._fold_cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _fold_sources(self):
        bn = self.bn
        return (self.conv.weight, self.conv.bias, bn.running_mean, bn.running_var, bn.weight,
                bn.bias)

    def _folded(self, x, dtype):
        """(weight, bias, packed weight or None) with BN folded in, for inputs like x."""
        srcs = self._fold_sources()
        versions = sum(t._version for t in srcs if t is not None)
        cache = self._fold_cache
        if (cache is not None and cache[0] == versions and cache[1] == _EPOCH[0]
                and cache[2] is dtype):
            return cache[3]
        with torch.no_grad():
            w, b = cbr.fold_bn(*srcs, self.bn.eps, dtype=dtype)
            folded = (w, b, pack_for_onednn(w, self.conv, x))
        self._fold_cache = (versions, _EPOCH[0], dtype, folded)
        return folded

    # -- forward -----------------------------------------------------------------------------

    def is_fused_for(self, x):
        """Whether forward(x) takes a fused path."""
        fused = self.fused
        if fused is False or settings.current().fused is False or not _native.use_native(x):
            return False
        if x.dim() != 4 or x.numel() == 0 or self.conv.padding_mode != "zeros":
            return False
        if self.with_norm and not isinstance(self.bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            return False
        if fused is None and settings.current().fused is None:  # the device's default
            training = self.with_norm and (self.bn.training or self.bn.running_mean is None)
            return defaults.custom_default("fused_training" if training else "fused_inference",
                                           x.device.type)
        return True

    def forward(self, x):
        if torch.jit.is_scripting():
            return self._forward_unfused(x)
        if _exporting():
            return self._forward_standard(x)
        return self._forward_native(x)

    @torch.jit.unused
    def _forward_native(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_fused_for(x):
            return self._forward_unfused(x)
        if not self.with_norm:
            return self._forward_conv_relu(x)
        if self.bn.training or self.bn.running_mean is None:
            return self._forward_train(x)
        return self._forward_eval(x)

    def _forward_unfused(self, x):
        x = self.conv(x)
        if hasattr(self, "bn"):  # (TorchScript resolves hasattr when compiling)
            x = self.bn(x)
        if hasattr(self, "activate"):
            x = self.activate(x)
        return x

    @torch.jit.unused
    def _forward_standard(self, x: torch.Tensor) -> torch.Tensor:
        """Standard ATen ops only: in eval the convolution with BN folded in (an exporter folds
        the fold's arithmetic on the weights into constants), then ReLU; else the modules."""
        if not self.with_norm or self.bn.training or self.bn.running_mean is None:
            return self._forward_unfused(x)
        w, b = cbr.fold_bn(*self._fold_sources(), self.bn.eps, dtype=x.dtype)
        y = torch.nn.functional.conv2d(x, w, b, *self._conv_args())
        return torch.relu(y) if self.with_activation else y

    def _conv_args(self):
        c = self.conv
        return c.stride, c.padding, c.dilation, c.groups

    def _forward_conv_relu(self, x):
        if not self.with_activation:
            return self.conv(x)
        dt = cbr.compute_dtype(x)
        c = self.conv
        bias = None if c.bias is None else _cast(c.bias, dt)
        return cbr.conv_bias_relu(_cast(x, dt), _cast(c.weight, dt), bias, *self._conv_args(),
                                  relu=True)

    def _forward_eval(self, x):
        dt = cbr.compute_dtype(x)
        if torch.compiler.is_compiling():  # a differentiable fold, which the compiler traces
            w, b = cbr.fold_bn(*self._fold_sources(), self.bn.eps, dtype=dt)
            packed = None
        elif torch.is_grad_enabled() and (x.requires_grad or any(
                t is not None and t.requires_grad for t in self._fold_sources())):
            # autograd records (e.g. BN frozen in eval while the conv trains): a fold would be
            # redone on every call and cost more ops than the modules it replaces
            return self._forward_unfused(x)
        else:
            w, b, packed = self._folded(x, dt)
        return cbr.conv_bias_relu(_cast(x, dt), w if packed is None else packed, b,
                                  *self._conv_args(), relu=self.with_activation)

    def _forward_train(self, x):
        conv, bn = self.conv, self.bn
        # momentum and num_batches_tracked exactly as nn.BatchNorm2d.forward
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        update = bn.training and bn.track_running_stats
        rm, rv = (bn.running_mean, bn.running_var) if update else (None, None)
        kh, kw = conv.kernel_size
        (sh, sw), (ph, pw), (dh, dw), groups = self._conv_args()
        per_channel = (x.shape[0] * cbr.conv_out_size(x.shape[2], kh, sh, ph, dh)
                       * cbr.conv_out_size(x.shape[3], kw, sw, pw, dw))
        if per_channel == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {[x.shape[0], conv.out_channels, 1, 1]}")
        group = _sync_group(bn)
        if torch.compiler.is_compiling():
            return cbr.batch_norm_relu(conv(x), bn.weight, bn.bias, rm, rv, factor, bn.eps,
                                       self.with_activation, group)
        return cbr.conv_bn_relu_train(x, conv.weight, conv.bias, bn.weight, bn.bias, rm, rv,
                                      (sh, sw), (ph, pw), (dh, dw), groups, factor, bn.eps,
                                      self.with_activation, group)
