"""Pure-PyTorch reference of the Conv-BN-ReLU ops (csrc/common/bn_relu.h states the math).

It defines what the native kernels must compute, and runs when they are unavailable.
"""
import torch
import torch.nn.functional as F


def layout(x):
    """Memory format the ops compute in and return (the rule of csrc/common/bn_relu_args.h)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def stats_dtype(x):
    """Statistics dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def conv_bias_relu(input, weight, bias, stride, padding, dilation, groups, relu=True):
    """relu(conv2d(input, weight) + bias), in the input's memory format."""
    out = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    if relu:
        out = torch.relu(out)
    return out.contiguous(memory_format=layout(input))


def bn_stats(input):
    """Per-channel mean and biased variance of an (N, C, H, W) tensor."""
    x = input.to(stats_dtype(input))
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return mean, var


def _affine(input, mean, var, weight, bias, eps):
    dt = stats_dtype(input)
    c = input.shape[1]
    invstd = torch.rsqrt(var.to(dt) + eps)
    w = torch.ones(c, dtype=dt, device=input.device) if weight is None else weight.to(dt)
    b = torch.zeros(c, dtype=dt, device=input.device) if bias is None else bias.to(dt)
    view = lambda t: t.reshape(1, c, 1, 1)
    xhat = (input.to(dt) - view(mean.to(dt))) * view(invstd)
    return xhat, view(invstd * w), view(w), view(b)


def bn_relu(input, mean, var, weight, bias, eps, relu=True):
    """relu((x - mean) / sqrt(var + eps) * weight + bias) with the given statistics."""
    xhat, _, w, b = _affine(input, mean, var, weight, bias, eps)
    v = xhat * w + b
    if relu:
        v = torch.relu(v)
    return v.to(input.dtype).contiguous(memory_format=layout(input))


def _masked_grad(grad_out, input, mean, var, weight, bias, eps, relu):
    xhat, scale, w, b = _affine(input, mean, var, weight, bias, eps)
    g = grad_out.to(xhat.dtype)
    if relu:
        g = torch.where(xhat * w + b > 0, g, torch.zeros_like(g))
    return g, xhat, scale


def bn_relu_backward_reduce(grad_out, input, mean, var, weight, bias, eps, relu=True):
    """Per-channel sum(dy_m) and sum(dy_m * xhat), dy_m the ReLU-masked output gradient."""
    g, xhat, _ = _masked_grad(grad_out, input, mean, var, weight, bias, eps, relu)
    return g.sum((0, 2, 3)), (g * xhat).sum((0, 2, 3))


def bn_relu_backward_elemt(grad_out, input, mean, var, weight, bias, sum_dy, sum_dy_xhat, count,
                           eps, relu=True):
    """Input gradient of batch-statistics BN(+ReLU), given the (all-reduced) sums."""
    g, xhat, scale = _masked_grad(grad_out, input, mean, var, weight, bias, eps, relu)
    c = input.shape[1]
    k1 = (sum_dy.to(g.dtype) / count).reshape(1, c, 1, 1)
    k2 = (sum_dy_xhat.to(g.dtype) / count).reshape(1, c, 1, 1)
    dx = (g - k1 - xhat * k2) * scale
    return dx.to(input.dtype).contiguous(memory_format=layout(input))


def bn_update_running_stats(running_mean, running_var, mean, var, momentum, count):
    """nn.BatchNorm2d's running update (unbiased variance), in place."""
    if count <= 1:
        raise RuntimeError(f"running statistics need more than 1 value per channel, got {count}")
    with torch.no_grad():
        m = mean.double()
        v = var.double() * (count / (count - 1))
        running_mean.copy_(momentum * m + (1 - momentum) * running_mean.double())
        running_var.copy_(momentum * v + (1 - momentum) * running_var.double())


def fold_bn(conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, eps,
            dtype=None):
    """Conv weight and bias with an eval-mode BatchNorm folded in (float64 math; returned in
    `dtype`, default the conv weight's).

    conv(x, w') + b' == bn(conv(x, w) + b) for w' = w * s, b' = (b - mean) * s + beta,
    s = gamma / sqrt(running_var + eps). Differentiable in every argument.
    """
    dt = torch.float64 if conv_weight.device.type in ("cpu", "cuda") else torch.float32
    scale = torch.rsqrt(running_var.to(dt) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(dt)
    shift = -running_mean.to(dt) * scale
    if conv_bias is not None:
        shift = shift + conv_bias.to(dt) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(dt)
    weight = conv_weight.to(dt) * scale.reshape(-1, 1, 1, 1)
    dtype = dtype or conv_weight.dtype
    return weight.to(dtype), shift.to(dtype)
