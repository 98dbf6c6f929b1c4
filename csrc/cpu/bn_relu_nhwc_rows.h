// Inner loops of the NHWC (channels_last) BatchNorm+ReLU training kernels, over a range of rows
// (pixels) with the channels innermost, written so the compiler vectorises across channels.
//
// conv_bn_relu_kernel.cpp includes this file twice, inside two namespaces: once compiled for the
// baseline ISA and once under `#pragma GCC target("avx2")`, and picks the second at run time on
// CPUs that have AVX2. It therefore has no includes of its own. FMA stays off in both builds, so
// every element is computed with the same roundings as ChannelAffine::pre / xhat (bn_relu.h) and
// both builds give bit-identical results; per-channel sums keep their row order.

// y = relu((x - mean) * scale + beta)   (NaN passes through, as apply_relu)
template <typename scalar_t, typename opmath_t, bool kRelu>
void bn_relu_rows(const scalar_t* __restrict x, scalar_t* __restrict y, int64_t r0, int64_t r1,
                  int64_t C, const opmath_t* __restrict mean, const opmath_t* __restrict scale,
                  const opmath_t* __restrict beta) {
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* __restrict xr = x + r * C;
    scalar_t* __restrict yr = y + r * C;
#pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) {
      const opmath_t v = (opmath_t(xr[c]) - mean[c]) * scale[c] + beta[c];
      yr[c] = scalar_t((kRelu && v <= opmath_t(0)) ? opmath_t(0) : v);
    }
  }
}

// a[c] += dy_m, b[c] += dy_m * xhat over rows r0..r1 (dy_m: dy where the pre-activation > 0).
// Per row, the float terms go to the scratch rows tg, th (C values each) first: GCC vectorises
// neither a select feeding a double accumulation nor the mixed widths in one loop.
template <typename scalar_t, typename stat_t, typename acc_t, bool kRelu>
void bn_relu_reduce_rows(const scalar_t* __restrict dy, const scalar_t* __restrict x, int64_t r0,
                         int64_t r1, int64_t C, const stat_t* __restrict mean,
                         const stat_t* __restrict invstd, const stat_t* __restrict scale,
                         const stat_t* __restrict beta, acc_t* __restrict a, acc_t* __restrict b,
                         stat_t* __restrict tg, stat_t* __restrict th) {
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* __restrict xr = x + r * C;
    const scalar_t* __restrict gr = dy + r * C;
#pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) {
      const stat_t xv = stat_t(xr[c]);
      const stat_t v = (xv - mean[c]) * scale[c] + beta[c];
      const stat_t gin = stat_t(gr[c]);  // loaded unconditionally: a select, not a branch
      tg[c] = (kRelu && !(v > stat_t(0))) ? stat_t(0) : gin;
      th[c] = (xv - mean[c]) * invstd[c];
    }
#pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) {
      const acc_t g = acc_t(tg[c]);
      a[c] += g;
      b[c] += g * acc_t(th[c]);
    }
  }
}

// dx = (dy_m - k1 - xhat * k2) * scale
template <typename scalar_t, typename opmath_t, bool kRelu>
void bn_relu_elemt_rows(const scalar_t* __restrict dy, const scalar_t* __restrict x,
                        scalar_t* __restrict dx, int64_t r0, int64_t r1, int64_t C,
                        const opmath_t* __restrict mean, const opmath_t* __restrict invstd,
                        const opmath_t* __restrict scale, const opmath_t* __restrict beta,
                        const opmath_t* __restrict k1, const opmath_t* __restrict k2) {
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* __restrict xr = x + r * C;
    const scalar_t* __restrict gr = dy + r * C;
    scalar_t* __restrict out = dx + r * C;
#pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) {
      const opmath_t xv = opmath_t(xr[c]);
      const opmath_t v = (xv - mean[c]) * scale[c] + beta[c];
      const opmath_t gin = opmath_t(gr[c]);
      const opmath_t gm = (kRelu && !(v > opmath_t(0))) ? opmath_t(0) : gin;
      out[c] = scalar_t((gm - k1[c] - (xv - mean[c]) * invstd[c] * k2[c]) * scale[c]);
    }
  }
}

// Welford over rows r0..r1 into per-channel mean m and squared-deviation sum q (zero on entry)
// (inv[i] = 1 / (i + 1): Welford's per-row weights, divided once per call, not once per row)
template <typename scalar_t, typename acc_t>
void welford_rows(const scalar_t* __restrict x, int64_t r0, int64_t r1, int64_t C,
                  acc_t* __restrict m, acc_t* __restrict q, const acc_t* __restrict inv_count) {
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* __restrict row = x + r * C;
    const acc_t inv = inv_count[r - r0];
#pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = acc_t(row[c]);
      const acc_t d = v - m[c];
      m[c] += d * inv;
      q[c] += d * (v - m[c]);
    }
  }
}
