"""CPU Winograd F(4x4,3x3) for the fused training op's convolution: forward, input and weight
gradient.

oneDNN's direct convolution runs near the FMA peak, so in training (where ~87% of a CPU step of
the fcn model is convolutions) fewer multiplies is the way past it: the native
``_winograd_conv3x3_train`` (csrc/cpu/winograd_kernel.cpp) does 36 per 16 outputs instead of 144.
The input gradient of a 3x3/s1/p1 conv is itself such a conv (of the output gradient, by the
weight transposed and rotated 180 degrees), transformed straight from the weight. The weight
changes every step, so it is transformed on every call (uncached). The weight gradient is
G^T [sum over tiles of (A dy A^T) (x) (B^T x B)] G (``_winograd_conv3x3_grad_weight``): the
transpose of the forward's algebra, 36 products each summing over all tiles of the batch.

Used by ``conv_bn_relu_train`` on CPU for float32 channels_last inputs of bias-free, stride-1,
undilated, ungrouped 3x3 convs with padding 1, on the shapes where it measured faster
(``use_winograd``); FASTUNET_WINOGRAD=0 turns it off (as for inference).
"""
import functools
import os

import torch

from .. import _native
from .cpu_gemm_conv import _eligible


# 4x4 output tiles (N * ceil(H/4) * ceil(W/4)) from which forward, input and weight gradient run
# by Winograd. Measured on 2 EPYC Zen4 cores (benchmarks/bench_winograd.py -k train, batch 4,
# weight transformed per call): forward / input gradient 2.3-2.8x faster than oneDNN at 64x64
# and 32x32 (1024 and 256 tiles), 1.8-2.2x at 16x16 (64 tiles), about even to slower at 8x8 (16
# tiles: the per-step transform of the 256-1024-channel weights costs as much as the products)
# and 0.4-0.7x at 4x4; weight gradient 2.0-2.9x at 64x64-16x16, 0.9-1.1x at 8x8.
MIN_TILES = 64


def enabled():
    """False when FASTUNET_WINOGRAD=0 (read on every call, as the native inference path does) or
    where the native kernel has no AVX-512 matrix products (slower than oneDNN there)."""
    return os.environ.get("FASTUNET_WINOGRAD") != "0" and _fast_kernel()


@functools.lru_cache(maxsize=None)
def _fast_kernel():
    return _native.LOADED and bool(_native._C.winograd_fast_kernel())


def use_winograd(x, weight, bias, stride, padding, dilation, groups):
    """(forward, input gradient, weight gradient): which of them run by Winograd for this conv."""
    if not enabled() or not _eligible(x, weight, bias, stride, padding, dilation, groups):
        return False, False, False
    cin, cout = x.shape[1], weight.shape[0]
    if weight.shape[2] != 3 or cin < 32 or cout < 32:
        return False, False, False
    tiles = x.shape[0] * ((x.shape[2] + 3) // 4) * ((x.shape[3] + 3) // 4)
    return (tiles >= MIN_TILES,) * 3


def conv2d(x, weight):
    """conv2d(x, weight, padding=1) of an eligible conv, channels_last out."""
    return torch.ops.fastunet._winograd_conv3x3_train(x, weight, False)


def grad_input(grad, weight):
    """Input gradient of conv2d(x, weight, padding=1) from its output gradient, channels_last."""
    return torch.ops.fastunet._winograd_conv3x3_train(grad, weight, True)


def grad_weight(grad, x, weight):
    """Weight gradient of conv2d(x, weight, padding=1) from its output gradient, in the weight's
    memory format."""
    return torch.ops.fastunet._winograd_conv3x3_grad_weight(x, grad, weight)
