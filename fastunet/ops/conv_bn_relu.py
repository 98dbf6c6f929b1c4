"""Fused Conv-BN-ReLU: typed wrappers of the ``torch.ops.fastunet`` ops, fake kernels, autograd.

Inference: ``fold_bn`` folds an eval-mode BatchNorm into the conv weight and bias once, then
``conv_bias_relu`` runs conv + bias + ReLU in one pass (on CPU by Winograd or oneDNN with a ReLU
post-op, on CUDA cuDNN's convolution and an in-place ReLU).

Training: ``conv_bn_relu_train`` runs the convolution, the per-channel batch statistics,
normalise+affine+ReLU and the fused backward. Which algorithm computes the convolution and its
two gradients (ATen/cuDNN, GEMMs for small wide CPU layers, Winograd for larger CPU maps) is
fastunet/conv_plan.py's decision. It saves only the conv output and the
statistics: the backward recomputes the normalised values and the ReLU mask, and the block's
input is rebuilt from the previous block's saved conv output when it has a recipe
(``fastunet.ops.recompute``). ``batch_norm_relu`` is the BN+ReLU part alone (traceable by
torch.compile). Both follow nn.BatchNorm2d's running-statistics update and SyncBN's reductions.
Without the native library, the wrappers run ``conv_bn_relu_reference``.
"""
import collections

import torch
import torch.nn.functional as F

from .. import _native, conv_plan
from . import conv_bn_relu_reference as ref
from . import cpu_gemm_conv as gemm_conv
from . import cpu_winograd_conv as winograd_conv
from . import recompute
from ..conv_plan import ATEN, GEMM, WINOGRAD_F4
from .conv_bn_relu_reference import fold_bn  # noqa: F401  (public: fastunet.ops.fold_bn)

_OPS = torch.ops.fastunet if _native.LOADED else None


def _pair(v):
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def conv_bias_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                   relu=True):
    """relu(conv2d(input, weight) + bias) in one pass, returned in the input's memory format.

    weight may also be a oneDNN-packed tensor (CPU inference; see ConvBNReLU's fold cache). The
    algorithm is ``conv_plan.inference_plan``'s.
    """
    args = (_pair(stride), _pair(padding), _pair(dilation), int(groups), bool(relu))
    if not _native.use_native(input):
        return ref.conv_bias_relu(input, weight, bias, *args)
    tile = conv_plan.inference_plan(input, weight, *args[:4]).winograd_tile
    if tile:
        return _OPS._winograd_conv3x3(input, weight, bias, args[4], tile)
    return _OPS.conv_bias_relu(input, weight, bias, *args)


def bn_stats(input):
    """Per-channel (mean, biased variance) of an (N, C, H, W) tensor, float32 (float64)."""
    if _native.use_native(input):
        return _OPS.bn_stats(input)
    return ref.bn_stats(input)


def bn_relu(input, mean, var, weight, bias, eps, relu=True):
    """relu((x - mean) / sqrt(var + eps) * weight + bias) with given statistics (no autograd)."""
    if _native.use_native(input):
        return _OPS.bn_relu(input, mean, var, weight, bias, float(eps), bool(relu))
    return ref.bn_relu(input, mean, var, weight, bias, eps, relu)


def bn_relu_backward_reduce(grad_out, input, mean, var, weight, bias, eps, relu=True):
    """Per-channel (sum dy_m, sum dy_m * xhat) of the batch-statistics BN(+ReLU) backward."""
    if _native.use_native(input):
        return _OPS.bn_relu_backward_reduce(grad_out, input, mean, var, weight, bias, float(eps),
                                            bool(relu))
    return ref.bn_relu_backward_reduce(grad_out, input, mean, var, weight, bias, eps, relu)


def bn_relu_backward_elemt(grad_out, input, mean, var, weight, bias, sum_dy, sum_dy_xhat, count,
                           eps, relu=True):
    """Input gradient of batch-statistics BN(+ReLU) from the (all-reduced) per-channel sums."""
    if _native.use_native(input):
        return _OPS.bn_relu_backward_elemt(grad_out, input, mean, var, weight, bias, sum_dy,
                                           sum_dy_xhat, count, float(eps), bool(relu))
    return ref.bn_relu_backward_elemt(grad_out, input, mean, var, weight, bias, sum_dy,
                                      sum_dy_xhat, count, eps, relu)


def bn_update_running_stats(running_mean, running_var, mean, var, momentum, count):
    """nn.BatchNorm2d's running-statistics update, in place (unbiased variance)."""
    if _native.use_native(running_mean):
        _OPS.bn_update_running_stats(running_mean, running_var, mean, var, float(momentum),
                                     int(count))
    else:
        ref.bn_update_running_stats(running_mean, running_var, mean, var, momentum, count)


# ----------------------------------------------------------------------------------------------
# Training: batch statistics (optionally synchronised), fused backward


def compute_dtype(x):
    """The dtype a convolution of x runs in: autocast's when it is on for x's device."""
    dev = x.device.type
    if x.dtype != torch.float64 and x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _values_per_channel(x):
    return x.numel() // x.shape[1]


def _batch_stats(x, group):
    """(mean, biased var, count) over the batch, and over all ranks of `group` when given."""
    mean, var = bn_stats(x)
    count = _values_per_channel(x)
    if group is None:
        return mean, var, count
    import torch.distributed as dist

    packed = torch.cat([mean, var, mean.new_full((1,), float(count))])
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed, group=group)
    g = torch.stack(gathered).double()
    c = mean.numel()
    means, vars_, counts = g[:, :c], g[:, c:2 * c], g[:, 2 * c:]
    total = counts.sum()
    gmean = (means * counts).sum(0) / total
    gvar = ((vars_ + (means - gmean) ** 2) * counts).sum(0) / total  # Chan's parallel merge
    return gmean.to(mean.dtype), gvar.to(var.dtype), total


def update_running_stats(running_mean, running_var, mean, var, momentum, count):
    """Running-statistics update; `count` may be a tensor (SyncBN's global count)."""
    if running_mean is None:
        return
    if not torch.is_tensor(count):
        bn_update_running_stats(running_mean, running_var, mean, var, momentum, count)
        return
    with torch.no_grad():  # SyncBN: count is on the device, so no host sync
        unbiased = var.double() * (count / (count - 1))
        running_mean.mul_(1 - momentum).add_((momentum * mean.double()).to(running_mean.dtype))
        running_var.mul_(1 - momentum).add_((momentum * unbiased).to(running_var.dtype))


def _bn_relu_grads(grad, x, mean, var, weight, bias, eps, relu, group, count):
    """(grad_x, grad_weight, grad_bias) of batch-statistics BN(+ReLU); weight grads are local."""
    sum_dy, sum_dy_xhat = bn_relu_backward_reduce(grad, x, mean, var, weight, bias, eps, relu)
    if group is None:
        gx = bn_relu_backward_elemt(grad, x, mean, var, weight, bias, sum_dy, sum_dy_xhat, count,
                                    eps, relu)
        return gx, sum_dy_xhat, sum_dy
    import torch.distributed as dist

    sums = torch.cat([sum_dy, sum_dy_xhat])
    dist.all_reduce(sums, group=group)
    # global means passed as sums over a count of 1: the count stays on the device
    c = sum_dy.numel()
    means = (sums.double() / count).to(sums.dtype)
    gx = bn_relu_backward_elemt(grad, x, mean, var, weight, bias, means[:c], means[c:], 1, eps,
                                relu)
    return gx, sum_dy_xhat, sum_dy


def _stats_outputs(ctx, y, mean, var, count):
    """Function outputs: y, then the statistics (and SyncBN's global count) as constants."""
    if torch.is_tensor(count):
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count
    ctx.mark_non_differentiable(mean, var)
    return y, mean, var


def _cast(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _cast_like(grad, t):
    return None if grad is None or t is None else _cast(grad, t.dtype)


class _BNReLUTrain(torch.autograd.Function):
    """BN(batch statistics)+ReLU; saves the input and statistics, never the output."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, relu, group):
        ctx.set_materialize_grads(False)  # the statistics outputs get no gradient: no zeros
        mean, var, count = _batch_stats(x, group)
        y = bn_relu(x, mean, var, weight, bias, eps, relu)
        ctx.save_for_backward(x, mean, var, weight, bias)
        ctx.cfg = (eps, relu, group, count)
        return _stats_outputs(ctx, y, mean, var, count)

    @staticmethod
    def backward(ctx, grad, *_):
        if grad is None:
            return (None,) * 6
        x, mean, var, weight, bias = ctx.saved_tensors
        eps, relu, group, count = ctx.cfg
        gx, gw, gb = _bn_relu_grads(grad, x, mean, var, weight, bias, eps, relu, group, count)
        return gx, _cast_like(gw, weight), _cast_like(gb, bias), None, None, None


def batch_norm_relu(x, weight=None, bias=None, running_mean=None, running_var=None,
                    momentum=0.1, eps=1e-5, relu=True, process_group=None):
    """Training-mode BatchNorm2d (batch statistics) followed by ReLU, fused.

    Updates running_mean/running_var in place when given (nn.BatchNorm2d's rule; pass the
    cumulative factor 1/num_batches_tracked as momentum for momentum=None). With a
    process_group, statistics and gradient sums are reduced across its ranks (SyncBN).
    """
    y, mean, var, *total = _BNReLUTrain.apply(x, weight, bias, float(eps), bool(relu),
                                              process_group)
    if running_mean is not None:
        n = total[0] if total else _values_per_channel(x)
        update_running_stats(running_mean, running_var, mean, var, momentum, n)
    return y


TrainConfig = collections.namedtuple(
    "TrainConfig", "stride padding dilation groups eps relu group dtype register")


def _register_output(y, c, mean, var, bn_weight, bn_bias, eps, relu):
    recompute.register(y, lambda *a: bn_relu(*a, eps, relu), c, mean, var, bn_weight, bn_bias)


def _conv_forward(algorithm, x, weight, bias, cfg):
    if algorithm == GEMM:
        return gemm_conv.conv2d(x, weight)
    if algorithm == WINOGRAD_F4:
        return winograd_conv.conv2d(x, weight)
    return F.conv2d(x, weight, bias, cfg.stride, cfg.padding, cfg.dilation, cfg.groups)


def _conv_grads(plan, gc, x, weight, cfg, need):
    """(grad_input, grad_weight, grad_bias) of the convolution by the plan's algorithms."""
    gx = gw = gb = None
    mask = [need[0] and plan.grad_input == ATEN, need[1] and plan.grad_weight == ATEN, need[2]]
    if any(mask):
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gc, x, weight, [weight.shape[0]] if need[2] else None, cfg.stride, cfg.padding,
            cfg.dilation, False, [0, 0], cfg.groups, mask)
    if need[0] and plan.grad_input == GEMM:
        gx = gemm_conv.grad_input(gc, weight, x.shape)
    elif need[0] and plan.grad_input == WINOGRAD_F4:
        gx = winograd_conv.grad_input(gc, weight)
    if need[1] and plan.grad_weight == GEMM:
        gw = gemm_conv.grad_weight(gc, x, weight.shape[2])
    elif need[1] and plan.grad_weight == WINOGRAD_F4:
        gw = winograd_conv.grad_weight(gc, x, weight)
    return gx, gw, gb


class _ConvBNReLUTrain(torch.autograd.Function):
    """conv -> BN(batch statistics) -> ReLU keeping one activation: the conv output.

    The convolution runs in `cfg.dtype` (autocast's) from casts made here, so no low-precision
    weight copy is cached or saved: backward casts the weight again. The input is saved only when
    it has no recipe; otherwise backward rebuilds it. The convolution's algorithms are the
    block's ``conv_plan.training_plan``, chosen in forward and kept for backward.
    """

    @staticmethod
    def forward(ctx, x, conv_weight, conv_bias, bn_weight, bn_bias, cfg, x_recipe):
        ctx.set_materialize_grads(False)  # the statistics outputs get no gradient: no zeros
        dt = cfg.dtype
        cb, xc, wc = _cast(conv_bias, dt), _cast(x, dt), _cast(conv_weight, dt)
        plan = conv_plan.training_plan(xc, wc, cb, cfg.stride, cfg.padding, cfg.dilation,
                                       cfg.groups)
        c = _conv_forward(plan.forward, xc, wc, cb, cfg)
        mean, var, count = _batch_stats(c, cfg.group)
        y = bn_relu(c, mean, var, bn_weight, bn_bias, cfg.eps, cfg.relu)
        ctx.cfg, ctx.count, ctx.x_recipe, ctx.x_dtype = cfg, count, x_recipe, x.dtype
        ctx.plan = plan
        ctx.save_for_backward(c, mean, var, conv_weight, bn_weight, bn_bias,
                              x if x_recipe is None else None)
        if cfg.register:
            _register_output(y, c, mean, var, bn_weight, bn_bias, cfg.eps, cfg.relu)
        return _stats_outputs(ctx, y, mean, var, count)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, *_):
        if grad is None:  # the output itself was not used
            return (None,) * 7
        c, mean, var, weight, bn_weight, bn_bias, x = ctx.saved_tensors
        cfg = ctx.cfg
        gc, gbw, gbb = _bn_relu_grads(grad, c, mean, var, bn_weight, bn_bias, cfg.eps, cfg.relu,
                                      cfg.group, ctx.count)
        need = ctx.needs_input_grad
        gx = gw = gcb = None
        if need[0] or need[1] or need[2]:
            if x is None:
                x = ctx.x_recipe.materialize()
            gx, gw, gcb = _conv_grads(ctx.plan, gc, _cast(x, cfg.dtype),
                                         _cast(weight, cfg.dtype), cfg, need)
        return (_cast(gx, ctx.x_dtype) if need[0] else None,
                _cast_like(gw, weight) if need[1] else None, gcb if need[2] else None,
                _cast_like(gbw, bn_weight) if need[3] else None,
                _cast_like(gbb, bn_bias) if need[4] else None, None, None)


def conv_bn_relu_train(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                       stride=1, padding=0, dilation=1, groups=1, momentum=0.1, eps=1e-5,
                       relu=True, process_group=None):
    """conv2d -> training-mode BatchNorm2d -> ReLU with one saved activation per block.

    Numbers equal the unfused modules' (same convolution, same batch statistics); running
    statistics are updated in place as nn.BatchNorm2d does when given. Under autocast the
    convolution runs in autocast's dtype. The output carries a recipe, so a following block (or
    ``recompute.max_pool2d/interpolate/cat``) does not save it again.
    """
    tracking = torch.is_grad_enabled() and (x.requires_grad or conv_weight.requires_grad)
    cfg = TrainConfig(_pair(stride), _pair(padding), _pair(dilation), int(groups), float(eps),
                      bool(relu), process_group, compute_dtype(x), tracking)
    x_recipe = recompute.recipe_of(x) if tracking else None
    y, mean, var, *total = _ConvBNReLUTrain.apply(x, conv_weight, conv_bias, bn_weight, bn_bias,
                                                  cfg, x_recipe)
    if running_mean is not None:
        n = total[0] if total else _values_per_channel(y)
        update_running_stats(running_mean, running_var, mean, var, momentum, n)
    return y


# ----------------------------------------------------------------------------------------------
# Fake kernels and autograd of the native ops


def conv_out_size(size, k, s, p, d):
    """Output length of a convolution along one axis (kernel k, stride s, padding p, dilation d)."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _empty(shape, like, fmt=torch.contiguous_format, dtype=None):
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def _check_bn_args(input, *channel_vectors):
    torch._check(input.dim() == 4, lambda: f"input must be 4-D, got shape {tuple(input.shape)}")
    for v in channel_vectors:
        if v is not None:
            torch._check(v.dim() == 1 and v.shape[0] == input.shape[1],
                         lambda: f"per-channel tensors must have shape ({input.shape[1]},)")


if _native.LOADED:

    @torch.library.register_fake("fastunet::conv_bias_relu")
    def _conv_bias_relu_fake(input, weight, bias, stride, padding, dilation, groups, relu=True):
        torch._check(input.dim() == 4, lambda: f"input must be 4-D, got {tuple(input.shape)}")
        torch._check(weight.dim() == 4, lambda: f"weight must be 4-D, got {tuple(weight.shape)}")
        torch._check(input.shape[1] == weight.shape[1] * groups,
                     lambda: "input channels must equal weight in-channels x groups")
        n, _, h, w = input.shape
        oh = conv_out_size(h, weight.shape[2], stride[0], padding[0], dilation[0])
        ow = conv_out_size(w, weight.shape[3], stride[1], padding[1], dilation[1])
        return _empty((n, weight.shape[0], oh, ow), input, ref.layout(input))

    @torch.library.register_fake("fastunet::_winograd_conv3x3")
    def _winograd_conv3x3_fake(input, weight, bias, relu=True, tile=2, block=0):
        torch._check(input.dim() == 4 and weight.dim() == 4 and weight.shape[1] == input.shape[1],
                     lambda: "input must be 4-D and weight (Cout, Cin, 3, 3)")
        n, _, h, w = input.shape
        return _empty((n, weight.shape[0], h, w), input, torch.channels_last)

    @torch.library.register_fake("fastunet::_winograd_conv3x3_train")
    def _winograd_conv3x3_train_fake(input, weight, input_grad=False, block=0):
        torch._check(input.dim() == 4 and weight.dim() == 4
                     and weight.shape[0 if input_grad else 1] == input.shape[1],
                     lambda: "input must be 4-D and match the weight's channels")
        n, _, h, w = input.shape
        return _empty((n, weight.shape[1 if input_grad else 0], h, w), input, torch.channels_last)

    @torch.library.register_fake("fastunet::_winograd_conv3x3_grad_weight")
    def _winograd_conv3x3_grad_weight_fake(input, grad, weight):
        torch._check(input.dim() == 4 and grad.dim() == 4 and weight.dim() == 4,
                     lambda: "input, grad and weight must be 4-D")
        return torch.empty_strided(weight.shape, weight.stride(), dtype=torch.float32,
                                   device=weight.device)

    @torch.library.register_fake("fastunet::conv_bias_relu_backward")
    def _conv_bias_relu_backward_fake(grad_out, output, input, weight, stride, padding, dilation,
                                      groups, relu, output_mask):
        return (_empty(input.shape, input, ref.layout(input)) if output_mask[0] else None,
                _empty(weight.shape, weight, ref.layout(weight)) if output_mask[1] else None,
                _empty((weight.shape[0],), weight) if output_mask[2] else None)

    @torch.library.register_fake("fastunet::bn_stats")
    def _bn_stats_fake(input):
        _check_bn_args(input)
        dt = ref.stats_dtype(input)
        return _empty((input.shape[1],), input, dtype=dt), _empty((input.shape[1],), input, dtype=dt)

    @torch.library.register_fake("fastunet::bn_relu")
    def _bn_relu_fake(input, mean, var, weight, bias, eps, relu=True):
        _check_bn_args(input, mean, var, weight, bias)
        return _empty(input.shape, input, ref.layout(input))

    @torch.library.register_fake("fastunet::bn_relu_backward_reduce")
    def _bn_relu_backward_reduce_fake(grad_out, input, mean, var, weight, bias, eps, relu=True):
        _check_bn_args(input, mean, var, weight, bias)
        dt = ref.stats_dtype(input)
        return _empty((input.shape[1],), input, dtype=dt), _empty((input.shape[1],), input, dtype=dt)

    @torch.library.register_fake("fastunet::bn_relu_backward_elemt")
    def _bn_relu_backward_elemt_fake(grad_out, input, mean, var, weight, bias, sum_dy,
                                     sum_dy_xhat, count, eps, relu=True):
        _check_bn_args(input, mean, var, weight, bias, sum_dy, sum_dy_xhat)
        return _empty(input.shape, input, ref.layout(input))

    @torch.library.register_fake("fastunet::bn_update_running_stats")
    def _bn_update_running_stats_fake(running_mean, running_var, mean, var, momentum, count):
        torch._check(running_mean.shape == mean.shape and running_var.shape == var.shape,
                     lambda: "running statistics and batch statistics must have one shape")

    def _conv_setup(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups, relu = inputs
        ctx.args = (stride, padding, dilation, groups, relu)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, weight, output)

    def _conv_backward(ctx, grad):
        input, weight, output = ctx.saved_tensors
        stride, padding, dilation, groups, relu = ctx.args
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2] and ctx.has_bias]
        gi, gw, gb = torch.ops.fastunet.conv_bias_relu_backward(
            grad, output, input, weight, stride, padding, dilation, groups, relu, mask)
        return (gi, gw, gb) + (None,) * (len(need) - 3)

    def _winograd_setup(ctx, inputs, output):
        input, weight, bias, relu = inputs[:4]
        # a 3x3 / stride 1 / padding 1 conv_bias_relu: the same backward
        _conv_setup(ctx, (input, weight, bias, [1, 1], [1, 1], [1, 1], 1, relu), output)

    torch.library.register_autograd("fastunet::conv_bias_relu", _conv_backward,
                                    setup_context=_conv_setup)
    torch.library.register_autograd("fastunet::_winograd_conv3x3", _conv_backward,
                                    setup_context=_winograd_setup)
