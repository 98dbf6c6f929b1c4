// Winograd convolution (winograd_kernel.cpp) for the CPU inference op conv_bias_relu (fused bias
// + ReLU) and the fused training op's forward and input gradient: float32, channels_last, 3x3,
// stride 1, padding 1, dilation 1, groups 1.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastunet {

// Output tile size (2 for F(2x2,3x3), 4 for F(4x4,3x3)) conv_bias_relu uses for these
// arguments, or 0 where oneDNN's direct convolution runs instead: wrong kind of convolution,
// shapes where Winograd measured slower, or FASTUNET_WINOGRAD=0 in the environment.
int64_t winograd_tile_for(const at::Tensor& input, const at::Tensor& weight,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups);

// relu?(conv3x3(input, weight, padding 1) + bias) by Winograd F(tile x tile, 3x3), channels_last
// out. weight: dense or oneDNN-packed float (Cout, Cin, 3, 3); its transform is cached while the
// weight tensor lives and its version counter is unchanged. block: tiles per work item (0: auto).
at::Tensor winograd_conv3x3(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, bool relu, int64_t tile,
                            int64_t block = 0);

// Whether this CPU and build run the Winograd products with their AVX-512 kernel (cpu/isa.h,
// capped by FASTUNET_CPU_ISA): the AVX2/baseline builds are far slower than oneDNN, so neither
// inference nor training dispatches Winograd without it.
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
