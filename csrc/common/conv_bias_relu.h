// conv + bias (+ ReLU) pieces that are the same on every device (ATen calls), used by both the
// CPU and CUDA kernels of conv_bias_relu / conv_bias_relu_backward.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "common/bn_relu_args.h"

namespace fastunet {

// Plain path: ATen's convolution, then an in-place ReLU; returned in the input's layout.
inline at::Tensor conv_bias_relu_unfused(const at::Tensor& input, const at::Tensor& weight,
                                         const c10::optional<at::Tensor>& bias,
                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, int64_t groups, bool relu) {
  const auto fmt = op_memory_format(input);
  at::Tensor out = at::convolution(input, weight, bias, stride, padding, dilation,
                                   /*transposed=*/false, /*output_padding=*/{0, 0}, groups);
  if (relu) out.relu_();
  return out.contiguous(fmt);
}

// Gradients of relu(conv(input, weight) + bias): ReLU's own backward rule on the saved output,
// then ATen's convolution backward. Outputs not asked for in output_mask are undefined.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bias_relu_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& output, const at::Tensor& input,
    const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, std::array<bool, 3> output_mask) {
  check_same_shape(grad_out, output, "grad_out", "output");
  const at::Tensor grad = relu ? at::threshold_backward(grad_out, output, 0) : grad_out;
  std::array<int64_t, 1> bias_size{weight.size(0)};
  at::OptionalIntArrayRef bias_sizes = c10::nullopt;
  if (output_mask[2]) bias_sizes = at::IntArrayRef(bias_size);
  auto grads = at::convolution_backward(grad, input, weight, bias_sizes, stride, padding,
                                        dilation, /*transposed=*/false, /*output_padding=*/{0, 0},
                                        groups, output_mask);
  // The backends pick their own layouts; answer in the layouts the fake kernel promises.
  auto& gi = std::get<0>(grads);
  auto& gw = std::get<1>(grads);
  if (gi.defined()) gi = gi.contiguous(op_memory_format(input));
  if (gw.defined()) gw = gw.contiguous(op_memory_format(weight));
  return grads;
}

}  // namespace fastunet
