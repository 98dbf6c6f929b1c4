// Winograd input and output transforms of F(2x2,3x3) (alpha = 4) and F(4x4,3x3) (alpha = 6)
// over NHWC tiles, vectorised across channels (contiguous in NHWC).
//
// winograd_kernel.cpp includes this file once per ISA (baseline, AVX2, AVX-512), each inside its
// own namespace and `#pragma GCC target`, and picks one at run time by cpuid; it therefore has
// no includes of its own. The transforms are written out by hand rather than as products with
// constant matrices: a float multiply by 0 does not fold away (0 * inf is NaN), so generic
// matrix code would do the zero terms too.

// 1-D transforms y = B^T x (input) and y = A^T x (output), strided so one routine does columns
// and rows; the F(4x4) matrices are Lavin & Gray's (points 0, +-1, +-2, infinity).
template <int A>
struct Wino;

template <>
struct Wino<4> {
  static constexpr int kOut = 2;
  static inline void in(const float* x, int sx, float* y, int sy) {
    const float x0 = x[0], x1 = x[sx], x2 = x[2 * sx], x3 = x[3 * sx];
    y[0] = x0 - x2;
    y[sy] = x1 + x2;
    y[2 * sy] = x2 - x1;
    y[3 * sy] = x1 - x3;
  }
  static inline void out(const float* x, int sx, float* y, int sy) {
    const float x0 = x[0], x1 = x[sx], x2 = x[2 * sx], x3 = x[3 * sx];
    y[0] = x0 + x1 + x2;
    y[sy] = x1 - x2 - x3;
  }
};

template <>
struct Wino<6> {
  static constexpr int kOut = 4;
  static inline void in(const float* x, int sx, float* y, int sy) {
    const float x0 = x[0], x1 = x[sx], x2 = x[2 * sx], x3 = x[3 * sx], x4 = x[4 * sx],
                x5 = x[5 * sx];
    const float a = x4 - 4.f * x2, b = x3 - 4.f * x1;  // shared by rows 1 and 2
    const float c = x4 - x2, d = 2.f * (x3 - x1);      // shared by rows 3 and 4
    y[0] = 4.f * x0 - 5.f * x2 + x4;
    y[sy] = a + b;
    y[2 * sy] = a - b;
    y[3 * sy] = c + d;
    y[4 * sy] = c - d;
    y[5 * sy] = 4.f * x1 - 5.f * x3 + x5;
  }
  static inline void out(const float* x, int sx, float* y, int sy) {
    const float x0 = x[0], x1 = x[sx], x2 = x[2 * sx], x3 = x[3 * sx], x4 = x[4 * sx],
                x5 = x[5 * sx];
    const float p12 = x1 + x2, m12 = x1 - x2, p34 = x3 + x4, m34 = x3 - x4;
    y[0] = x0 + p12 + p34;
    y[sy] = m12 + 2.f * m34;
    y[2 * sy] = p12 + 4.f * p34;
    y[3 * sy] = m12 + 8.f * m34 + x5;
  }
};

// V[xi * xs + c] = (B^T d B)[xi] for the A x A input pixels src[0..A*A) (row-major; a pointer to
// zeros where the tile overhangs the image), channels c in [0, C).
template <int A>
void winograd_input_tile(const float* const* src_ptrs, float* __restrict v, int64_t xs,
                         int64_t C) {
  const float* src[A * A];
  for (int k = 0; k < A * A; ++k) src[k] = src_ptrs[k];
#pragma GCC ivdep
  for (int64_t c = 0; c < C; ++c) {
    float d[A * A], t[A * A], r[A * A];
#pragma GCC unroll 36
    for (int k = 0; k < A * A; ++k) d[k] = src[k][c];
#pragma GCC unroll 6
    for (int j = 0; j < A; ++j) Wino<A>::in(d + j, A, t + j, A);  // columns: B^T d
#pragma GCC unroll 6
    for (int i = 0; i < A; ++i) Wino<A>::in(t + i * A, 1, r + i * A, 1);  // rows: (B^T d) B
#pragma GCC unroll 36
    for (int k = 0; k < A * A; ++k) v[k * xs + c] = r[k];
  }
}

// dst[i * m + j][c] = relu?((A^T M A)[i][j] + bias[c]) for the m x m outputs of one tile, from
// M[xi * xs + c]; dst pointers of outputs past the image edge point at scratch.
template <int A, bool kRelu>
void winograd_output_tile(const float* __restrict mtx, int64_t xs, const float* __restrict bias,
                          float* const* dst_ptrs, int64_t C) {
  constexpr int m = Wino<A>::kOut;
  float* dst[m * m];
  for (int k = 0; k < m * m; ++k) dst[k] = dst_ptrs[k];
#pragma GCC ivdep
  for (int64_t c = 0; c < C; ++c) {
    float s[A * A], t[m * A], y[m * m];
#pragma GCC unroll 36
    for (int k = 0; k < A * A; ++k) s[k] = mtx[k * xs + c];
#pragma GCC unroll 6
    for (int j = 0; j < A; ++j) Wino<A>::out(s + j, A, t + j, A);  // A^T M: m x A
#pragma GCC unroll 4
    for (int i = 0; i < m; ++i) Wino<A>::out(t + i * A, 1, y + i * m, 1);  // (A^T M) A
    const float b = bias[c];
#pragma GCC unroll 16
    for (int k = 0; k < m * m; ++k) {
      const float val = y[k] + b;
      dst[k][c] = (kRelu && val <= 0.f) ? 0.f : val;  // NaN passes, as oneDNN's ReLU
    }
  }
}

// Weight transform U = G g G^T of P filters at once, in double: g[k * gs + e] is tap k (row-major
// 3x3; with kFlip, tap 8 - k: the filter rotated by 180 degrees) of filter e, u[xi * us + e] gets
// (G g G^T)[xi] as float. Vectorised across filters (the loop over e, contiguous per tap). G rows:
// F(2x2) (points 0, +-1, inf) and F(4x4) (Lavin & Gray: 0, +-1, +-2, inf).
template <int A>
inline void winograd_g(const double* x, int sx, double* y, int sy);

template <>
inline void winograd_g<4>(const double* x, int sx, double* y, int sy) {
  const double x0 = x[0], x1 = x[sx], x2 = x[2 * sx];
  y[0] = x0;
  y[sy] = .5 * (x0 + x1 + x2);
  y[2 * sy] = .5 * (x0 - x1 + x2);
  y[3 * sy] = x2;
}

template <>
inline void winograd_g<6>(const double* x, int sx, double* y, int sy) {
  const double x0 = x[0], x1 = x[sx], x2 = x[2 * sx];
  const double s = x0 + x2, h = x0 * (1. / 24) + x2 * (1. / 6), q = x1 * (1. / 12);
  y[0] = x0 * .25;
  y[sy] = (s + x1) * (-1. / 6);
  y[2 * sy] = (s - x1) * (-1. / 6);
  y[3 * sy] = h + q;
  y[4 * sy] = h - q;
  y[5 * sy] = x2;
}

template <int A, bool kFlip>
void winograd_weight_chunk(const float* __restrict g, int64_t gs, float* __restrict u,
                           int64_t us, int64_t P) {
#pragma GCC ivdep
  for (int64_t e = 0; e < P; ++e) {
    double d[9], t[A * 3], r[A * A];
#pragma GCC unroll 9
    for (int k = 0; k < 9; ++k) d[k] = double(g[(kFlip ? 8 - k : k) * gs + e]);
#pragma GCC unroll 3
    for (int j = 0; j < 3; ++j) winograd_g<A>(d + j, 3, t + j, 3);  // G g: A x 3
#pragma GCC unroll 6
    for (int i = 0; i < A; ++i) winograd_g<A>(t + i * 3, 1, r + i * A, 1);  // (G g) G^T
#pragma GCC unroll 36
    for (int k = 0; k < A * A; ++k) u[k * us + e] = float(r[k]);
  }
}

// Weight gradient (F(4x4,3x3) only): dL/dU = sum over tiles of (A dy A^T) (x) V, dL/dg = G^T
// (dL/dU) G. winograd_grad_output_tile: v[xi * xs + c] = (A dy A^T)[xi] of the 4x4 output
// gradient pixels src[0..16) (row-major; zeros past the image). A is A^T's transpose (6 x 4).
inline void winograd_a6(const float* x, int sx, float* y, int sy) {
  const float x0 = x[0], x1 = x[sx], x2 = x[2 * sx], x3 = x[3 * sx];
  const float p02 = x0 + x2, p13 = x1 + x3, q02 = x0 + 4.f * x2, q13 = 2.f * x1 + 8.f * x3;
  y[0] = x0;
  y[sy] = p02 + p13;
  y[2 * sy] = p02 - p13;
  y[3 * sy] = q02 + q13;
  y[4 * sy] = q02 - q13;
  y[5 * sy] = x3;
}

inline void winograd_grad_output_tile(const float* const* src_ptrs, float* __restrict v,
                                      int64_t xs, int64_t C) {
  const float* src[16];
  for (int k = 0; k < 16; ++k) src[k] = src_ptrs[k];
#pragma GCC ivdep
  for (int64_t c = 0; c < C; ++c) {
    float d[16], t[24], r[36];
#pragma GCC unroll 16
    for (int k = 0; k < 16; ++k) d[k] = src[k][c];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) winograd_a6(d + j, 4, t + j, 4);  // A dy: 6 x 4
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) winograd_a6(t + i * 4, 1, r + i * 6, 1);  // (A dy) A^T
#pragma GCC unroll 36
    for (int k = 0; k < 36; ++k) v[k * xs + c] = r[k];
  }
}

// dg[k * gs + e] (tap k, row-major 3x3) = (G^T du G) of filter e from du[xi * us + e], in double.
inline void winograd_gt6(const double* x, int sx, double* y, int sy) {
  const double x0 = x[0], x1 = x[sx], x2 = x[2 * sx], x3 = x[3 * sx], x4 = x[4 * sx],
               x5 = x[5 * sx];
  const double p12 = x1 + x2, m12 = x1 - x2, p34 = x3 + x4, m34 = x3 - x4;
  y[0] = x0 * .25 - p12 * (1. / 6) + p34 * (1. / 24);
  y[sy] = -m12 * (1. / 6) + m34 * (1. / 12);
  y[2 * sy] = (p34 - p12) * (1. / 6) + x5;
}

inline void winograd_weight_grad_chunk(const float* __restrict du, int64_t us,
                                       float* __restrict dg, int64_t gs, int64_t P) {
#pragma GCC ivdep
  for (int64_t e = 0; e < P; ++e) {
    double s[36], t[18], r[9];
#pragma GCC unroll 36
    for (int k = 0; k < 36; ++k) s[k] = double(du[k * us + e]);
#pragma GCC unroll 6
    for (int j = 0; j < 6; ++j) winograd_gt6(s + j, 6, t + j, 6);  // G^T du: 3 x 6
#pragma GCC unroll 3
    for (int i = 0; i < 3; ++i) winograd_gt6(t + i * 6, 1, r + i * 3, 1);  // (G^T du) G
#pragma GCC unroll 9
    for (int k = 0; k < 9; ++k) dg[k * gs + e] = float(r[k]);
  }
}
