"""CPU Winograd F(4x4,3x3) for the fused training op's convolution: forward, input and weight
gradient.

oneDNN's direct convolution runs near the FMA peak, so in training (where convolutions take most
of a CPU step) fewer multiplies is the way past it: the native
``_winograd_conv3x3_train`` (csrc/cpu/winograd_kernel.cpp) does 36 per 16 outputs instead of 144.
The input gradient of a 3x3/s1/p1 conv is itself such a conv (of the output gradient, by the
weight transposed and rotated 180 degrees), transformed straight from the weight. The weight
changes every step, so it is transformed on every call (uncached). The weight gradient is
G^T [sum over tiles of (A dy A^T) (x) (B^T x B)] G (``_winograd_conv3x3_grad_weight``): the
transpose of the forward's algebra, 36 products each summing over all tiles of the batch.

Used by ``conv_bn_relu_train`` on CPU for float32 channels_last inputs of bias-free, stride-1,
undilated, ungrouped 3x3 convs with padding 1, on the layers fastunet/conv_plan.py picks.
"""
import torch


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
