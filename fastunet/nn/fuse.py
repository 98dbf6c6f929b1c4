"""fuse(model): fold every provably safe Conv2d -> BatchNorm2d (-> ReLU) chain for inference.

How a chain is found:
1. ``ConvBNReLU`` modules are fused in place (``fused=True``: folded weights, one conv+bias+ReLU
   call); their structure and state_dict stay as they are.
2. Elsewhere the model is traced with torch.fx (ConvBNReLU kept as a leaf). A Conv2d whose
   output feeds exactly one BatchNorm2d and nothing else, each module called once in the graph,
   is replaced by a ``FoldedConv2d`` (folded weight and bias) and the BN by ``nn.Identity``. If
   the BN's output feeds only a ReLU module that is called once, the ReLU goes into the conv too.
3. Where tracing fails (data-dependent control flow), the module's children are tried one by one,
   and ``nn.Sequential`` containers are scanned for consecutive Conv2d, BatchNorm2d[, ReLU].

Rules: the model must be in eval mode (``fuse`` raises otherwise: folding uses the running
statistics, which a training BN does not); BN layers in training mode inside an eval model and
convs with non-zero padding modes are skipped with a warning. The result computes the same
function (fp32 outputs equal to ~1e-6 relative) and is meant for inference: folded layers hold
constant weights, so their state_dict keys differ (``<conv>.weight``/``.bias``, BN keys gone).

Devices: where fastunet/defaults.py picks the plain modules for inference (CUDA), ``fuse`` leaves
the ``ConvBNReLU`` blocks on their device default and a ``FoldedConv2d`` runs ATen's convolution
and ReLU instead of fastunet's op; ``FASTUNET_FUSED=1`` asks for the fused kernels there too.
With FASTUNET_FUSED=0 the model is returned unchanged.
"""
import warnings

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .. import defaults, settings
from ..ops import conv_bn_relu as cbr
from .conv_bn_relu import ConvBNReLU, _exporting, fused_enabled, pack_for_onednn


_BN = (nn.BatchNorm2d, nn.SyncBatchNorm)  # SyncBN in eval mode is a plain BN


class FoldedConv2d(nn.Module):
    """Conv2d with a BatchNorm (and optionally a ReLU) folded in; inference only."""

    def __init__(self, conv, bn, relu):
        super().__init__()
        w, b = cbr.fold_bn(conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
                           bn.running_mean, bn.running_var,
                           None if bn.weight is None else bn.weight.detach(),
                           None if bn.bias is None else bn.bias.detach(), bn.eps)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(b, requires_grad=False)
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.relu = relu
        self._packed = None

    def extra_repr(self):
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, "
                f"kernel_size={tuple(self.weight.shape[2:])}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, relu={self.relu}")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

    def _apply(self, fn, *args, **kwargs):
        self._packed = None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x):
        if torch.jit.is_scripting() or _exporting():
            return self._forward_standard(x)
        return self._forward_native(x)

    def _forward_standard(self, x):
        """ATen's convolution and ReLU (TorchScript, exporters, devices defaulting to plain)."""
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                     self.groups)
        return torch.relu(y) if self.relu else y

    @torch.jit.unused
    def _forward_native(self, x: torch.Tensor) -> torch.Tensor:
        if settings.current().fused is None and not defaults.custom_default(
                "fused_inference", x.device.type):
            return self._forward_standard(x)
        dt = cbr.compute_dtype(x)
        w = self.weight if self.weight.dtype == dt else self.weight.to(dt)
        b = self.bias if self.bias.dtype == dt else self.bias.to(dt)
        tracking = torch.is_grad_enabled() and x.requires_grad
        if not tracking and not torch.compiler.is_compiling():
            # keyed on the parameter: its cast copy w may be an inference tensor (no version)
            key = (self.weight._version, self.weight.data_ptr(), dt)
            if self._packed is None or self._packed[0] != key:
                self._packed = (key, pack_for_onednn(w, self, x))
            if self._packed[1] is not None:
                w = self._packed[1]
        return cbr.conv_bias_relu(x if x.dtype == dt else x.to(dt), w, b, self.stride,
                                  self.padding, self.dilation, self.groups, relu=self.relu)


def cpu_fused_layout(model, x):
    """channels_last if `model` should run the NCHW CPU input x in channels_last, else None.

    oneDNN's convolutions and fastunet's fused CPU kernels are faster in NHWC
    (benchmarks/bench_conv_bn_relu.py), so a model with fused blocks (inference or training)
    converts its input once where it enters, instead of every block paying a layout round trip.
    """
    if (x.device.type != "cpu" or x.dim() != 4 or x.dtype not in (torch.float32, torch.bfloat16)
            or not x.is_contiguous()
            or x.is_contiguous(memory_format=torch.channels_last)  # C == 1 or H == W == 1
            or not torch.backends.mkldnn.is_available()):
        return None
    for m in model.modules():
        if isinstance(m, FoldedConv2d) or (isinstance(m, ConvBNReLU) and m.with_norm
                                           and m.is_fused_for(x)):
            return torch.channels_last
    return None


def _foldable(conv, bn, where):
    if type(conv) is not nn.Conv2d or not isinstance(bn, _BN):
        return False
    if bn.training or bn.running_mean is None:
        warnings.warn(f"fuse: {where} not folded: its BatchNorm is in training mode or keeps no "
                      f"running statistics", stacklevel=3)
        return False
    if conv.padding_mode != "zeros":
        warnings.warn(f"fuse: {where} not folded: padding_mode={conv.padding_mode!r}",
                      stacklevel=3)
        return False
    return True


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, (ConvBNReLU, FoldedConv2d)) or super().is_leaf_module(m, qualname)


def _set(root, qualname, module):
    parent, _, name = qualname.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _fuse_traced(root):
    """Fold the chains of root's fx graph; raises if root cannot be traced."""
    graph = _Tracer().trace(root)
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    mod = lambda node: root.get_submodule(node.target) if node.op == "call_module" else None
    count = 0
    for node in list(graph.nodes):
        conv = mod(node)
        if not isinstance(conv, nn.Conv2d) or calls[node.target] != 1 or len(node.users) != 1:
            continue
        bn_node = next(iter(node.users))
        bn = mod(bn_node)
        if (bn is None or calls[bn_node.target] != 1 or bn_node.args[:1] != (node,)
                or len(bn_node.args) + len(bn_node.kwargs) != 1):
            continue
        if not _foldable(conv, bn, node.target):
            continue
        relu_node = next(iter(bn_node.users)) if len(bn_node.users) == 1 else None
        relu = mod(relu_node) if relu_node is not None else None
        fold_relu = isinstance(relu, nn.ReLU) and calls[relu_node.target] == 1
        _set(root, node.target, FoldedConv2d(conv, bn, fold_relu))
        _set(root, bn_node.target, nn.Identity())
        if fold_relu:
            _set(root, relu_node.target, nn.Identity())
        count += 1
    return count


def _fuse_sequential(seq):
    count, i = 0, 0
    names = list(seq._modules)
    while i + 1 < len(names):
        conv, bn = seq._modules[names[i]], seq._modules[names[i + 1]]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, _BN) and _foldable(
                conv, bn, f"Sequential item {names[i]}"):
            nxt = seq._modules[names[i + 2]] if i + 2 < len(names) else None
            fold_relu = isinstance(nxt, nn.ReLU)
            seq._modules[names[i]] = FoldedConv2d(conv, bn, fold_relu)
            seq._modules[names[i + 1]] = nn.Identity()
            if fold_relu:
                seq._modules[names[i + 2]] = nn.Identity()
            count += 1
            i += 3 if fold_relu else 2
        else:
            i += 1
    return count


def _fuse_module(module):
    if isinstance(module, (ConvBNReLU, FoldedConv2d)):
        return 0
    try:
        return _fuse_traced(module)
    except Exception:  # not traceable (control flow on values): recurse into the pieces
        count = _fuse_sequential(module) if isinstance(module, nn.Sequential) else 0
        for child in list(module.children()):
            count += _fuse_module(child)
        return count


def fuse(model):
    """Return `model` (in eval mode) with its Conv2d -> BatchNorm2d (-> ReLU) chains fused.

    Raises RuntimeError for a model in training mode. See the module docstring for what is
    fused, how safety is established and what runs on each device.
    """
    if model.training:
        raise RuntimeError("fuse() folds BatchNorm running statistics into the convolutions, "
                           "which is only valid for inference: call model.eval() first")
    if not fused_enabled():
        warnings.warn("fuse: FASTUNET_FUSED=0, so the model is left unfused", stacklevel=2)
        return model
    for m in model.modules():
        if isinstance(m, ConvBNReLU) and m.fused is False:
            m.fused = None  # the device's default: fused where that measured faster
    _fuse_module(model)
    return model.eval()
