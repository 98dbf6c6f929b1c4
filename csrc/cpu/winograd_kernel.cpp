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
//      slow to beat oneDNN, so winograd_tile_for sends those CPUs to oneDNN);
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
#include <cstdlib>
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

// C (M x N) = A (M x K) @ B (K x N), row-major, for the block GEMMs: register tiles of R rows x
// 64 columns (24 accumulators at R = 6), B rows loaded as 4 vectors (masked at the right edge),
// A values broadcast. Each 64-column panel of B (K x 64) is reused by all row groups of A from
// L1/L2; oneDNN/MKL calls cost more than these small products (measured: at::bmm on a block ran
// at about half of this kernel's rate).
template <int R>
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
      const __m512 av = _mm512_set1_ps(a[r * lda + k]);
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

void block_gemm(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                int64_t M, int64_t N, int64_t K) {
  constexpr int R = 6;
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    __mmask16 mk[4];
    for (int j = 0; j < 4; ++j) {
      const int64_t left = std::min<int64_t>(16, std::max<int64_t>(0, N - n0 - 16 * j));
      mk[j] = __mmask16((1u << left) - 1u);
    }
    int64_t m0 = 0;
    for (; m0 + R <= M; m0 += R)
      gemm_tile<R>(a + m0 * lda, lda, b + n0, ldb, c + m0 * ldc + n0, ldc, K, mk);
    const float* ar = a + m0 * lda;
    float* cr = c + m0 * ldc + n0;
    switch (M - m0) {
      case 5: gemm_tile<5>(ar, lda, b + n0, ldb, cr, ldc, K, mk); break;
      case 4: gemm_tile<4>(ar, lda, b + n0, ldb, cr, ldc, K, mk); break;
      case 3: gemm_tile<3>(ar, lda, b + n0, ldb, cr, ldc, K, mk); break;
      case 2: gemm_tile<2>(ar, lda, b + n0, ldb, cr, ldc, K, mk); break;
      case 1: gemm_tile<1>(ar, lda, b + n0, ldb, cr, ldc, K, mk); break;
      default: break;
    }
  }
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
#define FASTUNET_WINO(...)                                  \
  (wino_isa() == Isa::kAvx512 ? wino_avx512::__VA_ARGS__     \
   : wino_isa() == Isa::kAvx2 ? wino_avx2::__VA_ARGS__       \
                             : wino_base::__VA_ARGS__)
#else
#define FASTUNET_WINO(...) wino_base::__VA_ARGS__
#endif

// ---------------------------------------------------------------------------------------------
// Weight transform and its cache

// U[xi][ci][co] = (G g[co][ci] G^T)[xi], computed in double: (alpha^2, Cin, Cout) float.
// One pass over the weight, parallel over input channels, writing float straight into U's
// layout: as ATen ops (batched alpha x 3 matmuls, or one GEMM with kron(G, G) plus layout
// copies) it took 70-290 ms for a 512x512 layer, which training (new weights every step) and
// inference-mode weights (never cached) would pay on every call.
at::Tensor transform_weight(const at::Tensor& weight, int64_t tile) {
  const at::Tensor w =
      (weight.is_mkldnn() ? weight.to_dense() : weight).to(at::kFloat).contiguous();
  static const double g2[4][3] = {{1, 0, 0}, {.5, .5, .5}, {.5, -.5, .5}, {0, 0, 1}};
  static const double g4[6][3] = {{1. / 4, 0, 0},           {-1. / 6, -1. / 6, -1. / 6},
                                  {-1. / 6, 1. / 6, -1. / 6}, {1. / 24, 1. / 12, 1. / 6},
                                  {1. / 24, -1. / 12, 1. / 6}, {0, 0, 1}};
  const int alpha = static_cast<int>(tile) + 2;
  const double(*g)[3] = tile == 2 ? g2 : g4;
  const int64_t cout = w.size(0), cin = w.size(1), plane = cin * cout;
  at::Tensor u = at::empty({alpha * alpha, cin, cout}, w.options());
  const float* wp = w.data_ptr<float>();
  float* up = u.data_ptr<float>();
  // Blocks of 8 input channels: per output channel their 8 kernels are 72 contiguous floats,
  // and the 8 x alpha^2 rows of U being written stay in L1 while co advances.
  constexpr int64_t kCiBlock = 8;
  at::parallel_for(0, (cin + kCiBlock - 1) / kCiBlock, 1, [&](int64_t b0, int64_t b1) {
    double t[6][3];
    for (int64_t co = 0; co < cout; ++co) {
      for (int64_t ci = b0 * kCiBlock; ci < std::min(cin, b1 * kCiBlock); ++ci) {
        const float* k = wp + (co * cin + ci) * 9;
        for (int a = 0; a < alpha; ++a)  // t = G k
          for (int j = 0; j < 3; ++j)
            t[a][j] = g[a][0] * k[j] + g[a][1] * k[3 + j] + g[a][2] * k[6 + j];
        float* dst = up + ci * cout + co;
        for (int a = 0; a < alpha; ++a)  // (G k) G^T
          for (int b = 0; b < alpha; ++b)
            dst[(a * alpha + b) * plane] =
                static_cast<float>(t[a][0] * g[b][0] + t[a][1] * g[b][1] + t[a][2] * g[b][2]);
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
  if (weight.is_inference()) return transform_weight(weight, tile);
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
  at::Tensor u = transform_weight(weight, tile);
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
        FASTUNET_WINO(winograd_input_tile<A>(src, v.data() + k * cin, block * cin, cin));
      }
      // M[xi] (nt x cout) = V[xi] (nt x cin) @ U[xi] (cin x cout)
      if (wino_isa() == Isa::kAvx512) {
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
          FASTUNET_WINO(winograd_output_tile<A, true>(mt.data() + k * cout, block * cout, bptr,
                                                      dst, cout));
        else
          FASTUNET_WINO(winograd_output_tile<A, false>(mt.data() + k * cout, block * cout, bptr,
                                                       dst, cout));
      }
    }
  });
}

bool env_enabled() {
  const char* v = std::getenv("FASTUNET_WINOGRAD");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

}  // namespace

int64_t winograd_tile_for(const at::Tensor& input, const at::Tensor& weight,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups) {
  if (!env_enabled()) return 0;
  // Only with the AVX-512 matrix kernel: the AVX2 and baseline builds multiply through at::bmm
  // per tile block and measured 7.5x and 76x slower than it (64->64 channels, 8 x 64x64, on a
  // Zen4 capped with FASTUNET_CPU_ISA), far behind oneDNN's direct convolution.
  if (wino_isa() != Isa::kAvx512) return 0;
  if (input.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat ||
      input.dim() != 4 || weight.dim() != 4 || weight.size(2) != 3 || weight.size(3) != 3 ||
      groups != 1)
    return 0;
  for (int d = 0; d < 2; ++d)
    if (stride[d] != 1 || padding[d] != 1 || dilation[d] != 1) return 0;
  // NHWC only (the fused CPU model runs channels_last); NCHW inputs stay with oneDNN
  if (input.is_contiguous() || !input.is_contiguous(at::MemoryFormat::ChannelsLast)) return 0;
  // Measured on 2 EPYC Zen4 cores (2 threads) against oneDNN's direct convolution with its
  // weight packed, as the fused model runs it (UNet-S5-D16 layers, 128-1024 channels, batch
  // 1-16): F(4x4,3x3) was 1.4-2.5x faster from 32 of its 4x4 tiles up. Below that F(2x2,3x3)
  // won from 32 of its 2x2 tiles (1.3-2.5x: 8x8 maps at batch 4, 4x4 maps at batch 8-16, 16x16
  // at batch 1), and with fewer both lost (0.2-0.9x: each thread streams the transformed weight,
  // 4x (F4) or 1.8x (F2) the direct one, for a handful of tiles). Few channels (the 3-channel
  // first layer) leave the transforms nothing to amortise over.
  const int64_t cin = input.size(1), cout = weight.size(0);
  if (cin < 32 || cout < 32) return 0;
  const int64_t n = input.size(0), h = input.size(2), w = input.size(3);
  if (n * ((h + 3) / 4) * ((w + 3) / 4) >= 32) return 4;
  if (n * ((h + 1) / 2) * ((w + 1) / 2) >= 32) return 2;
  return 0;
}

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
  const int64_t N = input.size(0), cin = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t cout = weight.size(0);
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y =
      at::empty({N, cout, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  const at::Tensor u = cached_transform(weight, tile);
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t tiles = N * ((H + tile - 1) / tile) * ((W + tile - 1) / tile);
  if (block == 0) block = auto_block(cin, cout, tiles);
  const float* bp = has_bias ? b.data_ptr<float>() : nullptr;
  if (tile == 2)
    run_blocks<4>(x.data_ptr<float>(), u, bp, y.data_ptr<float>(), N, H, W,
                  cin, cout, relu, block);
  else
    run_blocks<6>(x.data_ptr<float>(), u, bp, y.data_ptr<float>(), N, H, W,
                  cin, cout, relu, block);
  return y;
}

namespace {

at::Tensor winograd_conv3x3_op(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, bool relu, int64_t tile,
                               int64_t block) {
  return winograd_conv3x3(input, weight, bias, relu, tile, block);
}

}  // namespace
}  // namespace fastunet

TORCH_LIBRARY_IMPL(fastunet, CPU, m) {
  m.impl("_winograd_conv3x3", &fastunet::winograd_conv3x3_op);
}

// oneDNN-packed weights (see conv_bias_relu) put the call under the MkldnnCPU key.
TORCH_LIBRARY_IMPL(fastunet, MkldnnCPU, m) {
  m.impl("_winograd_conv3x3", &fastunet::winograd_conv3x3_op);
}
