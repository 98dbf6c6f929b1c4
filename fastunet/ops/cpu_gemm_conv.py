"""CPU convolutions of small-spatial, wide layers as one GEMM each (im2col in channels_last).

oneDNN's direct convolution spends most of its time outside the arithmetic when a layer has
few pixels and many channels (UNet-S5-D16's 1024-channel stage at 4x4, batch 4: 64 output rows
against a 1024 x 9216 weight), and its weight gradient is worst there. Written as matrix
products over a channels_last im2col, such a layer costs a fraction (per-layer and whole-step
timings: benchmarks/bench_train.py, benchmarks/results/).

Used by the fused training op (``conv_bn_relu_train``) on CPU for float32 channels_last inputs of
stride-1, undilated, ungrouped, unbiased, "same"-padded convolutions, on the layers
fastunet/conv_plan.py picks; results equal oneDNN's up to float summation order.
"""
import torch
import torch.nn.functional as F


def _im2col(x, k):
    """(N*H*W, k*k*C) patches of x (N, C, H, W), in the order of a channels_last weight."""
    n, c, h, w = x.shape
    p = k // 2
    xp = F.pad(x, (p, p, p, p)) if p else x
    xp = xp.contiguous(memory_format=torch.channels_last)
    sn, sc, sh, sw = xp.stride()
    return xp.as_strided((n, h, w, k, k, c), (sn, sh, sw, sh, sw, sc)).reshape(n * h * w, -1)


def _weight_2d(weight):
    """The weight (Cout, Cin, k, k) as (Cout, k*k*Cin) (a view of a channels_last weight)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _rows(t):
    """A channels_last (N, C, H, W) tensor as its (N*H*W, C) matrix (a view)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _from_rows(m, n, h, w):
    """(N*H*W, C) rows back to a channels_last (N, C, H, W) tensor (a view)."""
    return m.view(n, h, w, -1).permute(0, 3, 1, 2)


def conv2d(x, weight):
    """conv2d(x, weight, padding=k // 2) of an eligible conv, channels_last out."""
    n, _, h, w = x.shape
    return _from_rows(_im2col(x, weight.shape[2]) @ _weight_2d(weight).t(), n, h, w)


def grad_input(grad, weight, x_shape):
    """Input gradient: the patches' gradients summed back onto the padded input (col2im)."""
    n, c, h, w = x_shape
    k = weight.shape[2]
    p = k // 2
    cols = (_rows(grad) @ _weight_2d(weight)).view(n, h, w, k, k, c)
    out = grad.new_zeros(n, h + 2 * p, w + 2 * p, c)
    for i in range(k):
        for j in range(k):
            out[:, i:i + h, j:j + w] += cols[:, :, :, i, j]
    return out[:, p:p + h, p:p + w].permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)


def grad_weight(grad, x, k):
    """Weight gradient as one GEMM, channels_last like the weights of a channels_last model."""
    g = _rows(grad).t() @ _im2col(x, k)
    return g.view(grad.shape[1], k, k, x.shape[1]).permute(0, 3, 1, 2)
