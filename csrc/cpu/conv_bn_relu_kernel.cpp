// CPU kernels of the fused Conv-BN-ReLU ops.
//
// Inference: conv_bias_relu runs oneDNN's convolution with a fused ReLU post-op
// (mkldnn::_convolution_pointwise, through the dispatcher) for float32 and for weights that
// Python pre-packed into oneDNN's layout; otherwise ATen's convolution and an in-place ReLU.
// (The layers that run by Winograd instead are sent to _winograd_conv3x3 by the Python wrapper,
// on fastunet/conv_plan.py's decision.)
// Training: per-channel statistics, normalise+affine+ReLU, and the two-pass backward. Every
// reduction visits its values in an order fixed by the shapes alone (planes in order for NCHW,
// fixed row chunks merged in order for NHWC), so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/bn_relu.h"
#include "common/bn_relu_args.h"
#include "common/conv_bias_relu.h"
#include "cpu/isa.h"

// The NHWC row loops, built for the baseline ISA and, on x86 with GCC/Clang, for AVX2 (picked at
// run time). Both builds give identical results (see the header).
namespace fastunet {
namespace nhwc_base {
#include "cpu/bn_relu_nhwc_rows.h"
}  // namespace nhwc_base
}  // namespace fastunet
#if defined(__x86_64__) && defined(__GNUC__)
#define FASTUNET_NHWC_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2")
namespace fastunet {
namespace nhwc_avx2 {
#include "cpu/bn_relu_nhwc_rows.h"
}  // namespace nhwc_avx2
}  // namespace fastunet
#pragma GCC pop_options
#endif

namespace fastunet {
namespace {

bool cpu_has_avx2() {
#ifdef FASTUNET_NHWC_AVX2
  return cpu_isa() >= CpuIsa::kAvx2;
#else
  return false;
#endif
}

// FASTUNET_NHWC(f<T>(args)) calls nhwc_avx2::f on CPUs with AVX2, else nhwc_base::f.
#ifdef FASTUNET_NHWC_AVX2
#define FASTUNET_NHWC(...) (cpu_has_avx2() ? nhwc_avx2::__VA_ARGS__ : nhwc_base::__VA_ARGS__)
#else
#define FASTUNET_NHWC(...) nhwc_base::__VA_ARGS__
#endif

// Elementwise NHWC work on rows r0..r1 of C channels: with few channels (C < 64) the rows go
// in groups of m = ceil(64 / C), treated as rows of m * C values with the per-channel arrays
// repeated m times (`wide`), so the inner loops stay long; fn(first_row, rows, width, arrays).
inline int64_t nhwc_repeat(int64_t C) { return C < 64 ? (64 + C - 1) / C : 1; }

template <typename Arrays, typename Fn>
void nhwc_elementwise(int64_t r0, int64_t r1, int64_t C, const Arrays& narrow,
                      const Arrays& wide, const Fn& fn) {
  const int64_t m = nhwc_repeat(C);
  const int64_t groups = m > 1 ? (r1 - r0) / m : 0;
  if (groups > 0) fn(r0, groups, m * C, wide);
  if (r0 + groups * m < r1) fn(r0 + groups * m, r1 - r0 - groups * m, C, narrow);
}

// Per-channel constants of ChannelAffine as separate arrays, which the row loops vectorise over.
template <typename T>
struct AffineArrays {
  std::vector<T> mean, invstd, scale, beta;
  std::vector<T> k1, k2;  // backward's per-channel sums / count, when set
  // `repeat` copies of every array back to back (see nhwc_elementwise)
  explicit AffineArrays(const std::vector<ChannelAffine<T>>& aff, int64_t repeat = 1,
                        const T* k1_ = nullptr, const T* k2_ = nullptr) {
    for (int64_t i = 0; i < repeat; ++i) {
      for (size_t c = 0; c < aff.size(); ++c) {
        mean.push_back(aff[c].mean);
        invstd.push_back(aff[c].invstd);
        scale.push_back(aff[c].scale);
        beta.push_back(aff[c].beta);
        if (k1_ != nullptr) {
          k1.push_back(k1_[c]);
          k2.push_back(k2_[c]);
        }
      }
    }
  }
};


// ---------------------------------------------------------------------------------------------
// conv_bias_relu

const c10::OperatorHandle* onednn_conv_pointwise() {
  static const auto handle =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", ""});
  return handle.has_value() ? &*handle : nullptr;
}

bool use_onednn(const at::Tensor& input, const at::Tensor& weight) {
  if (!at::hasMKLDNN() || onednn_conv_pointwise() == nullptr || input.numel() == 0) return false;
  if (weight.is_mkldnn()) return true;  // Python packed it for this dtype
  return input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
         weight.layout() == at::kStrided;
}

at::Tensor conv_bias_relu_cpu(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              bool relu) {
  TORCH_CHECK(input.device().is_cpu(), "conv_bias_relu (CPU kernel): input must be on CPU");
  check_conv_args(input, weight, bias, stride, padding, dilation, groups);
  const auto fmt = op_memory_format(input);
  if (!use_onednn(input, weight)) {
    const at::Tensor w = weight.is_mkldnn() ? weight.to_dense() : weight;
    return conv_bias_relu_unfused(input, w, bias, stride, padding, dilation, groups, relu);
  }
  // mkldnn::_convolution_pointwise(X, W, B?, padding, stride, dilation, groups, attr,
  //                                scalars, algorithm): called boxed, so no C++ signature of a
  // private ATen function is assumed.
  torch::jit::Stack stack;
  stack.reserve(10);
  stack.emplace_back(input.contiguous(fmt));
  stack.emplace_back(weight);
  stack.emplace_back(bias.has_value() && bias->defined() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(padding.vec());
  stack.emplace_back(stride.vec());
  stack.emplace_back(dilation.vec());
  stack.emplace_back(groups);
  stack.emplace_back(std::string(relu ? "relu" : "none"));
  stack.emplace_back(c10::List<c10::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  onednn_conv_pointwise()->callBoxed(&stack);
  TORCH_INTERNAL_ASSERT(stack.size() == 1, "oneDNN convolution returned ", stack.size(),
                        " values");
  // oneDNN may answer in channels_last for an NCHW input; hand back the input's layout.
  return stack[0].toTensor().contiguous(fmt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bias_relu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& output, const at::Tensor& input,
    const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, std::array<bool, 3> output_mask) {
  TORCH_CHECK(input.device().is_cpu(), "conv_bias_relu_backward (CPU kernel): input on CPU");
  return conv_bias_relu_backward_impl(grad_out, output, input, weight, stride, padding, dilation,
                                      groups, relu, output_mask);
}

// ---------------------------------------------------------------------------------------------
// BatchNorm + ReLU, training

// Rows of an NHWC input are reduced in chunks whose size depends only on the row count.
int64_t row_chunk(int64_t rows) { return std::max<int64_t>(64, (rows + 255) / 256); }

template <typename scalar_t, typename stat_t>
void stats_impl(const scalar_t* x, const BnShape& s, stat_t* mean_out, stat_t* var_out) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  if (!s.nhwc) {
    at::parallel_for(0, s.c, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Welford<acc_t> w;
        for (int64_t n = 0; n < s.n; ++n) {
          // two passes over one plane (cache-resident): its mean, then squared deviations
          const scalar_t* p = x + (n * s.c + c) * s.hw;
          acc_t sum = 0;
          for (int64_t i = 0; i < s.hw; ++i) sum += acc_t(p[i]);
          const acc_t pm = sum / acc_t(s.hw);
          acc_t m2 = 0;
          for (int64_t i = 0; i < s.hw; ++i) {
            const acc_t d = acc_t(p[i]) - pm;
            m2 += d * d;
          }
          w.merge(pm, m2, s.hw);
        }
        mean_out[c] = stat_t(w.mean);
        var_out[c] = stat_t(w.var_biased());
      }
    });
    return;
  }
  const int64_t rows = s.n * s.hw;
  const int64_t chunk = row_chunk(rows);
  const int64_t chunks = (rows + chunk - 1) / chunk;
  std::vector<acc_t> pmean(chunks * s.c, acc_t(0)), pm2(chunks * s.c, acc_t(0));
  std::vector<acc_t> inv_count(chunk);
  for (int64_t i = 0; i < chunk; ++i) inv_count[i] = acc_t(1) / acc_t(i + 1);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r_end = std::min(rows, (k + 1) * chunk);
      FASTUNET_NHWC(welford_rows<scalar_t, acc_t>(x, k * chunk, r_end, s.c,
                                                  pmean.data() + k * s.c, pm2.data() + k * s.c,
                                                  inv_count.data()));
    }
  });
  at::parallel_for(0, s.c, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      Welford<acc_t> w;
      for (int64_t k = 0; k < chunks; ++k)
        w.merge(pmean[k * s.c + c], pm2[k * s.c + c], std::min(rows, (k + 1) * chunk) - k * chunk);
      mean_out[c] = stat_t(w.mean);
      var_out[c] = stat_t(w.var_biased());
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), "bn_stats (CPU kernel): input must be on CPU");
  check_bn_input(input, "input");
  const at::Tensor x = input.contiguous(op_memory_format(input));
  const BnShape s = bn_shape(x);
  auto opts = x.options().dtype(stats_dtype(x));
  at::Tensor mean = at::zeros({s.c}, opts), var = at::zeros({s.c}, opts);
  if (s.count() == 0) return {mean, var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cpu", [&] {
    using stat_t = at::opmath_type<scalar_t>;
    stats_impl<scalar_t, stat_t>(x.data_ptr<scalar_t>(), s, mean.data_ptr<stat_t>(),
                                 var.data_ptr<stat_t>());
  });
  return {mean, var};
}

template <typename opmath_t>
std::vector<ChannelAffine<opmath_t>> affines(const at::Tensor& mean, const at::Tensor& var,
                                             const at::Tensor& gamma, const at::Tensor& beta,
                                             double eps) {
  const int64_t C = mean.size(0);
  std::vector<ChannelAffine<opmath_t>> a;
  a.reserve(C);
  const opmath_t *m = mean.data_ptr<opmath_t>(), *v = var.data_ptr<opmath_t>();
  const opmath_t *g = gamma.data_ptr<opmath_t>(), *b = beta.data_ptr<opmath_t>();
  for (int64_t c = 0; c < C; ++c) a.emplace_back(m[c], v[c], g[c], b[c], opmath_t(eps));
  return a;
}

at::Tensor bn_relu_cpu(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                       const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& bias, double eps, bool relu) {
  TORCH_CHECK(input.device().is_cpu(), "bn_relu (CPU kernel): input must be on CPU");
  const BnArgs a = bn_args(input, mean, var, weight, bias, eps);
  at::Tensor out = at::empty_like(a.x);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "bn_relu_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto aff = affines<opmath_t>(a.mean, a.var, a.gamma, a.beta, eps);
    const scalar_t* x = a.x.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    const BnShape s = a.s;
    if (!s.nhwc) {
      at::parallel_for(0, s.n * s.c, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const ChannelAffine<opmath_t> f = aff[p % s.c];
          const scalar_t* xp = x + p * s.hw;
          scalar_t* yp = y + p * s.hw;
          for (int64_t i = 0; i < s.hw; ++i)
            yp[i] = scalar_t(apply_relu(f.pre(opmath_t(xp[i])), relu));
        }
      });
    } else {
      const AffineArrays<opmath_t> narrow(aff), wide(aff, nhwc_repeat(s.c));
      at::parallel_for(0, s.n * s.hw, 16, [&](int64_t r0, int64_t r1) {
        nhwc_elementwise(r0, r1, s.c, narrow, wide, [&](int64_t first, int64_t rows, int64_t w,
                                                        const AffineArrays<opmath_t>& f) {
          const scalar_t* xs = x + first * s.c;
          scalar_t* ys = y + first * s.c;
          if (relu)
            FASTUNET_NHWC(bn_relu_rows<scalar_t, opmath_t, true>(
                xs, ys, 0, rows, w, f.mean.data(), f.scale.data(), f.beta.data()));
          else
            FASTUNET_NHWC(bn_relu_rows<scalar_t, opmath_t, false>(
                xs, ys, 0, rows, w, f.mean.data(), f.scale.data(), f.beta.data()));
        });
      });
    }
  });
  return out;
}

template <typename scalar_t, typename stat_t>
void backward_reduce_impl(const scalar_t* dy, const scalar_t* x, const BnShape& s,
                          const std::vector<ChannelAffine<stat_t>>& aff, bool relu,
                          stat_t* sum_dy, stat_t* sum_dy_xhat) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  if (!s.nhwc) {
    at::parallel_for(0, s.c, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const ChannelAffine<stat_t> f = aff[c];
        acc_t a = 0, b = 0;
        for (int64_t n = 0; n < s.n; ++n) {
          const int64_t off = (n * s.c + c) * s.hw;
          acc_t pa = 0, pb = 0;  // per-plane partial sums
          for (int64_t i = 0; i < s.hw; ++i) {
            const stat_t xv = stat_t(x[off + i]);
            const acc_t g = acc_t(relu_grad(stat_t(dy[off + i]), f.pre(xv), relu));
            pa += g;
            pb += g * acc_t(f.xhat(xv));
          }
          a += pa;
          b += pb;
        }
        sum_dy[c] = stat_t(a);
        sum_dy_xhat[c] = stat_t(b);
      }
    });
    return;
  }
  const int64_t rows = s.n * s.hw;
  const int64_t chunk = row_chunk(rows);
  const int64_t chunks = (rows + chunk - 1) / chunk;
  std::vector<acc_t> pa(chunks * s.c, acc_t(0)), pb(chunks * s.c, acc_t(0));
  const AffineArrays<stat_t> f(aff);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<stat_t> tg(s.c), th(s.c);
    for (int64_t k = k0; k < k1; ++k) {
      acc_t* a = pa.data() + k * s.c;
      acc_t* b = pb.data() + k * s.c;
      const int64_t r0 = k * chunk, r1 = std::min(rows, (k + 1) * chunk);
      if (relu)
        FASTUNET_NHWC(bn_relu_reduce_rows<scalar_t, stat_t, acc_t, true>(
            dy, x, r0, r1, s.c, f.mean.data(), f.invstd.data(), f.scale.data(), f.beta.data(), a,
            b, tg.data(), th.data()));
      else
        FASTUNET_NHWC(bn_relu_reduce_rows<scalar_t, stat_t, acc_t, false>(
            dy, x, r0, r1, s.c, f.mean.data(), f.invstd.data(), f.scale.data(), f.beta.data(), a,
            b, tg.data(), th.data()));
    }
  });
  for (int64_t c = 0; c < s.c; ++c) {
    acc_t a = 0, b = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      a += pa[k * s.c + c];
      b += pb[k * s.c + c];
    }
    sum_dy[c] = stat_t(a);
    sum_dy_xhat[c] = stat_t(b);
  }
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& var, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, bool relu) {
  TORCH_CHECK(input.device().is_cpu(), "bn_relu_backward_reduce (CPU kernel): input on CPU");
  const BnArgs a = bn_args(input, mean, var, weight, bias, eps);
  check_same_shape(grad_out, input, "grad_out", "input");
  const at::Tensor dy = grad_out.to(a.x.scalar_type()).contiguous(op_memory_format(a.x));
  auto opts = a.x.options().dtype(stats_dtype(a.x));
  at::Tensor sum_dy = at::zeros({a.s.c}, opts), sum_dy_xhat = at::zeros({a.s.c}, opts);
  if (a.s.count() == 0) return {sum_dy, sum_dy_xhat};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(),
                                  "bn_relu_backward_reduce_cpu", [&] {
    using stat_t = at::opmath_type<scalar_t>;
    const auto aff = affines<stat_t>(a.mean, a.var, a.gamma, a.beta, eps);
    backward_reduce_impl<scalar_t, stat_t>(dy.data_ptr<scalar_t>(), a.x.data_ptr<scalar_t>(),
                                           a.s, aff, relu, sum_dy.data_ptr<stat_t>(),
                                           sum_dy_xhat.data_ptr<stat_t>());
  });
  return {sum_dy, sum_dy_xhat};
}

at::Tensor bn_relu_backward_elemt_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                      const at::Tensor& mean, const at::Tensor& var,
                                      const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat,
                                      int64_t count, double eps, bool relu) {
  TORCH_CHECK(input.device().is_cpu(), "bn_relu_backward_elemt (CPU kernel): input on CPU");
  const BnArgs a = bn_args(input, mean, var, weight, bias, eps);
  check_same_shape(grad_out, input, "grad_out", "input");
  FASTUNET_CHECK_POSITIVE(count, "count");
  const at::Tensor dy = grad_out.to(a.x.scalar_type()).contiguous(op_memory_format(a.x));
  const at::Tensor k1 = channel_vector(sum_dy, input, "sum_dy") / double(count);
  const at::Tensor k2 = channel_vector(sum_dy_xhat, input, "sum_dy_xhat") / double(count);
  at::Tensor grad_in = at::empty_like(a.x);
  if (grad_in.numel() == 0) return grad_in;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(),
                                  "bn_relu_backward_elemt_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto aff = affines<opmath_t>(a.mean, a.var, a.gamma, a.beta, eps);
    const opmath_t *m1 = k1.data_ptr<opmath_t>(), *m2 = k2.data_ptr<opmath_t>();
    const scalar_t *x = a.x.data_ptr<scalar_t>(), *g = dy.data_ptr<scalar_t>();
    scalar_t* out = grad_in.data_ptr<scalar_t>();
    const BnShape s = a.s;
    auto elem = [&](int64_t i, int64_t c) {
      const ChannelAffine<opmath_t>& f = aff[c];
      const opmath_t xv = opmath_t(x[i]);
      const opmath_t gm = relu_grad(opmath_t(g[i]), f.pre(xv), relu);
      out[i] = scalar_t((gm - m1[c] - f.xhat(xv) * m2[c]) * f.scale);
    };
    if (!s.nhwc) {
      at::parallel_for(0, s.n * s.c, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p)
          for (int64_t i = p * s.hw; i < (p + 1) * s.hw; ++i) elem(i, p % s.c);
      });
    } else {
      const AffineArrays<opmath_t> narrow(aff, 1, m1, m2), wide(aff, nhwc_repeat(s.c), m1, m2);
      at::parallel_for(0, s.n * s.hw, 16, [&](int64_t r0, int64_t r1) {
        nhwc_elementwise(r0, r1, s.c, narrow, wide, [&](int64_t first, int64_t rows, int64_t w,
                                                        const AffineArrays<opmath_t>& f) {
          const int64_t off = first * s.c;
          if (relu)
            FASTUNET_NHWC(bn_relu_elemt_rows<scalar_t, opmath_t, true>(
                g + off, x + off, out + off, 0, rows, w, f.mean.data(), f.invstd.data(),
                f.scale.data(), f.beta.data(), f.k1.data(), f.k2.data()));
          else
            FASTUNET_NHWC(bn_relu_elemt_rows<scalar_t, opmath_t, false>(
                g + off, x + off, out + off, 0, rows, w, f.mean.data(), f.invstd.data(),
                f.scale.data(), f.beta.data(), f.k1.data(), f.k2.data()));
        });
      });
    }
  });
  return grad_in;
}

void check_running(const at::Tensor& running_mean, const at::Tensor& running_var,
                   const at::Tensor& mean, const at::Tensor& var, int64_t count) {
  TORCH_CHECK(count > 1, "running statistics need more than 1 value per channel, got ", count);
  TORCH_CHECK(running_mean.dim() == 1 && running_mean.sizes() == running_var.sizes() &&
                  running_mean.sizes() == mean.sizes() && mean.sizes() == var.sizes(),
              "running_mean, running_var, mean and var must be 1-D of one length, got ",
              running_mean.sizes(), ", ", running_var.sizes(), ", ", mean.sizes(), ", ",
              var.sizes());
  TORCH_CHECK(running_mean.scalar_type() == running_var.scalar_type(),
              "running_mean and running_var must have one dtype, got ",
              running_mean.scalar_type(), " and ", running_var.scalar_type());
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(),
              "running_mean and running_var must be contiguous");
}

void bn_update_running_stats_cpu(at::Tensor& running_mean, at::Tensor& running_var,
                                 const at::Tensor& mean, const at::Tensor& var, double momentum,
                                 int64_t count) {
  TORCH_CHECK(running_mean.device().is_cpu(), "bn_update_running_stats (CPU kernel): on CPU");
  check_running(running_mean, running_var, mean, var, count);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(),
                                  "bn_update_running_stats_cpu", [&] {
    const at::Tensor m = mean.to(at::kDouble).contiguous(), v = var.to(at::kDouble).contiguous();
    const double *pm = m.data_ptr<double>(), *pv = v.data_ptr<double>();
    scalar_t *rm = running_mean.data_ptr<scalar_t>(), *rv = running_var.data_ptr<scalar_t>();
    const double unbias = double(count) / double(count - 1);
    for (int64_t c = 0; c < running_mean.size(0); ++c) {
      rm[c] = scalar_t(momentum * pm[c] + (1 - momentum) * double(rm[c]));
      rv[c] = scalar_t(momentum * pv[c] * unbias + (1 - momentum) * double(rv[c]));
    }
  });
}

}  // namespace
}  // namespace fastunet

TORCH_LIBRARY_IMPL(fastunet, CPU, m) {
  m.impl("conv_bias_relu", &fastunet::conv_bias_relu_cpu);
  m.impl("conv_bias_relu_backward", &fastunet::conv_bias_relu_backward_cpu);
  m.impl("bn_stats", &fastunet::bn_stats_cpu);
  m.impl("bn_relu", &fastunet::bn_relu_cpu);
  m.impl("bn_relu_backward_reduce", &fastunet::bn_relu_backward_reduce_cpu);
  m.impl("bn_relu_backward_elemt", &fastunet::bn_relu_backward_elemt_cpu);
  m.impl("bn_update_running_stats", &fastunet::bn_update_running_stats_cpu);
}

// A weight pre-packed by oneDNN (Tensor.to_mkldnn + mkldnn_reorder_conv2d_weight) puts the call
// under the MkldnnCPU key; the same kernel takes it.
TORCH_LIBRARY_IMPL(fastunet, MkldnnCPU, m) {
  m.impl("conv_bias_relu", &fastunet::conv_bias_relu_cpu);
}
