// CUDA kernels of the fused Conv-BN-ReLU ops.
//
// Inference: conv_bias_relu runs ATen's convolution (cuDNN, bias included) and an in-place ReLU.
// cuDNN's fused conv-bias-ReLU (at::cudnn_convolution_relu) was several times slower than the
// convolution alone in the committed H100 run (benchmarks/results/h100-20261127, fp16/bf16, both
// layouts), so it is only tried when FASTUNET_CUDNN_FUSED_CONV=1, for re-measuring elsewhere.
// _bias_relu_ is the other candidate epilogue: the convolution without its bias, then one
// vectorised in-place pass adding the bias and applying the ReLU (benchmarks/gpu_run.py measures
// all three against the convolution alone).
// Training: the BatchNorm statistics and the backward's per-channel sums are one launch each
// (a deterministic last-block merge), the normalise+ReLU and input-gradient passes one
// vectorised elementwise launch each, with per-channel coefficients computed once per block
// (cuda/channel_kernels.cuh). Every value is recomputed from the BN input and the statistics
// (csrc/common/bn_relu.h), which is what lets the backward skip the saved output.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "common/bn_relu.h"
#include "common/bn_relu_args.h"
#include "common/switches.h"
#include "common/conv_bias_relu.h"
#include "cuda/channel_kernels.cuh"

namespace fastunet {
namespace {

// ---------------------------------------------------------------------------------------------
// conv_bias_relu

// FASTUNET_CUDNN_FUSED_CONV, as fastunet/settings.py read it (common/switches.h)
bool cudnn_fused_conv_requested() { return switches().cudnn_fused_conv.load(); }

bool cudnn_fusable(const at::Tensor& input, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias) {
  const auto t = input.scalar_type();
  if (!cudnn_fused_conv_requested()) return false;
  if (!at::globalContext().userEnabledCuDNN() || input.numel() == 0) return false;
  if (t != at::kFloat && t != at::kHalf && t != at::kBFloat16) return false;
  if (weight.scalar_type() != t) return false;
  return !(bias.has_value() && bias->defined() && bias->scalar_type() != t);
}

at::Tensor conv_bias_relu_cuda(const at::Tensor& input, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               bool relu) {
  TORCH_CHECK(input.is_cuda(), "conv_bias_relu (CUDA kernel): input must be on a CUDA device");
  check_conv_args(input, weight, bias, stride, padding, dilation, groups);
  FASTUNET_CHECK_SAME_DEVICE(weight, input, "weight", "input");
  const c10::cuda::CUDAGuard guard(input.device());
  const auto fmt = op_memory_format(input);
  if (relu && cudnn_fusable(input, weight, bias)) {
    try {
      return at::cudnn_convolution_relu(input.contiguous(fmt), weight, bias, stride, padding,
                                        dilation, groups)
          .contiguous(fmt);
    } catch (const c10::Error&) {
      // cuDNN found no fused engine for this shape/dtype: the plain path below is exact too.
    }
  }
  return conv_bias_relu_unfused(input, weight, bias, stride, padding, dilation, groups, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bias_relu_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& output, const at::Tensor& input,
    const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, std::array<bool, 3> output_mask) {
  TORCH_CHECK(input.is_cuda(), "conv_bias_relu_backward (CUDA kernel): input must be on CUDA");
  const c10::cuda::CUDAGuard guard(input.device());
  return conv_bias_relu_backward_impl(grad_out, output, input, weight, stride, padding, dilation,
                                      groups, relu, output_mask);
}

// ---------------------------------------------------------------------------------------------
// BatchNorm(+ReLU): reductions and elementwise maps over cuda/channel_kernels.cuh

using namespace cuda_channel;

void check_index_range(const BnShape& s) {
  TORCH_CHECK(s.numel() <= std::numeric_limits<int32_t>::max(),
              "the fused BatchNorm CUDA kernels index with 32 bits; this input has ", s.numel(),
              " elements (>= 2^31). Use a smaller batch or FASTUNET_FUSED=0");
}

// bn_args (common/bn_relu_args.h) plus the kernels' 32-bit index limit.
BnArgs bn_args_cuda(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                    const c10::optional<at::Tensor>& weight,
                    const c10::optional<at::Tensor>& bias, double eps) {
  BnArgs a = bn_args(input, mean, var, weight, bias, eps);
  check_index_range(a.s);
  return a;
}

// Per-channel parameter pointers, passed by value to the kernels.
template <typename opmath_t>
struct ChannelParams {
  const opmath_t *mean, *var, *gamma, *beta;
  opmath_t eps;
  __device__ __forceinline__ ChannelAffine<opmath_t> operator()(int64_t c) const {
    return ChannelAffine<opmath_t>(mean[c], var[c], gamma[c], beta[c], eps);
  }
};

template <typename opmath_t>
ChannelParams<opmath_t> channel_params(const BnArgs& a, double eps) {
  return {a.mean.data_ptr<opmath_t>(), a.var.data_ptr<opmath_t>(), a.gamma.data_ptr<opmath_t>(),
          a.beta.data_ptr<opmath_t>(), opmath_t(eps)};
}

// bn_stats. A thread sums its values shifted by the first one it sees (no division per value,
// and no cancellation while the values stay near each other), then turns the sums into (count,
// mean, M2); threads, blocks and splits merge those by Chan's formula (as Welford::merge).
template <typename scalar_t, typename acc_type, int L>
struct StatsOp {
  using acc_t = acc_type;
  using State = Partial<acc_t, L>;  // a: mean, b: M2, n: count
  static constexpr int kLanes = L;
  struct Thread {
    acc_t shift[L], sum[L], sum_sq[L];
    int64_t n;
  };
  const scalar_t* x;
  acc_t* mean_out;
  acc_t* var_out;

  __device__ Thread start(int64_t) const {
    Thread t;
    t.n = 0;
    for (int l = 0; l < L; ++l) t.shift[l] = t.sum[l] = t.sum_sq[l] = acc_t(0);
    return t;
  }
  template <int V>
  __device__ void add(Thread& t, int64_t offset) const {
    const Pack<scalar_t, V> p = load_pack<V>(x + offset);
    if (t.n == 0) {
#pragma unroll
      for (int l = 0; l < L; ++l) t.shift[l] = acc_t(p.v[l]);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc_t d = acc_t(p.v[j]) - t.shift[j % L];
      t.sum[j % L] += d;
      t.sum_sq[j % L] += d * d;
    }
    t.n += V / L;
  }
  __device__ State state(const Thread& t) const {
    State st = State::empty();
    if (t.n == 0) return st;
    st.n = t.n;
    const acc_t n = acc_t(t.n);
    for (int l = 0; l < L; ++l) {
      st.a[l] = t.shift[l] + t.sum[l] / n;
      const acc_t m2 = t.sum_sq[l] - t.sum[l] * t.sum[l] / n;
      st.b[l] = m2 > acc_t(0) ? m2 : acc_t(0);
    }
    return st;
  }
  __device__ void merge(State& a, const State& b) const {
    if (b.n == 0) return;
    if (a.n == 0) {
      a = b;
      return;
    }
    const int64_t n = a.n + b.n;
    const acc_t w = acc_t(b.n) / acc_t(n), wa = acc_t(a.n) * w;
    for (int l = 0; l < L; ++l) {
      const acc_t d = b.a[l] - a.a[l];
      a.a[l] += d * w;
      a.b[l] += b.b[l] + d * d * wa;
    }
    a.n = n;
  }
  __device__ void finish(int64_t c0, const State& st) const {
    for (int l = 0; l < L; ++l) {
      mean_out[c0 + l] = st.a[l];
      var_out[c0 + l] = st.b[l] / acc_t(st.n);
    }
  }
};

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "bn_stats (CUDA kernel): input must be on a CUDA device");
  check_bn_input(input, "input");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(op_memory_format(input));
  const BnShape s = bn_shape(x);
  auto opts = x.options().dtype(stats_dtype(x));
  at::Tensor mean = at::empty({s.c}, opts), var = at::empty({s.c}, opts);
  if (s.c == 0) return {mean, var};
  if (s.count() == 0) return {mean.zero_(), var.zero_()};
  check_index_range(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const bool vector = vectorizable<scalar_t>(s, {x.data_ptr()});
    dispatch_vector_layout<scalar_t>(s, vector, [&](auto v, auto nhwc) {
      constexpr int V = decltype(v)::value;
      constexpr bool kNhwc = decltype(nhwc)::value;
      StatsOp<scalar_t, acc_t, kNhwc ? V : 1> op{x.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(),
                                                 var.data_ptr<acc_t>()};
      launch_channel_reduce<V, kNhwc>(op, s, x.options());
    });
  });
  return {mean, var};
}

// Writes channel c's mean, scale and beta to k[0..2] (the first coefficients of both BN maps).
template <typename opmath_t>
__device__ __forceinline__ ChannelAffine<opmath_t> affine_coefficients(
    const ChannelParams<opmath_t>& params, int64_t c, opmath_t* k) {
  const ChannelAffine<opmath_t> f = params(c);
  k[0] = f.mean;
  k[1] = f.scale;
  k[2] = f.beta;
  return f;
}

// y = relu((x - mean) * scale + beta); coefficients mean, scale, beta.
template <typename scalar_t, typename opmath_t>
struct BnReluMap : ChannelMap<scalar_t, opmath_t, 3, 1> {
  ChannelParams<opmath_t> params;
  bool relu;

  __device__ void coefficients(int64_t c, opmath_t* k) const {
    affine_coefficients(params, c, k);
  }
  __device__ __forceinline__ scalar_t value(const opmath_t* k, scalar_t x, scalar_t) const {
    return scalar_t(apply_relu(affine_pre(opmath_t(x) - k[0], k[1], k[2]), relu));
  }
};

at::Tensor bn_relu_cuda(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                        const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, double eps, bool relu) {
  TORCH_CHECK(input.is_cuda(), "bn_relu (CUDA kernel): input must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(input.device());
  const BnArgs a = bn_args_cuda(input, mean, var, weight, bias, eps);
  at::Tensor out = at::empty_like(a.x);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "bn_relu_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const bool vector = vectorizable<scalar_t>(a.s, {a.x.data_ptr(), out.data_ptr()});
    dispatch_vector_layout<scalar_t>(a.s, vector, [&](auto v, auto nhwc) {
      BnReluMap<scalar_t, opmath_t> op{{{a.x.data_ptr<scalar_t>()}, out.data_ptr<scalar_t>()},
                                       channel_params<opmath_t>(a, eps), relu};
      launch_channel_map<decltype(v)::value, decltype(nhwc)::value>(op, a.s, a.x.options());
    });
  });
  return out;
}

// bn_relu_backward_reduce: per channel sum(dy_m) and sum(dy_m * (x - mean)), the latter times
// invstd once at the end (= sum(dy_m * xhat)).
template <typename scalar_t, typename acc_type, int L>
struct GradSumsOp {
  using acc_t = acc_type;
  using State = Partial<acc_t, L>;  // a: sum_dy, b: sum_dy * (x - mean); n unused
  static constexpr int kLanes = L;
  struct Thread {
    State sums;
    acc_t mean[L], scale[L], beta[L];
  };
  const scalar_t* x;
  const scalar_t* dy;
  ChannelParams<acc_t> params;
  bool relu;
  acc_t* sum_dy;
  acc_t* sum_dy_xhat;

  __device__ Thread start(int64_t c0) const {
    Thread t;
    t.sums = State::empty();
    for (int l = 0; l < L; ++l) {
      const ChannelAffine<acc_t> f = params(c0 + l);
      t.mean[l] = f.mean;
      t.scale[l] = f.scale;
      t.beta[l] = f.beta;
    }
    return t;
  }
  template <int V>
  __device__ void add(Thread& t, int64_t offset) const {
    const Pack<scalar_t, V> px = load_pack<V>(x + offset), pg = load_pack<V>(dy + offset);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int l = j % L;
      const acc_t d = acc_t(px.v[j]) - t.mean[l];
      const acc_t g = relu_grad(acc_t(pg.v[j]), affine_pre(d, t.scale[l], t.beta[l]), relu);
      t.sums.a[l] += g;
      t.sums.b[l] += g * d;
    }
  }
  __device__ State state(const Thread& t) const { return t.sums; }
  __device__ void merge(State& a, const State& b) const {
    for (int l = 0; l < L; ++l) {
      a.a[l] += b.a[l];
      a.b[l] += b.b[l];
    }
  }
  __device__ void finish(int64_t c0, const State& st) const {
    for (int l = 0; l < L; ++l) {
      sum_dy[c0 + l] = st.a[l];
      sum_dy_xhat[c0 + l] = st.b[l] * params(c0 + l).invstd;
    }
  }
};

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& var, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, bool relu) {
  TORCH_CHECK(input.is_cuda(), "bn_relu_backward_reduce (CUDA kernel): input must be on CUDA");
  const c10::cuda::CUDAGuard guard(input.device());
  const BnArgs a = bn_args_cuda(input, mean, var, weight, bias, eps);
  check_same_shape(grad_out, input, "grad_out", "input");
  const at::Tensor dy = grad_out.to(a.x.scalar_type()).contiguous(op_memory_format(a.x));
  auto opts = a.x.options().dtype(stats_dtype(a.x));
  at::Tensor sum_dy = at::empty({a.s.c}, opts), sum_dy_xhat = at::empty({a.s.c}, opts);
  if (a.s.c == 0) return {sum_dy, sum_dy_xhat};
  if (a.s.count() == 0) return {sum_dy.zero_(), sum_dy_xhat.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(),
                                  "bn_relu_backward_reduce_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;  // == opmath type on CUDA
    const bool vector = vectorizable<scalar_t>(a.s, {a.x.data_ptr(), dy.data_ptr()});
    dispatch_vector_layout<scalar_t>(a.s, vector, [&](auto v, auto nhwc) {
      constexpr int V = decltype(v)::value;
      constexpr bool kNhwc = decltype(nhwc)::value;
      GradSumsOp<scalar_t, acc_t, kNhwc ? V : 1> op{
          a.x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), channel_params<acc_t>(a, eps), relu,
          sum_dy.data_ptr<acc_t>(), sum_dy_xhat.data_ptr<acc_t>()};
      launch_channel_reduce<V, kNhwc>(op, a.s, a.x.options());
    });
  });
  return {sum_dy, sum_dy_xhat};
}

// dx = (dy_m - sum_dy / M - xhat * sum_dy_xhat / M) * scale; coefficients mean, scale, beta,
// sum_dy / M and invstd * sum_dy_xhat / M (so xhat is never formed).
template <typename scalar_t, typename opmath_t>
struct BnReluBackwardMap : ChannelMap<scalar_t, opmath_t, 5, 2> {  // inputs x, dy
  ChannelParams<opmath_t> params;
  const opmath_t* sum_dy;
  const opmath_t* sum_dy_xhat;
  opmath_t inv_count;
  bool relu;

  __device__ void coefficients(int64_t c, opmath_t* k) const {
    const ChannelAffine<opmath_t> f = affine_coefficients(params, c, k);
    k[3] = sum_dy[c] * inv_count;
    k[4] = sum_dy_xhat[c] * inv_count * f.invstd;
  }
  __device__ __forceinline__ scalar_t value(const opmath_t* k, scalar_t x, scalar_t dy) const {
    const opmath_t d = opmath_t(x) - k[0];
    const opmath_t g = relu_grad(opmath_t(dy), affine_pre(d, k[1], k[2]), relu);
    return scalar_t((g - k[3] - d * k[4]) * k[1]);
  }
};

at::Tensor bn_relu_backward_elemt_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                       const at::Tensor& mean, const at::Tensor& var,
                                       const c10::optional<at::Tensor>& weight,
                                       const c10::optional<at::Tensor>& bias,
                                       const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat,
                                       int64_t count, double eps, bool relu) {
  TORCH_CHECK(input.is_cuda(), "bn_relu_backward_elemt (CUDA kernel): input must be on CUDA");
  const c10::cuda::CUDAGuard guard(input.device());
  const BnArgs a = bn_args_cuda(input, mean, var, weight, bias, eps);
  check_same_shape(grad_out, input, "grad_out", "input");
  FASTUNET_CHECK_POSITIVE(count, "count");
  const at::Tensor dy = grad_out.to(a.x.scalar_type()).contiguous(op_memory_format(a.x));
  const at::Tensor s_dy = channel_vector(sum_dy, input, "sum_dy");
  const at::Tensor s_dyx = channel_vector(sum_dy_xhat, input, "sum_dy_xhat");
  at::Tensor grad_in = at::empty_like(a.x);
  if (grad_in.numel() == 0) return grad_in;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(),
                                  "bn_relu_backward_elemt_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const bool vector =
        vectorizable<scalar_t>(a.s, {a.x.data_ptr(), dy.data_ptr(), grad_in.data_ptr()});
    dispatch_vector_layout<scalar_t>(a.s, vector, [&](auto v, auto nhwc) {
      BnReluBackwardMap<scalar_t, opmath_t> op{
          {{a.x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>()}, grad_in.data_ptr<scalar_t>()},
          channel_params<opmath_t>(a, eps), s_dy.data_ptr<opmath_t>(), s_dyx.data_ptr<opmath_t>(),
          opmath_t(1) / opmath_t(count), relu};
      launch_channel_map<decltype(v)::value, decltype(nhwc)::value>(op, a.s, a.x.options());
    });
  });
  return grad_in;
}

// _bias_relu_: y = relu(y + bias) in place, the epilogue of a convolution run without its bias.
template <typename scalar_t, typename opmath_t>
struct BiasReluMap : ChannelMap<scalar_t, opmath_t, 1, 1> {
  const scalar_t* bias;

  __device__ void coefficients(int64_t c, opmath_t* k) const { k[0] = opmath_t(bias[c]); }
  __device__ __forceinline__ scalar_t value(const opmath_t* k, scalar_t y, scalar_t) const {
    return scalar_t(apply_relu(opmath_t(y) + k[0], true));
  }
};

void bias_relu_cuda(const at::Tensor& self, const at::Tensor& bias_in) {
  TORCH_CHECK(self.is_cuda(), "_bias_relu_ (CUDA kernel): self must be on a CUDA device");
  check_bias_relu_args(self, bias_in);
  const c10::cuda::CUDAGuard guard(self.device());
  const BnShape s = bn_shape(self);
  if (s.numel() == 0) return;
  check_index_range(s);
  const at::Tensor bias = bias_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, self.scalar_type(), "bias_relu_cuda",
                                  [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* y = self.data_ptr<scalar_t>();
    dispatch_vector_layout<scalar_t>(s, vectorizable<scalar_t>(s, {y}), [&](auto v, auto nhwc) {
      BiasReluMap<scalar_t, opmath_t> op{{{y}, y}, bias.data_ptr<scalar_t>()};
      launch_channel_map<decltype(v)::value, decltype(nhwc)::value>(op, s, self.options());
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Running statistics (one thread per channel)

template <typename scalar_t, typename stat_t>
__global__ void bn_update_running_stats_kernel_impl(scalar_t* __restrict__ running_mean,
                                                    scalar_t* __restrict__ running_var,
                                                    const stat_t* __restrict__ mean,
                                                    const stat_t* __restrict__ var,
                                                    double momentum, double unbias,
                                                    int64_t channels) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < channels;
       c += int64_t(gridDim.x) * blockDim.x) {
    running_mean[c] =
        scalar_t(momentum * double(mean[c]) + (1 - momentum) * double(running_mean[c]));
    running_var[c] =
        scalar_t(momentum * double(var[c]) * unbias + (1 - momentum) * double(running_var[c]));
  }
}

void bn_update_running_stats_cuda(at::Tensor& running_mean, at::Tensor& running_var,
                                  const at::Tensor& mean, const at::Tensor& var, double momentum,
                                  int64_t count) {
  TORCH_CHECK(running_mean.is_cuda(), "bn_update_running_stats (CUDA kernel): tensors on CUDA");
  TORCH_CHECK(count > 1, "running statistics need more than 1 value per channel, got ", count);
  TORCH_CHECK(running_mean.dim() == 1 && running_mean.sizes() == running_var.sizes() &&
                  running_mean.sizes() == mean.sizes() && mean.sizes() == var.sizes(),
              "running_mean, running_var, mean and var must be 1-D of one length");
  TORCH_CHECK(running_mean.scalar_type() == running_var.scalar_type(),
              "running_mean and running_var must have one dtype");
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(),
              "running_mean and running_var must be contiguous");
  FASTUNET_CHECK_SAME_DEVICE(mean, running_mean, "mean", "running_mean");
  const c10::cuda::CUDAGuard guard(running_mean.device());
  const int64_t channels = running_mean.size(0);
  if (channels == 0) return;
  const at::Tensor m = mean.contiguous(), v = var.to(mean.scalar_type()).contiguous();
  const double unbias = double(count) / double(count - 1);
  const int blocks = static_cast<int>((channels + kThreads - 1) / kThreads);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(),
                                  "bn_update_running_stats_cuda", [&] {
    using running_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "bn_update_running_stats_cuda", [&] {
      bn_update_running_stats_kernel_impl<running_t, scalar_t><<<blocks, kThreads, 0, stream>>>(
          running_mean.data_ptr<running_t>(), running_var.data_ptr<running_t>(),
          m.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), momentum, unbias, channels);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace
}  // namespace fastunet

TORCH_LIBRARY_IMPL(fastunet, CUDA, m) {
  m.impl("conv_bias_relu", &fastunet::conv_bias_relu_cuda);
  m.impl("conv_bias_relu_backward", &fastunet::conv_bias_relu_backward_cuda);
  m.impl("bn_stats", &fastunet::bn_stats_cuda);
  m.impl("bn_relu", &fastunet::bn_relu_cuda);
  m.impl("bn_relu_backward_reduce", &fastunet::bn_relu_backward_reduce_cuda);
  m.impl("bn_relu_backward_elemt", &fastunet::bn_relu_backward_elemt_cuda);
  m.impl("bn_update_running_stats", &fastunet::bn_update_running_stats_cuda);
  m.impl("_bias_relu_", &fastunet::bias_relu_cuda);
}
