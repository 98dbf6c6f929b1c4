// BatchNorm(+ReLU) math shared by the CPU and CUDA kernels, written once so the forward and the
// backward compute the pre-activation, and hence the ReLU mask, bit for bit the same way.
//
// Forward (batch statistics mean, var of each channel over N, H, W):
//   invstd = 1 / sqrt(var + eps), scale = invstd * gamma
//   v      = (x - mean) * scale + beta,      y = relu ? max(v, 0) : v   (NaN passes through)
// Backward (dy_m = dy where v > 0, else 0; M = values per channel, summed over all ranks):
//   sum_dy = sum(dy_m), sum_dy_xhat = sum(dy_m * xhat),  xhat = (x - mean) * invstd
//   dx     = (dy_m - sum_dy / M - xhat * sum_dy_xhat / M) * scale
//   dgamma = sum_dy_xhat, dbeta = sum_dy
// The backward never needs y: it recomputes v from the saved conv output and the statistics.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace fastunet {

// Pre-activation v from the centred value d = x - mean; an explicit fma on the GPU so that no
// kernel can contract it differently (the forward and the backward's ReLU mask must agree).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t affine_pre(acc_t d, acc_t scale, acc_t beta) {
#ifdef __CUDA_ARCH__
  return ::fma(d, scale, beta);
#else
  return d * scale + beta;
#endif
}

// Per-channel constants of the affine normalisation, computed identically everywhere.
template <typename acc_t>
struct ChannelAffine {
  acc_t mean, invstd, scale, beta;

  C10_HOST_DEVICE ChannelAffine(acc_t mean_, acc_t var, acc_t gamma, acc_t beta_, acc_t eps)
      : mean(mean_), beta(beta_) {
#ifdef __CUDA_ARCH__
    invstd = ::rsqrt(var + eps);
#else
    invstd = acc_t(1) / std::sqrt(var + eps);
#endif
    scale = invstd * gamma;
  }

  C10_HOST_DEVICE acc_t pre(acc_t x) const { return affine_pre(x - mean, scale, beta); }

  C10_HOST_DEVICE acc_t xhat(acc_t x) const { return (x - mean) * invstd; }
};

// relu(v) with PyTorch's NaN semantics (NaN stays NaN) ...
template <typename acc_t>
C10_HOST_DEVICE inline acc_t apply_relu(acc_t v, bool relu) {
  return (relu && v <= acc_t(0)) ? acc_t(0) : v;
}

// ... and its gradient mask (threshold_backward: the gradient passes where the output is > 0).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t relu_grad(acc_t dy, acc_t v, bool relu) {
  return (relu && !(v > acc_t(0))) ? acc_t(0) : dy;
}

// Running (count, mean, M2) of a set of values: Welford's update, Chan's merge.
template <typename acc_t>
struct Welford {
  acc_t mean = 0, m2 = 0;
  int64_t count = 0;

  C10_HOST_DEVICE void add(acc_t x) {
    count += 1;
    const acc_t d = x - mean;
    mean += d / acc_t(count);
    m2 += d * (x - mean);
  }

  C10_HOST_DEVICE void merge(acc_t o_mean, acc_t o_m2, int64_t o_count) {
    if (o_count == 0) return;
    if (count == 0) {
      mean = o_mean;
      m2 = o_m2;
      count = o_count;
      return;
    }
    const int64_t n = count + o_count;
    const acc_t d = o_mean - mean;
    const acc_t w = acc_t(o_count) / acc_t(n);
    mean += d * w;
    m2 += o_m2 + d * d * acc_t(count) * w;
    count = n;
  }

  C10_HOST_DEVICE void merge(const Welford& o) { merge(o.mean, o.m2, o.count); }

  C10_HOST_DEVICE acc_t var_biased() const { return count > 0 ? m2 / acc_t(count) : acc_t(0); }
};

}  // namespace fastunet
