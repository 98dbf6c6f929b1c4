// Winograd convolutions (winograd_kernel.cpp) of CPU inference (fused bias + ReLU) and of the
// fused training op's forward, input and weight gradient: float32, 3x3, stride 1, padding 1,
// dilation 1, groups 1. Which layers run them is decided in one place, fastunet/conv_plan.py,
// which calls the private ops _winograd_conv3x3* directly.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastunet {

// relu?(conv3x3(input, weight, padding 1) + bias) by Winograd F(tile x tile, 3x3), channels_last
// out. weight: dense or oneDNN-packed float (Cout, Cin, 3, 3); its transform is cached while the
// weight tensor lives and its version counter is unchanged. block: tiles per work item (0: auto).
at::Tensor winograd_conv3x3(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, bool relu, int64_t tile,
                            int64_t block = 0);

// Whether this CPU and build run the Winograd products with their AVX-512 kernel (cpu/isa.h,
// capped by FASTUNET_CPU_ISA): the AVX2/baseline builds multiply through at::bmm per tile block,
// many times slower than it and far behind oneDNN (benchmarks/bench_winograd.py with
// FASTUNET_CPU_ISA capped), so conv_plan.py dispatches Winograd only with it.
bool winograd_has_fast_kernel();

// Training's F(4x4,3x3) convolutions, no bias or activation, channels_last out, the weight
// transformed on every call (uncached: it changes every step). input_grad false: conv3x3(input,
// weight) with input (N, Cin, H, W); true: the input gradient of that conv from input = its
// output gradient (N, Cout, H, W), i.e. the conv with the weight transposed and rotated 180°.
at::Tensor winograd_conv3x3_train(const at::Tensor& input, const at::Tensor& weight,
                                  bool input_grad, int64_t block = 0);

// The weight gradient of conv3x3(input, weight, padding 1) from its output gradient, by
// F(4x4,3x3), float32, in the memory format of `weight` (which supplies only the shape/strides).
at::Tensor winograd_conv3x3_grad_weight(const at::Tensor& input, const at::Tensor& grad,
                                        const at::Tensor& weight);

}  // namespace fastunet
