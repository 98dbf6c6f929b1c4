// Winograd F(2x2,3x3) / F(4x4,3x3) convolution for CPU inference (see winograd.h).
//
// Why: oneDNN's direct 3x3 convolution already runs near the machine's FMA peak, so the only way
// to a faster UNet on the CPU is fewer multiplies: F(2x2,3x3) does 16 per 4 outputs instead of
// 36 (2.25x fewer), F(4x4,3x3) 36 per 16 (4x fewer).
//
// How: the output is cut into tiles of m x m pixels (m = 2 or 4, alpha = m + 2 input pixels a
// side). Work items are blocks of consecutive tiles; per block, on one thread:
//   1. input transform V = B^T d B of each tile into a block buffer laid out [alpha^2][tiles][Cin]
//      (vectorised across channels, contiguous in NHWC);
//   2. alpha^2 matrix products M[xi] = V[xi] (tiles x Cin) @ U[xi] (Cin x Cout) by an AVX-512
//      register-blocked kernel (wino_avx512::block_gemm; on other CPUs at::bmm_out, which is too
//      slow to beat oneDNN, so fastunet/conv_plan.py sends those CPUs to oneDNN);
//   3. output transform A^T M A + bias (+ ReLU) written straight into the NHWC output.
// The buffers of a block are sized to stay in the core's L2 where the channel counts allow.
// The weight transform U = G g G^T is computed in double once per weight tensor and cached
// (keyed by the tensor's identity and version counter). All at::parallel_for loops need the
// extension built with OpenMP (setup.py, CMakeLists.txt); without it they run on one thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "cpu/isa.h"
#include "cpu/winograd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

// The transforms, built for the baseline ISA and, on x86 with GCC/Clang, for AVX2 and AVX-512
// (picked at run time by cpuid, as bn_relu_nhwc_rows.h in conv_bn_relu_kernel.cpp).
namespace fastunet {
namespace wino_base {
#include "cpu/winograd_transforms.h"
}  // namespace wino_base
}  // namespace fastunet
#if defined(__x86_64__) && defined(__GNUC__)
#define FASTUNET_WINO_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace fastunet {
namespace wino_avx2 {
#include "cpu/winograd_transforms.h"
}  // namespace wino_avx2
}  // namespace fastunet
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
namespace fastunet {
namespace wino_avx512 {
#include "cpu/winograd_transforms.h"

// C (M x N) = op(A) @ B, row-major, for the block GEMMs: register tiles of R rows x 64 columns
// (24 accumulators at R = 6), B rows loaded as 4 vectors (masked at the right edge), A values
// broadcast. op(A) is A (M x K) for the forward products, or A^T with A (K x M) for the weight
// gradient's dU[xi] = V[xi]^T M[xi] (K = all tiles of the batch, so C stays in registers over
// the sum). Each 64-column panel of B (K x 64) is reused by all row groups of A from L1/L2;
// oneDNN/MKL calls cost more than these small products (measured: at::bmm on a block ran at
// about half of this kernel's rate).
template <int R, bool kTransA>
inline void gemm_tile(const float* __restrict a, int64_t lda, const float* __restrict b,
                      int64_t ldb, float* __restrict c, int64_t ldc, int64_t K,
                      const __mmask16* mk) {
  __m512 acc[R][4];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    const __m512 b0 = _mm512_maskz_loadu_ps(mk[0], bk);
    const __m512 b1 = _mm512_maskz_loadu_ps(mk[1], bk + 16);
    const __m512 b2 = _mm512_maskz_loadu_ps(mk[2], bk + 32);
    const __m512 b3 = _mm512_maskz_loadu_ps(mk[3], bk + 48);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(kTransA ? a[k * lda + r] : a[r * lda + k]);
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(av, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(av, b3, acc[r][3]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(c + r * ldc + 16 * j, mk[j], acc[r][j]);
}

// Columns [n0, n0 + 64) of C = op(A) @ B (every row).
template <bool kTransA>
void gemm_panel(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                int64_t M, int64_t N, int64_t K, int64_t n0) {
  constexpr int R = 6;
  __mmask16 mk[4];
  for (int j = 0; j < 4; ++j) {
    const int64_t left = std::min<int64_t>(16, std::max<int64_t>(0, N - n0 - 16 * j));
    mk[j] = __mmask16((1u << left) - 1u);
  }
  const int64_t a_row = kTransA ? 1 : lda;  // step of A between rows of op(A)
  int64_t m0 = 0;
  for (; m0 + R <= M; m0 += R)
    gemm_tile<R, kTransA>(a + m0 * a_row, lda, b + n0, ldb, c + m0 * ldc + n0, ldc, K, mk);
  const float* ar = a + m0 * a_row;
  float* cr = c + m0 * ldc + n0;
  switch (M - m0) {
    case 5: gemm_tile<5, kTransA>(ar, lda, b + n0, ldb, cr, ldc, K, mk); break;
    case 4: gemm_tile<4, kTransA>(ar, lda, b + n0, ldb, cr, ldc, K, mk); break;
    case 3: gemm_tile<3, kTransA>(ar, lda, b + n0, ldb, cr, ldc, K, mk); break;
    case 2: gemm_tile<2, kTransA>(ar, lda, b + n0, ldb, cr, ldc, K, mk); break;
    case 1: gemm_tile<1, kTransA>(ar, lda, b + n0, ldb, cr, ldc, K, mk); break;
    default: break;
  }
}

// C (M x N) = A (M x K) @ B (K x N).
void block_gemm(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                int64_t M, int64_t N, int64_t K) {
  for (int64_t n0 = 0; n0 < N; n0 += 64) gemm_panel<false>(a, lda, b, ldb, c, ldc, M, N, K, n0);
}

// Columns [n0, n0 + 64) of C (M x N) = A^T @ B with A (K x M) and B (K x N).
void gemm_tn_panel(const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                   int64_t ldc, int64_t M, int64_t N, int64_t K, int64_t n0) {
  gemm_panel<true>(a, lda, b, ldb, c, ldc, M, N, K, n0);
}
}  // namespace wino_avx512
}  // namespace fastunet
#pragma GCC pop_options
#endif

namespace fastunet {
namespace {

using Isa = CpuIsa;  // cpu/isa.h: cpuid, capped by FASTUNET_CPU_ISA

// The ISA this build can use: cpu/isa.h's pick where the ISA-specific kernels were compiled.
Isa wino_isa() {
#ifdef FASTUNET_WINO_X86
  return cpu_isa();
#else
  return Isa::kBase;
#endif
}

#ifdef FASTUNET_WINO_X86
#define FASTUNET_WINO(isa, ...)                        \
  ((isa) == Isa::kAvx512 ? wino_avx512::__VA_ARGS__     \
   : (isa) == Isa::kAvx2 ? wino_avx2::__VA_ARGS__       \
                         : wino_base::__VA_ARGS__)
#else
#define FASTUNET_WINO(isa, ...) ((void)(isa), wino_base::__VA_ARGS__)
#endif

// ---------------------------------------------------------------------------------------------
// Weight transform and its cache

// U[xi][ci][co] = (G g[co][ci] G^T)[xi], computed in double: (alpha^2, Cin, Cout) float. With
// transposed_flipped, the transform of the input gradient's filters instead, g'[ci][co] =
// g[co][ci] rotated by 180 degrees: (alpha^2, Cout, Cin), without materialising g' (the rotation
// is a reversed tap order). U is (alpha^2, K, N); per block of kRows rows of K, the taps are
// gathered from the weight (any strides) into 9 planes of (kRows, N) in L2, then transformed
// vectorised across N. One parallel region, none for small weights: in training this runs every
// step, and on a shared 2-core machine each parallel region can wait a scheduler slice.
//
// workspace, when given, holds U (grown as needed, kept by the caller): a fresh allocation past
// malloc's mmap threshold (32 MB: U of 512 x 512 channels is 37 MB) pays its page faults on every
// call, a cost of the order of the transform itself.
at::Tensor transform_weight(const at::Tensor& weight, int64_t tile, bool transposed_flipped,
                            at::Tensor* workspace = nullptr) {
  const Isa isa = wino_isa();  // read once: one kernel build for the whole call
  const at::Tensor w = weight.is_mkldnn() ? weight.to_dense() : weight;
  const int64_t alpha = tile + 2, cout = w.size(0), cin = w.size(1);
  const int64_t K = transposed_flipped ? cout : cin, N = transposed_flipped ? cin : cout;
  const int64_t P = K * N;
  at::Tensor u;
  if (workspace == nullptr) {
    u = at::empty({alpha * alpha, K, N}, w.options().dtype(at::kFloat));
  } else {
    if (!workspace->defined() || workspace->numel() < alpha * alpha * P)
      *workspace = at::empty({alpha * alpha * P}, w.options().dtype(at::kFloat));
    u = workspace->narrow(0, 0, alpha * alpha * P).view({alpha * alpha, K, N});
  }
  if (P == 0) return u;
  const float* wp = w.data_ptr<float>();
  // strides of the weight along K, along N and across the 9 taps (row-major 3x3)
  const int64_t sk = w.stride(transposed_flipped ? 0 : 1), sn = w.stride(transposed_flipped ? 1 : 0);
  int64_t tap_off[9];
  for (int t = 0; t < 9; ++t) tap_off[t] = (t / 3) * w.stride(2) + (t % 3) * w.stride(3);
  float* up = u.data_ptr<float>();
  // rows a block: where the weight is contiguous along K (the forward of a channels_last weight),
  // each n reads runs of kRows values per tap, so longer runs use more of each cache line/page
  const int64_t kRows = sk <= sn ? 64 : 16;
  const int64_t grain = std::max<int64_t>(kRows, (int64_t(1) << 15) / N);  // >= 32K filters a task
  at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
    std::vector<float> planes(size_t(9) * kRows * N);
    for (int64_t kb = k0; kb < k1; kb += kRows) {
      const int64_t rows = std::min(kRows, k1 - kb);
      float* g = planes.data();
      if (sk <= sn) {  // the weight is contiguous along K: a blocked transpose, 16 n at a time
        for (int64_t n0 = 0; n0 < N; n0 += 16) {
          const int64_t n1 = std::min(N, n0 + 16);
          for (int t = 0; t < 9; ++t)
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t n = n0; n < n1; ++n)
                g[(t * kRows + r) * N + n] = wp[(kb + r) * sk + n * sn + tap_off[t]];
        }
      } else {
        for (int64_t r = 0; r < rows; ++r)
          for (int t = 0; t < 9; ++t)
            for (int64_t n = 0; n < N; ++n)
              g[(t * kRows + r) * N + n] = wp[(kb + r) * sk + n * sn + tap_off[t]];
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* ur = up + (kb + r) * N;
        const float* gr = g + r * N;
        if (tile == 2 && transposed_flipped)
          FASTUNET_WINO(isa, winograd_weight_chunk<4, true>(gr, kRows * N, ur, P, N));
        else if (tile == 2)
          FASTUNET_WINO(isa, winograd_weight_chunk<4, false>(gr, kRows * N, ur, P, N));
        else if (transposed_flipped)
          FASTUNET_WINO(isa, winograd_weight_chunk<6, true>(gr, kRows * N, ur, P, N));
        else
          FASTUNET_WINO(isa, winograd_weight_chunk<6, false>(gr, kRows * N, ur, P, N));
      }
    }
  });
  return u;
}

struct CacheEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> weight;
  uint32_t version;
  int64_t tile;
  at::Tensor u;
};

// The weak reference keeps the TensorImpl's memory (not its data) allocated, so a live entry's
// address cannot be taken by a new tensor; dead weights' entries are dropped on every miss.
// Inference tensors have no version counter: their transforms are not cached.
at::Tensor cached_transform(const at::Tensor& weight, int64_t tile) {
  if (weight.is_inference()) return transform_weight(weight, tile, false);
  static std::mutex mutex;
  static std::vector<CacheEntry> cache;
  const uint32_t version = weight._version();
  const c10::TensorImpl* impl = weight.unsafeGetTensorImpl();
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (const auto& e : cache)
      if (e.tile == tile && e.version == version && e.weight._unsafe_get_target() == impl &&
          !e.weight.expired())
        return e.u;
  }
  at::Tensor u = transform_weight(weight, tile, false);
  std::lock_guard<std::mutex> lock(mutex);
  cache.erase(std::remove_if(cache.begin(), cache.end(),
                             [&](const CacheEntry& e) {
                               return e.weight.expired() ||
                                      (e.tile == tile && e.weight._unsafe_get_target() == impl);
                             }),
              cache.end());
  constexpr size_t kMaxEntries = 256;  // a bound, far above one model's layer count
  if (cache.size() >= kMaxEntries) cache.erase(cache.begin());
  cache.push_back({c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                       weight.getIntrusivePtr()),
                   version, tile, u});
  return u;
}

// ---------------------------------------------------------------------------------------------
// Convolution

// Tiles per block: 16 for narrow layers (Cin + Cout <= 256), else 32 (fewer passes over the
// transformed weight, which then no longer fits in L2 anyway); best of 16/32/64/128 measured
// per UNet layer on 2 EPYC Zen4 cores (benchmarks/bench_winograd.py). Smaller when there are
// too few tiles for one block per thread.
int64_t auto_block(int64_t cin, int64_t cout, int64_t tiles) {
  int64_t t = cin + cout <= 256 ? 16 : 32;
  const int64_t threads = at::get_num_threads();
  if (tiles < t * threads) t = std::max<int64_t>(1, (tiles + threads - 1) / threads);
  return t;
}

template <int A>
void run_blocks(const float* x, const at::Tensor& ut, const float* bias, float* y, int64_t N,
                int64_t H, int64_t W, int64_t cin, int64_t cout, bool relu, int64_t block) {
  const Isa isa = wino_isa();  // read once: one kernel build for the whole call
  constexpr int m = A - 2;
  const int64_t th = (H + m - 1) / m, tw = (W + m - 1) / m, tiles = N * th * tw;
  const int64_t blocks = (tiles + block - 1) / block;
  const float* u = ut.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> v(size_t(A * A) * block * cin), mt(size_t(A * A) * block * cout);
    std::vector<float> zeros(cin, 0.f), scratch(cout);
    std::vector<float> zero_bias;
    const float* bptr = bias;
    if (bptr == nullptr) {
      zero_bias.assign(cout, 0.f);
      bptr = zero_bias.data();
    }
    const float* src[A * A];
    float* dst[m * m];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * block, nt = std::min(block, tiles - t0);
      for (int64_t k = 0; k < nt; ++k) {
        const int64_t t = t0 + k, n = t / (th * tw), ty = (t / tw) % th, tx = t % tw;
        for (int i = 0; i < A; ++i) {
          const int64_t r = ty * m - 1 + i;
          for (int j = 0; j < A; ++j) {
            const int64_t c = tx * m - 1 + j;
            src[i * A + j] = (r >= 0 && r < H && c >= 0 && c < W)
                                 ? x + ((n * H + r) * W + c) * cin
                                 : zeros.data();
          }
        }
        FASTUNET_WINO(isa, winograd_input_tile<A>(src, v.data() + k * cin, block * cin, cin));
      }
      // M[xi] (nt x cout) = V[xi] (nt x cin) @ U[xi] (cin x cout)
      if (isa == Isa::kAvx512) {
#ifdef FASTUNET_WINO_X86
        for (int xi = 0; xi < A * A; ++xi)
          wino_avx512::block_gemm(v.data() + xi * block * cin, cin, u + xi * cin * cout, cout,
                                  mt.data() + xi * block * cout, cout, nt, cout, cin);
#endif
      } else {
        const at::Tensor vt = at::from_blob(v.data(), {A * A, nt, cin}, {block * cin, cin, 1},
                                            at::kFloat);
        at::Tensor mtt = at::from_blob(mt.data(), {A * A, nt, cout}, {block * cout, cout, 1},
                                       at::kFloat);
        at::bmm_out(mtt, vt, ut);
      }
      for (int64_t k = 0; k < nt; ++k) {
        const int64_t t = t0 + k, n = t / (th * tw), ty = (t / tw) % th, tx = t % tw;
        for (int i = 0; i < m; ++i) {
          const int64_t r = ty * m + i;
          for (int j = 0; j < m; ++j) {
            const int64_t c = tx * m + j;
            dst[i * m + j] =
                (r < H && c < W) ? y + ((n * H + r) * W + c) * cout : scratch.data();
          }
        }
        if (relu)
          FASTUNET_WINO(isa, winograd_output_tile<A, true>(mt.data() + k * cout, block * cout, bptr,
                                                      dst, cout));
        else
          FASTUNET_WINO(isa, winograd_output_tile<A, false>(mt.data() + k * cout, block * cout, bptr,
                                                       dst, cout));
      }
    }
  });
}

// The convolution of NCHW-shaped input by the transformed weight u (alpha^2, Cin, Cout) into a
// new channels_last tensor.
at::Tensor run_conv(const at::Tensor& input, const at::Tensor& u, const float* bias, bool relu,
                    int64_t tile, int64_t block) {
  const int64_t N = input.size(0), cin = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t cout = u.size(2);
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y =
      at::empty({N, cout, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  const int64_t tiles = N * ((H + tile - 1) / tile) * ((W + tile - 1) / tile);
  if (block == 0) block = auto_block(cin, cout, tiles);
  if (tile == 2)
    run_blocks<4>(x.data_ptr<float>(), u, bias, y.data_ptr<float>(), N, H, W, cin, cout, relu,
                  block);
  else
    run_blocks<6>(x.data_ptr<float>(), u, bias, y.data_ptr<float>(), N, H, W, cin, cout, relu,
                  block);
  return y;
}

}  // namespace

// Weight gradient of conv3x3(x, w, padding 1) from its output gradient gy by F(4x4,3x3): every
// tile's V = B^T d B and M = A gy A^T over the whole batch first (parallel over tiles), then the
// 36 products dU[xi] = V[xi]^T M[xi] with the sum over all tiles in registers (parallel over xi
// and 64-column panels: no partial sums to reduce, so the result does not depend on the thread
// count), then dW = G^T dU G in double. Returned with the strides of `like` (the weight).
at::Tensor winograd_conv3x3_grad_weight(const at::Tensor& input, const at::Tensor& grad,
                                        const at::Tensor& like) {
  const Isa isa = wino_isa();  // read once: one kernel build for the whole call
  TORCH_CHECK(input.device().is_cpu() && input.dim() == 4 && input.scalar_type() == at::kFloat &&
                  grad.dim() == 4 && grad.scalar_type() == at::kFloat &&
                  grad.size(0) == input.size(0) && grad.size(2) == input.size(2) &&
                  grad.size(3) == input.size(3),
              "_winograd_conv3x3_grad_weight: input (N, Cin, H, W) and grad (N, Cout, H, W) must "
              "be float32 CPU tensors of one batch and size, got ", input.sizes(), " and ",
              grad.sizes());
  TORCH_CHECK(like.dim() == 4 && like.size(0) == grad.size(1) && like.size(1) == input.size(1) &&
                  like.size(2) == 3 && like.size(3) == 3,
              "_winograd_conv3x3_grad_weight: weight must be (", grad.size(1), ", ",
              input.size(1), ", 3, 3), got ", like.sizes());
  const int64_t N = input.size(0), cin = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t cout = grad.size(1);
  at::Tensor dw = at::empty_like(like, like.options().dtype(at::kFloat));
  if (dw.numel() == 0) return dw;
  if (input.numel() == 0) return dw.zero_();
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor gy = grad.contiguous(at::MemoryFormat::ChannelsLast);
  constexpr int A = 6, m = 4;
  const int64_t th = (H + m - 1) / m, tw = (W + m - 1) / m, T = N * th * tw;
  thread_local at::Tensor workspace;  // V and M: tens of MB at 64x64, reused across steps
  const int64_t need = A * A * T * (cin + cout) + A * A * cin * cout;
  if (!workspace.defined() || workspace.numel() < need) workspace = at::empty({need}, x.options());
  float* v = workspace.data_ptr<float>();
  float* mt = v + A * A * T * cin;
  float* du = mt + A * A * T * cout;
  const float* xp = x.data_ptr<float>();
  const float* gp = gy.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> zeros(std::max(cin, cout), 0.f);
    const float* src[A * A];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / (th * tw), ty = (t / tw) % th, tx = t % tw;
      for (int i = 0; i < A; ++i)
        for (int j = 0; j < A; ++j) {
          const int64_t r = ty * m - 1 + i, c = tx * m - 1 + j;
          src[i * A + j] = (r >= 0 && r < H && c >= 0 && c < W) ? xp + ((n * H + r) * W + c) * cin
                                                                : zeros.data();
        }
      FASTUNET_WINO(isa, winograd_input_tile<A>(src, v + t * cin, T * cin, cin));
      for (int i = 0; i < m; ++i)
        for (int j = 0; j < m; ++j) {
          const int64_t r = ty * m + i, c = tx * m + j;
          src[i * m + j] = (r < H && c < W) ? gp + ((n * H + r) * W + c) * cout : zeros.data();
        }
      FASTUNET_WINO(isa, winograd_grad_output_tile(src, mt + t * cout, T * cout, cout));
    }
  });
  if (isa == Isa::kAvx512) {
#ifdef FASTUNET_WINO_X86
    const int64_t panels = (cout + 63) / 64;
    at::parallel_for(0, A * A * panels, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t xi = i / panels, n0 = (i % panels) * 64;
        wino_avx512::gemm_tn_panel(v + xi * T * cin, cin, mt + xi * T * cout, cout,
                                   du + xi * cin * cout, cout, cin, cout, T, n0);
      }
    });
#endif
  } else {
    at::Tensor dut = at::from_blob(du, {A * A, cin, cout}, x.options());
    at::bmm_out(dut, at::from_blob(v, {A * A, T, cin}, x.options()).transpose(1, 2),
                at::from_blob(mt, {A * A, T, cout}, x.options()));
  }
  // dW[co][ci] from dU[xi][ci][co]: rows of ci, vectorised across co, then scattered to dw
  const int64_t P = cin * cout;
  float* dwp = dw.data_ptr<float>();
  const int64_t s0 = dw.stride(0), s1 = dw.stride(1), s2 = dw.stride(2), s3 = dw.stride(3);
  at::parallel_for(0, cin, std::max<int64_t>(1, (int64_t(1) << 14) / cout), [&](int64_t c0,
                                                                                 int64_t c1) {
    std::vector<float> taps(size_t(9) * cout);
    for (int64_t ci = c0; ci < c1; ++ci) {
      FASTUNET_WINO(isa, winograd_weight_grad_chunk(du + ci * cout, P, taps.data(), cout, cout));
      for (int k = 0; k < 9; ++k)
        for (int64_t co = 0; co < cout; ++co)
          dwp[co * s0 + ci * s1 + (k / 3) * s2 + (k % 3) * s3] = taps[k * cout + co];
    }
  });
  return dw;
}

bool winograd_has_fast_kernel() { return wino_isa() == Isa::kAvx512; }

at::Tensor winograd_conv3x3(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, bool relu, int64_t tile,
                            int64_t block) {
  TORCH_CHECK(tile == 2 || tile == 4, "winograd_conv3x3: tile must be 2 or 4, got ", tile);
  TORCH_CHECK(input.device().is_cpu() && input.dim() == 4 && input.scalar_type() == at::kFloat,
              "winograd_conv3x3: input must be a 4-D float32 CPU tensor, got ",
              input.scalar_type(), " of shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 &&
                  weight.size(1) == input.size(1) && weight.scalar_type() == at::kFloat,
              "winograd_conv3x3: weight must be float32 (Cout, ", input.size(1),
              ", 3, 3), got ", weight.scalar_type(), " of shape ", weight.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                            bias->scalar_type() == at::kFloat),
              "winograd_conv3x3: bias must be float32 (", weight.size(0), ",)");
  TORCH_CHECK(input.size(1) > 0, "winograd_conv3x3: input has no channels");
  TORCH_CHECK(block >= 0, "winograd_conv3x3: block must be >= 0, got ", block);
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  return run_conv(input, cached_transform(weight, tile), has_bias ? b.data_ptr<float>() : nullptr,
                  relu, tile, block);
}

at::Tensor winograd_conv3x3_train(const at::Tensor& input, const at::Tensor& weight,
                                  bool input_grad, int64_t block) {
  TORCH_CHECK(input.device().is_cpu() && input.dim() == 4 && input.scalar_type() == at::kFloat,
              "_winograd_conv3x3_train: input must be a 4-D float32 CPU tensor, got ",
              input.scalar_type(), " of shape ", input.sizes());
  const int64_t in_dim = input_grad ? 0 : 1;  // the weight's dimension the input's channels are
  TORCH_CHECK(weight.device().is_cpu() && !weight.is_mkldnn() && weight.dim() == 4 &&
                  weight.size(2) == 3 && weight.size(3) == 3 &&
                  weight.size(in_dim) == input.size(1) && weight.scalar_type() == at::kFloat,
              "_winograd_conv3x3_train: weight must be a dense float32 CPU tensor of shape ",
              input_grad ? "(" : "(Cout, ", input.size(1), input_grad ? ", Cin, 3, 3)" : ", 3, 3)",
              ", got ", weight.scalar_type(), " of shape ", weight.sizes());
  TORCH_CHECK(input.size(1) > 0, "_winograd_conv3x3_train: input has no channels");
  TORCH_CHECK(block >= 0, "_winograd_conv3x3_train: block must be >= 0, got ", block);
  thread_local at::Tensor workspace;  // U lives only during the call; one call at a time a thread
  return run_conv(input, transform_weight(weight, 4, input_grad, &workspace), nullptr, false, 4,
                  block);
}

namespace {

at::Tensor winograd_conv3x3_op(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, bool relu, int64_t tile,
                               int64_t block) {
  return winograd_conv3x3(input, weight, bias, relu, tile, block);
}

at::Tensor winograd_conv3x3_grad_weight_op(const at::Tensor& input, const at::Tensor& grad,
                                           const at::Tensor& weight) {
  return winograd_conv3x3_grad_weight(input, grad, weight);
}

at::Tensor winograd_conv3x3_train_op(const at::Tensor& input, const at::Tensor& weight,
                                     bool input_grad, int64_t block) {
  return winograd_conv3x3_train(input, weight, input_grad, block);
}

}  // namespace
}  // namespace fastunet

TORCH_LIBRARY_IMPL(fastunet, CPU, m) {
  m.impl("_winograd_conv3x3", &fastunet::winograd_conv3x3_op);
  m.impl("_winograd_conv3x3_train", &fastunet::winograd_conv3x3_train_op);
  m.impl("_winograd_conv3x3_grad_weight", &fastunet::winograd_conv3x3_grad_weight_op);
}

// oneDNN-packed weights (see conv_bias_relu) put the call under the MkldnnCPU key.
TORCH_LIBRARY_IMPL(fastunet, MkldnnCPU, m) {
  m.impl("_winograd_conv3x3", &fastunet::winograd_conv3x3_op);
}
