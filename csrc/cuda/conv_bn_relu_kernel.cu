// CUDA kernels of the fused Conv-BN-ReLU ops.
//
// Inference: conv_bias_relu runs ATen's convolution (cuDNN, bias included) and an in-place ReLU.
// cuDNN's fused conv-bias-ReLU (at::cudnn_convolution_relu) measured 2.5-3.4x slower than the
// convolution alone on an H100 (benchmarks/results/h100-20261127, fp16/bf16, both layouts), so it
// is only tried when FASTUNET_CUDNN_FUSED_CONV=1, for re-measuring on other GPUs/cuDNN versions.
// Training: per-channel reductions run in two launches, a partial kernel (blocks = channel tiles
// x splits of the N*H*W values, Welford or plain sums in float, block-level tree merge in shared
// memory) and a merge kernel (one thread per channel, splits merged in order), so results are
// deterministic. Elementwise kernels are grid-stride loops over the flat index, with the channel
// found by multiply-shift division; every value is recomputed from the BN input and the
// statistics (csrc/common/bn_relu.h), which is what lets the backward skip the saved output.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>

#include "common/bn_relu.h"
#include "common/bn_relu_args.h"
#include "common/conv_bias_relu.h"

namespace fastunet {
namespace {

constexpr int kThreads = 256;  // 1-D blocks: NCHW reductions, elementwise kernels
constexpr int kTileC = 32;     // 2-D blocks of NHWC reductions: 32 channels (a warp) ...
constexpr int kTileR = 8;      // ... x 8 rows

// ---------------------------------------------------------------------------------------------
// conv_bias_relu

bool cudnn_fused_conv_requested() {
  static const bool on = [] {
    const char* v = std::getenv("FASTUNET_CUDNN_FUSED_CONV");
    return v != nullptr && std::string(v) == "1";
  }();
  return on;
}

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
// Shared launch helpers

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// How many blocks share one channel (tile) of a reduction: about 4 blocks per SM in all, each
// with at least 2048 values, at most 512 splits.
int64_t reduction_splits(int64_t channel_blocks, int64_t count) {
  const int64_t want = (4 * sm_count() + channel_blocks - 1) / channel_blocks;
  const int64_t most = std::max<int64_t>(1, count / 2048);
  return std::max<int64_t>(1, std::min<int64_t>({want, most, 512}));
}

int elementwise_blocks(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(b, int64_t(sm_count()) * 32));
}

// Channel of flat index i (< 2^31) in an NCHW or NHWC tensor, by multiply-shift division.
struct ChannelOf {
  at::cuda::detail::IntDivider<unsigned int> hw, c;
  bool nhwc;
  ChannelOf(const BnShape& s)
      : hw(static_cast<unsigned int>(std::max<int64_t>(s.hw, 1))),
        c(static_cast<unsigned int>(s.c)), nhwc(s.nhwc) {}
  __device__ __forceinline__ unsigned int operator()(unsigned int i) const {
    return nhwc ? c.mod(i) : c.mod(hw.div(i));
  }
};

void check_index_range(const BnShape& s) {
  TORCH_CHECK(s.numel() <= std::numeric_limits<int32_t>::max(),
              "the fused BatchNorm CUDA kernels index with 32 bits; this input has ", s.numel(),
              " elements (>= 2^31). Use a smaller batch or FASTUNET_FUSED=0");
}

// Values [begin, end) of one split of `total`.
__device__ __forceinline__ void split_range(int64_t total, int64_t splits, int64_t split,
                                            int64_t* begin, int64_t* end) {
  const int64_t per = (total + splits - 1) / splits;
  *begin = split * per;
  *end = *begin + per < total ? *begin + per : total;
}

// ---------------------------------------------------------------------------------------------
// bn_stats: partial Welford per (channel, split), then merge

template <typename acc_t>
__device__ void welford_block_reduce_1d(Welford<acc_t>* w) {
  __shared__ acc_t s_mean[kThreads], s_m2[kThreads];
  __shared__ int64_t s_n[kThreads];
  const int t = threadIdx.x;
  s_mean[t] = w->mean;
  s_m2[t] = w->m2;
  s_n[t] = w->count;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (t < stride) {
      Welford<acc_t> a;
      a.merge(s_mean[t], s_m2[t], s_n[t]);
      a.merge(s_mean[t + stride], s_m2[t + stride], s_n[t + stride]);
      s_mean[t] = a.mean;
      s_m2[t] = a.m2;
      s_n[t] = a.count;
    }
    __syncthreads();
  }
  w->mean = s_mean[0];
  w->m2 = s_m2[0];
  w->count = s_n[0];
}

// NCHW: grid (C, splits), 1-D blocks; a split is a contiguous range of the channel's N*HW values.
template <typename scalar_t, typename acc_t>
__global__ void bn_stats_nchw_kernel_impl(const scalar_t* __restrict__ x, BnShape s,
                                          int64_t splits, acc_t* __restrict__ p_mean,
                                          acc_t* __restrict__ p_m2,
                                          int64_t* __restrict__ p_count) {
  const int64_t c = blockIdx.x, split = blockIdx.y;
  int64_t i, end;
  split_range(s.count(), splits, split, &i, &end);
  Welford<acc_t> w;
  while (i < end) {  // one plane segment at a time: no division per value
    const int64_t n = i / s.hw, off = i - n * s.hw;
    const int64_t len = (s.hw - off) < (end - i) ? (s.hw - off) : (end - i);
    const scalar_t* p = x + (n * s.c + c) * s.hw + off;
    for (int64_t j = threadIdx.x; j < len; j += kThreads) w.add(acc_t(p[j]));
    i += len;
  }
  welford_block_reduce_1d(&w);
  if (threadIdx.x == 0) {
    p_mean[c * splits + split] = w.mean;
    p_m2[c * splits + split] = w.m2;
    p_count[c * splits + split] = w.count;
  }
}

// NHWC: grid (ceil(C / 32), splits), blocks (32 channels, 8 rows); rows are N*HW.
template <typename scalar_t, typename acc_t>
__global__ void bn_stats_nhwc_kernel_impl(const scalar_t* __restrict__ x, BnShape s,
                                          int64_t splits, acc_t* __restrict__ p_mean,
                                          acc_t* __restrict__ p_m2,
                                          int64_t* __restrict__ p_count) {
  __shared__ acc_t s_mean[kTileR][kTileC], s_m2[kTileR][kTileC];
  __shared__ int64_t s_n[kTileR][kTileC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * kTileC + tx, split = blockIdx.y;
  int64_t begin, end;
  split_range(s.count(), splits, split, &begin, &end);
  Welford<acc_t> w;
  if (c < s.c)
    for (int64_t r = begin + ty; r < end; r += kTileR) w.add(acc_t(x[r * s.c + c]));
  s_mean[ty][tx] = w.mean;
  s_m2[ty][tx] = w.m2;
  s_n[ty][tx] = w.count;
  __syncthreads();
  for (int stride = kTileR / 2; stride > 0; stride >>= 1) {
    if (ty < stride) {
      Welford<acc_t> a;
      a.merge(s_mean[ty][tx], s_m2[ty][tx], s_n[ty][tx]);
      a.merge(s_mean[ty + stride][tx], s_m2[ty + stride][tx], s_n[ty + stride][tx]);
      s_mean[ty][tx] = a.mean;
      s_m2[ty][tx] = a.m2;
      s_n[ty][tx] = a.count;
    }
    __syncthreads();
  }
  if (ty == 0 && c < s.c) {
    p_mean[c * splits + split] = s_mean[0][tx];
    p_m2[c * splits + split] = s_m2[0][tx];
    p_count[c * splits + split] = s_n[0][tx];
  }
}

template <typename acc_t>
__global__ void bn_stats_merge_kernel_impl(const acc_t* __restrict__ p_mean,
                                           const acc_t* __restrict__ p_m2,
                                           const int64_t* __restrict__ p_count, int64_t channels,
                                           int64_t splits, acc_t* __restrict__ mean,
                                           acc_t* __restrict__ var) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < channels;
       c += int64_t(gridDim.x) * blockDim.x) {
    Welford<acc_t> w;
    for (int64_t k = 0; k < splits; ++k)
      w.merge(p_mean[c * splits + k], p_m2[c * splits + k], p_count[c * splits + k]);
    mean[c] = w.mean;
    var[c] = w.var_biased();
  }
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "bn_stats (CUDA kernel): input must be on a CUDA device");
  check_bn_input(input, "input");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(op_memory_format(input));
  const BnShape s = bn_shape(x);
  auto opts = x.options().dtype(stats_dtype(x));
  at::Tensor mean = at::zeros({s.c}, opts), var = at::zeros({s.c}, opts);
  if (s.count() == 0 || s.c == 0) return {mean, var};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const int64_t tiles = s.nhwc ? (s.c + kTileC - 1) / kTileC : s.c;
    const int64_t splits = reduction_splits(tiles, s.count());
    auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor p_mean = at::empty({s.c * splits}, acc_opts);
    at::Tensor p_m2 = at::empty({s.c * splits}, acc_opts);
    at::Tensor p_count = at::empty({s.c * splits}, x.options().dtype(at::kLong));
    const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>(splits));
    if (s.nhwc) {
      bn_stats_nhwc_kernel_impl<scalar_t, acc_t><<<grid, dim3(kTileC, kTileR), 0, stream>>>(
          x.data_ptr<scalar_t>(), s, splits, p_mean.data_ptr<acc_t>(), p_m2.data_ptr<acc_t>(),
          p_count.data_ptr<int64_t>());
    } else {
      bn_stats_nchw_kernel_impl<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), s, splits, p_mean.data_ptr<acc_t>(), p_m2.data_ptr<acc_t>(),
          p_count.data_ptr<int64_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int merge_blocks = static_cast<int>((s.c + kThreads - 1) / kThreads);
    bn_stats_merge_kernel_impl<acc_t><<<merge_blocks, kThreads, 0, stream>>>(
        p_mean.data_ptr<acc_t>(), p_m2.data_ptr<acc_t>(), p_count.data_ptr<int64_t>(), s.c,
        splits, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

// ---------------------------------------------------------------------------------------------
// bn_relu forward and the backward pieces

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

template <typename scalar_t, typename opmath_t>
__global__ void bn_relu_forward_kernel_impl(const scalar_t* __restrict__ x,
                                            ChannelParams<opmath_t> params, ChannelOf channel_of,
                                            bool relu, unsigned int total,
                                            scalar_t* __restrict__ y) {
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += blockDim.x * gridDim.x) {
    const ChannelAffine<opmath_t> f = params(channel_of(i));
    y[i] = scalar_t(apply_relu(f.pre(opmath_t(x[i])), relu));
  }
}

at::Tensor bn_relu_cuda(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                        const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, double eps, bool relu) {
  TORCH_CHECK(input.is_cuda(), "bn_relu (CUDA kernel): input must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(input.device());
  const BnArgs a = bn_args_cuda(input, mean, var, weight, bias, eps);
  at::Tensor out = at::empty_like(a.x);
  const int64_t total = out.numel();
  if (total == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "bn_relu_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    bn_relu_forward_kernel_impl<scalar_t, opmath_t>
        <<<elementwise_blocks(total), kThreads, 0, stream>>>(
            a.x.data_ptr<scalar_t>(), channel_params<opmath_t>(a, eps), ChannelOf(a.s), relu,
            static_cast<unsigned int>(total), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Backward sums: partial (sum_dy, sum_dy_xhat) per (channel, split), then summed in order.
template <typename acc_t>
__device__ void sum2_block_reduce_1d(acc_t* a, acc_t* b) {
  __shared__ acc_t s_a[kThreads], s_b[kThreads];
  const int t = threadIdx.x;
  s_a[t] = *a;
  s_b[t] = *b;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (t < stride) {
      s_a[t] += s_a[t + stride];
      s_b[t] += s_b[t + stride];
    }
    __syncthreads();
  }
  *a = s_a[0];
  *b = s_b[0];
}

template <typename scalar_t, typename acc_t>
__global__ void bn_relu_backward_reduce_nchw_kernel_impl(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, ChannelParams<acc_t> params,
    BnShape s, bool relu, int64_t splits, acc_t* __restrict__ p_a, acc_t* __restrict__ p_b) {
  const int64_t c = blockIdx.x, split = blockIdx.y;
  const ChannelAffine<acc_t> f = params(c);
  int64_t i, end;
  split_range(s.count(), splits, split, &i, &end);
  acc_t a = 0, b = 0;
  while (i < end) {
    const int64_t n = i / s.hw, off = i - n * s.hw;
    const int64_t len = (s.hw - off) < (end - i) ? (s.hw - off) : (end - i);
    const int64_t base = (n * s.c + c) * s.hw + off;
    for (int64_t j = threadIdx.x; j < len; j += kThreads) {
      const acc_t xv = acc_t(x[base + j]);
      const acc_t g = relu_grad(acc_t(dy[base + j]), f.pre(xv), relu);
      a += g;
      b += g * f.xhat(xv);
    }
    i += len;
  }
  sum2_block_reduce_1d(&a, &b);
  if (threadIdx.x == 0) {
    p_a[c * splits + split] = a;
    p_b[c * splits + split] = b;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bn_relu_backward_reduce_nhwc_kernel_impl(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, ChannelParams<acc_t> params,
    BnShape s, bool relu, int64_t splits, acc_t* __restrict__ p_a, acc_t* __restrict__ p_b) {
  __shared__ acc_t s_a[kTileR][kTileC], s_b[kTileR][kTileC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * kTileC + tx, split = blockIdx.y;
  int64_t begin, end;
  split_range(s.count(), splits, split, &begin, &end);
  acc_t a = 0, b = 0;
  if (c < s.c) {
    const ChannelAffine<acc_t> f = params(c);
    for (int64_t r = begin + ty; r < end; r += kTileR) {
      const acc_t xv = acc_t(x[r * s.c + c]);
      const acc_t g = relu_grad(acc_t(dy[r * s.c + c]), f.pre(xv), relu);
      a += g;
      b += g * f.xhat(xv);
    }
  }
  s_a[ty][tx] = a;
  s_b[ty][tx] = b;
  __syncthreads();
  for (int stride = kTileR / 2; stride > 0; stride >>= 1) {
    if (ty < stride) {
      s_a[ty][tx] += s_a[ty + stride][tx];
      s_b[ty][tx] += s_b[ty + stride][tx];
    }
    __syncthreads();
  }
  if (ty == 0 && c < s.c) {
    p_a[c * splits + split] = s_a[0][tx];
    p_b[c * splits + split] = s_b[0][tx];
  }
}

template <typename acc_t>
__global__ void sum_splits_kernel_impl(const acc_t* __restrict__ p_a,
                                       const acc_t* __restrict__ p_b, int64_t channels,
                                       int64_t splits, acc_t* __restrict__ a,
                                       acc_t* __restrict__ b) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < channels;
       c += int64_t(gridDim.x) * blockDim.x) {
    acc_t sa = 0, sb = 0;
    for (int64_t k = 0; k < splits; ++k) {
      sa += p_a[c * splits + k];
      sb += p_b[c * splits + k];
    }
    a[c] = sa;
    b[c] = sb;
  }
}

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
  at::Tensor sum_dy = at::zeros({a.s.c}, opts), sum_dy_xhat = at::zeros({a.s.c}, opts);
  if (a.s.count() == 0 || a.s.c == 0) return {sum_dy, sum_dy_xhat};
  const BnShape s = a.s;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(),
                                  "bn_relu_backward_reduce_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;  // == opmath type on CUDA
    const int64_t tiles = s.nhwc ? (s.c + kTileC - 1) / kTileC : s.c;
    const int64_t splits = reduction_splits(tiles, s.count());
    at::Tensor p_a = at::empty({s.c * splits}, opts), p_b = at::empty({s.c * splits}, opts);
    const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>(splits));
    if (s.nhwc) {
      bn_relu_backward_reduce_nhwc_kernel_impl<scalar_t, acc_t>
          <<<grid, dim3(kTileC, kTileR), 0, stream>>>(
              dy.data_ptr<scalar_t>(), a.x.data_ptr<scalar_t>(), channel_params<acc_t>(a, eps), s,
              relu, splits, p_a.data_ptr<acc_t>(), p_b.data_ptr<acc_t>());
    } else {
      bn_relu_backward_reduce_nchw_kernel_impl<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          dy.data_ptr<scalar_t>(), a.x.data_ptr<scalar_t>(), channel_params<acc_t>(a, eps), s,
          relu, splits, p_a.data_ptr<acc_t>(), p_b.data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int merge_blocks = static_cast<int>((s.c + kThreads - 1) / kThreads);
    sum_splits_kernel_impl<acc_t><<<merge_blocks, kThreads, 0, stream>>>(
        p_a.data_ptr<acc_t>(), p_b.data_ptr<acc_t>(), s.c, splits, sum_dy.data_ptr<acc_t>(),
        sum_dy_xhat.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_dy, sum_dy_xhat};
}

template <typename scalar_t, typename opmath_t>
__global__ void bn_relu_backward_elemt_kernel_impl(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
    ChannelParams<opmath_t> params, const opmath_t* __restrict__ sum_dy,
    const opmath_t* __restrict__ sum_dy_xhat, opmath_t inv_count, ChannelOf channel_of,
    bool relu, unsigned int total, scalar_t* __restrict__ dx) {
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += blockDim.x * gridDim.x) {
    const unsigned int c = channel_of(i);
    const ChannelAffine<opmath_t> f = params(c);
    const opmath_t xv = opmath_t(x[i]);
    const opmath_t g = relu_grad(opmath_t(dy[i]), f.pre(xv), relu);
    dx[i] = scalar_t((g - sum_dy[c] * inv_count - f.xhat(xv) * (sum_dy_xhat[c] * inv_count)) *
                     f.scale);
  }
}

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
  const int64_t total = grad_in.numel();
  if (total == 0) return grad_in;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(),
                                  "bn_relu_backward_elemt_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    bn_relu_backward_elemt_kernel_impl<scalar_t, opmath_t>
        <<<elementwise_blocks(total), kThreads, 0, stream>>>(
            dy.data_ptr<scalar_t>(), a.x.data_ptr<scalar_t>(), channel_params<opmath_t>(a, eps),
            s_dy.data_ptr<opmath_t>(), s_dyx.data_ptr<opmath_t>(),
            opmath_t(1) / opmath_t(count), ChannelOf(a.s), relu,
            static_cast<unsigned int>(total), grad_in.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_in;
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
}
