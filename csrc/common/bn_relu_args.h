// Host-side validation and layout decisions for the conv/BN/ReLU ops; both backends call these.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include "common/checks.h"

namespace fastunet {

// The memory format an op computes in and returns: channels_last when the input is exactly
// that (and not also plainly contiguous, as when C == 1 or H == W == 1), else contiguous. The
// fake kernels in fastunet/ops/conv_bn_relu.py apply the same rule.
inline at::MemoryFormat op_memory_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

// Statistics and per-channel parameters are held in this type: float for half, bfloat16 and
// float inputs, double for double.
inline at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// An (N, C, H, W) input viewed as N x C x HW values, stored NCHW or NHWC (`nhwc`).
struct BnShape {
  int64_t n, c, hw;
  bool nhwc;
  C10_HOST_DEVICE int64_t count() const { return n * hw; }  // values per channel
  C10_HOST_DEVICE int64_t numel() const { return n * c * hw; }
};

inline BnShape bn_shape(const at::Tensor& x_in_layout) {
  return BnShape{x_in_layout.size(0), x_in_layout.size(1),
                 x_in_layout.size(2) * x_in_layout.size(3),
                 op_memory_format(x_in_layout) == at::MemoryFormat::ChannelsLast};
}

inline void check_bn_input(const at::Tensor& x, const char* name) {
  FASTUNET_CHECK_DIM(x, 4, name);
  FASTUNET_CHECK_FLOATING(x, name);
}

// A per-channel tensor (statistics, gamma, beta, sums): 1-D of C values on x's device.
inline void check_channel_vector(const at::Tensor& v, const at::Tensor& x, const char* name) {
  FASTUNET_CHECK_SAME_DEVICE(v, x, name, "input");
  FASTUNET_CHECK_FLOATING(v, name);
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), name, " must have shape (", x.size(1),
              ",) (one value per channel of the input), got ", v.sizes());
}

// Per-channel vector in the statistics dtype, contiguous; `fill` when absent (gamma 1, beta 0).
inline at::Tensor channel_vector(const c10::optional<at::Tensor>& v, const at::Tensor& x,
                                 double fill, const char* name) {
  const auto dtype = stats_dtype(x);
  if (!v.has_value() || !v->defined())
    return at::full({x.size(1)}, fill, x.options().dtype(dtype));
  check_channel_vector(*v, x, name);
  return v->to(dtype).contiguous();
}

inline at::Tensor channel_vector(const at::Tensor& v, const at::Tensor& x, const char* name) {
  check_channel_vector(v, x, name);
  return v.to(stats_dtype(x)).contiguous();
}

inline void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* name_a,
                             const char* name_b) {
  TORCH_CHECK(a.sizes() == b.sizes(), name_a, " must have the shape of ", name_b, " ",
              b.sizes(), ", got ", a.sizes());
  FASTUNET_CHECK_SAME_DEVICE(a, b, name_a, name_b);
}

inline void check_eps(double eps) {
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
}

// Validated arguments of the BN elementwise/reduction ops: the input in the op's layout, its
// shape, and the per-channel vectors in the statistics dtype. Both backends start from this.
struct BnArgs {
  at::Tensor x, mean, var, gamma, beta;
  BnShape s;
};

inline BnArgs bn_args(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                      const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, double eps) {
  check_bn_input(input, "input");
  check_eps(eps);
  BnArgs a;
  a.x = input.contiguous(op_memory_format(input));
  a.s = bn_shape(a.x);
  a.mean = channel_vector(mean, input, "mean");
  a.var = channel_vector(var, input, "var");
  a.gamma = channel_vector(weight, input, 1.0, "weight");
  a.beta = channel_vector(bias, input, 0.0, "bias");
  return a;
}

// _bias_relu_: `self` (a convolution's output, written in place) in one of the two layouts the
// kernels run in, and a bias of one value per channel in self's dtype, on self's device.
inline void check_bias_relu_args(const at::Tensor& self, const at::Tensor& bias) {
  check_bn_input(self, "self");
  TORCH_CHECK(self.is_contiguous(op_memory_format(self)), "self must be contiguous or "
              "channels_last (it is written in place), got strides ", self.strides());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == self.size(1), "bias must have shape (",
              self.size(1), ",), got ", bias.sizes());
  TORCH_CHECK(bias.scalar_type() == self.scalar_type(), "bias must have self's dtype ",
              self.scalar_type(), ", got ", bias.scalar_type());
  FASTUNET_CHECK_SAME_DEVICE(bias, self, "bias", "self");
}

// conv_bias_relu: the geometry arguments a 2-D convolution needs.
inline void check_conv_args(const at::Tensor& input, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  FASTUNET_CHECK_DIM(input, 4, "input");
  FASTUNET_CHECK_FLOATING(input, "input");
  TORCH_CHECK(weight.dim() == 4, "weight must be 4-D (out, in/groups, kh, kw), got shape ",
              weight.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding and dilation must each have 2 values");
  FASTUNET_CHECK_POSITIVE(groups, "groups");
  TORCH_CHECK(input.size(1) == weight.size(1) * groups, "input has ", input.size(1),
              " channels but weight expects ", weight.size(1) * groups, " (in/groups ",
              weight.size(1), " x groups ", groups, ")");
  if (!weight.is_mkldnn()) {  // a oneDNN-packed weight was packed for the input's dtype
    TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "weight must have the input's "
                "dtype ", input.scalar_type(), ", got ", weight.scalar_type());
    FASTUNET_CHECK_SAME_DEVICE(weight, input, "weight", "input");
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape (",
                weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), "bias must have the input's dtype ",
                input.scalar_type(), ", got ", bias->scalar_type());
    FASTUNET_CHECK_SAME_DEVICE(*bias, input, "bias", "input");
  }
  // Geometry, checked here so that absurd values fail with a message instead of deep inside
  // oneDNN/cuDNN (e.g. a padding of 2^40 overflowing a descriptor).
  constexpr int64_t kLimit = int64_t(1) << 31;
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(stride[i] >= 1 && dilation[i] >= 1 && padding[i] >= 0 && stride[i] < kLimit &&
                    dilation[i] < kLimit && padding[i] < kLimit,
                "stride and dilation must be in [1, 2^31) and padding in [0, 2^31), got stride ",
                stride, ", padding ", padding, ", dilation ", dilation);
    const int64_t extent = dilation[i] * (weight.size(2 + i) - 1) + 1;
    const int64_t padded = input.size(2 + i) + 2 * padding[i];
    TORCH_CHECK(padded >= extent, "input ", input.size(2), "x", input.size(3), " with padding ",
                padding, " is smaller than the kernel ", weight.size(2), "x", weight.size(3),
                " dilated by ", dilation);
  }
}

}  // namespace fastunet
