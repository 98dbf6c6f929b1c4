// CPU kernels of tile_aggregate_into (which tile_aggregate and tile_aggregate_argmax run on a
// fresh output, csrc/composite_ops.cpp) and tile_extract.
//
// Aggregation is a gather: a task owns a block of output rows of one image, sums into a small
// row buffer (L2-resident) the windows covering it, in the reference's order (window row i,
// then window column j), then writes the block once, dividing by the closed-form coverage and
// applying the epilogue. Every pixel is summed by one thread in a fixed order: deterministic,
// no atomics, and each window element is read exactly once, in contiguous runs of
// (rows in block) x tile_w elements, so the op streams at memory bandwidth.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/tile_args.h"

namespace fastunet {
namespace {

// A fresh multi-megabyte output is a new mapping: touching it 4 KiB page by page costs more
// than the whole gather. Asking for transparent huge pages before the first touch (what torch's
// allocator does under THP_MEM_ALLOC_ENABLE=1) makes that a few dozen faults. Advisory only;
// for a reused output, already touched, it costs one system call.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.nbytes();
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

struct Span {
  int64_t first, last;  // covering windows [first, last]; last < first when none
};

// Output rows per task: large enough that each window is read in runs of several rows (good
// for the prefetchers), small enough that the row buffer stays in L2.
int64_t rows_per_task(const TileGrid& g, int64_t acc_bytes) {
  const int64_t row_bytes = std::max<int64_t>(1, g.channels * g.width * acc_bytes);
  return std::clamp<int64_t>((512 << 10) / row_bytes, 1, 32);
}

template <typename scalar_t>
inline void prefetch_run(const scalar_t* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const char* end = reinterpret_cast<const char*>(p + n);
  for (; c < end; c += 64) __builtin_prefetch(c, 0, 0);
}

// The inner loops, written so that they auto-vectorize. For float (the common case) they are
// also compiled for AVX2 and picked at load time (GCC/Clang function multiversioning); AVX2
// without FMA, so results are bitwise those of the baseline build.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define FASTUNET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTUNET_CLONES
#endif

template <typename scalar_t, typename acc_t>
inline void add_run(acc_t* __restrict__ dst, const scalar_t* __restrict__ src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] += static_cast<acc_t>(src[k]);
}

FASTUNET_CLONES void add_run(float* __restrict__ dst, const float* __restrict__ src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
}

template <typename scalar_t, typename acc_t>
inline void add_run_weighted(acc_t* __restrict__ dst, const scalar_t* __restrict__ src,
                             const acc_t* __restrict__ w, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] += static_cast<acc_t>(src[k]) * w[k];
}

FASTUNET_CLONES void add_run_weighted(float* __restrict__ dst, const float* __restrict__ src,
                                      const float* __restrict__ w, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] += src[k] * w[k];
}

template <typename acc_t>
inline void add_weights(acc_t* __restrict__ dst, const acc_t* __restrict__ w, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] += w[k];
}

// a[x] /= norm[x] where covered, 0 elsewhere, like the reference's torch.where(norm > 0,
// a / norm, 0): an uncovered pixel has a == 0 and 0 / inf == 0. Written without a branch or a
// guarded division so that it vectorizes.
template <typename acc_t>
inline void divide_run(acc_t* __restrict__ a, const acc_t* __restrict__ norm, int64_t n) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  for (int64_t k = 0; k < n; ++k) a[k] = a[k] / (norm[k] > acc_t(0) ? norm[k] : kInf);
}

template <typename acc_t, typename out_t>
inline void store_divided(out_t* __restrict__ dst, const acc_t* __restrict__ a,
                          const acc_t* __restrict__ norm, int64_t n) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  for (int64_t k = 0; k < n; ++k)
    dst[k] = static_cast<out_t>(a[k] / (norm[k] > acc_t(0) ? norm[k] : kInf));
}

FASTUNET_CLONES void store_divided(float* __restrict__ dst, const float* __restrict__ a,
                                   const float* __restrict__ norm, int64_t n) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < n; ++k) dst[k] = a[k] / (norm[k] > 0.0f ? norm[k] : kInf);
}

#if defined(__SSE2__)
#define FASTUNET_STREAM_STORES 1
// store_divided with non-temporal stores: an output much larger than the caches is written
// without first reading every line into them (write-allocate), a third less memory traffic.
void store_divided_stream(float* __restrict__ dst, const float* __restrict__ a,
                          const float* __restrict__ norm, int64_t n) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  int64_t k = 0;
  for (; k < n && (reinterpret_cast<uintptr_t>(dst + k) & 15) != 0; ++k)
    dst[k] = a[k] / (norm[k] > 0.0f ? norm[k] : kInf);
  const __m128 inf = _mm_set1_ps(kInf), zero = _mm_setzero_ps();
  for (; k + 4 <= n; k += 4) {
    const __m128 nv = _mm_loadu_ps(norm + k);
    const __m128 covered = _mm_cmpgt_ps(nv, zero);
    const __m128 d = _mm_or_ps(_mm_and_ps(covered, nv), _mm_andnot_ps(covered, inf));
    _mm_stream_ps(dst + k, _mm_div_ps(_mm_loadu_ps(a + k), d));
  }
  for (; k < n; ++k) dst[k] = a[k] / (norm[k] > 0.0f ? norm[k] : kInf);
}
#endif

template <typename acc_t, typename out_t>
inline void store_run(out_t* __restrict__ dst, const acc_t* __restrict__ src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<out_t>(src[k]);
}

// Running argmax over classes: torch.argmax semantics (first maximum wins, NaN counts as the
// largest). Bitwise | and & (no short-circuit) and a float label keep the loop vectorizable.
template <typename acc_t>
inline void argmax_step(const acc_t* __restrict__ v, acc_t* __restrict__ best,
                        acc_t* __restrict__ label, acc_t c, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const bool take = (v[k] > best[k]) | ((v[k] != v[k]) & (best[k] == best[k]));
    best[k] = take ? v[k] : best[k];
    label[k] = take ? c : label[k];
  }
}

template <typename scalar_t, TileEpilogue E>
void aggregate_impl(const TileGrid& g, const scalar_t* tiles, const at::Tensor& weight_t,
                    bool normalize, void* out_ptr) {
  using acc_t = tile_acc_t<scalar_t>;
  const acc_t* weight = weight_t.defined() ? weight_t.data_ptr<acc_t>() : nullptr;
  const int64_t H = g.height, W = g.width, C = g.channels, th = g.tile_h, tw = g.tile_w;

  std::vector<Span> rows(H);
  for (int64_t y = 0; y < H; ++y) g.cover_y(y, &rows[y].first, &rows[y].last);
  // Uniform weights: coverage = (windows over the row) x (windows over the column).
  std::vector<acc_t> col_count(W);
  for (int64_t x = 0; x < W; ++x) {
    int64_t a, b;
    g.cover_x(x, &a, &b);
    col_count[x] = acc_t(b >= a ? b - a + 1 : 0);
  }
  std::vector<int64_t> starts_x(g.grid_w);
  for (int64_t j = 0; j < g.grid_w; ++j) starts_x[j] = g.start_x(j);

  const int64_t R = rows_per_task(g, sizeof(acc_t));
  const int64_t blocks = (H + R - 1) / R;
  const bool weight_sums = weight != nullptr && normalize;

  // Stream (non-temporal stores) only outputs far larger than the last-level cache: a smaller
  // one is better left in cache for whoever reads it next.
  const bool stream = g.batch * C * H * W * int64_t(sizeof(scalar_t)) > (24 << 20);
  at::parallel_for(0, g.batch * blocks, 1, [&](int64_t task0, int64_t task1) {
    std::vector<acc_t> acc(C * R * W);
    std::vector<acc_t> wsum(weight_sums ? R * W : 0);
    std::vector<acc_t> norm(W), best(E == TileEpilogue::kNone ? 0 : W);
    std::vector<acc_t> label(E == TileEpilogue::kArgmax ? W : 0);
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t n = task / blocks;
      const int64_t y0 = (task % blocks) * R;
      const int64_t y1 = std::min(y0 + R, H);
      const int64_t nrows = y1 - y0;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(wsum.begin(), wsum.end(), acc_t(0));
      // Covering ranges are non-decreasing in y, so the block's windows are one index range.
      for (int64_t i = rows[y0].first; i <= rows[y1 - 1].last; ++i) {
        const int64_t sy = g.start_y(i);
        const int64_t ya = std::max(y0, sy), yb = std::min(y1, sy + th);
        if (ya >= yb) continue;
        for (int64_t j = 0; j < g.grid_w; ++j) {
          const int64_t t = (n * g.grid_h + i) * g.grid_w + j;
          const int64_t sx = starts_x[j];
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* src = tiles + ((t * C + c) * th + (ya - sy)) * tw;
            acc_t* dst = acc.data() + (c * R + (ya - y0)) * W + sx;
            // The next (window, channel) plane's rows, fetched while this one is summed: the
            // hardware prefetchers stop at each 4 KiB page, and these runs are only a few pages.
            const scalar_t* next = (c + 1 < C || j + 1 < g.grid_w) ? src + th * tw : nullptr;
            for (int64_t y = ya; y < yb; ++y, src += tw, dst += W) {
              if (next) prefetch_run(next + (y - ya) * tw, tw);
              if (weight) {
                add_run_weighted(dst, src, weight + (y - sy) * tw, tw);
              } else {
                add_run(dst, src, tw);
              }
            }
          }
          if (weight_sums) {
            for (int64_t y = ya; y < yb; ++y)
              add_weights(wsum.data() + (y - y0) * W + sx, weight + (y - sy) * tw, tw);
          }
        }
      }
      for (int64_t r = 0; r < nrows; ++r) {
        const int64_t y = y0 + r;
        if (normalize || E == TileEpilogue::kArgmax) {
          if (weight_sums) {
            std::copy(wsum.begin() + r * W, wsum.begin() + (r + 1) * W, norm.begin());
          } else {
            const acc_t rc = acc_t(rows[y].last >= rows[y].first
                                       ? rows[y].last - rows[y].first + 1 : 0);
            for (int64_t x = 0; x < W; ++x) norm[x] = rc * col_count[x];
          }
        }
        if constexpr (E == TileEpilogue::kNone) {
          scalar_t* out = static_cast<scalar_t*>(out_ptr);
          for (int64_t c = 0; c < C; ++c) {
            scalar_t* dst = out + ((n * C + c) * H + y) * W;
            const acc_t* a = acc.data() + (c * R + r) * W;
            if (normalize) {
#ifdef FASTUNET_STREAM_STORES
              if constexpr (std::is_same_v<scalar_t, float>) {
                if (stream) {
                  store_divided_stream(dst, a, norm.data(), W);
                  continue;
                }
              }
#endif
              store_divided(dst, a, norm.data(), W);
            } else {
              store_run(dst, a, W);
            }
          }
          continue;
        }
        if (normalize || E == TileEpilogue::kArgmax) {  // argmax always compares averages
          for (int64_t c = 0; c < C; ++c) divide_run(acc.data() + (c * R + r) * W, norm.data(), W);
        }
        if constexpr (E == TileEpilogue::kSoftmax) {
          scalar_t* out = static_cast<scalar_t*>(out_ptr);
          std::copy(acc.begin() + r * W, acc.begin() + (r + 1) * W, best.begin());  // max
          for (int64_t c = 1; c < C; ++c) {
            const acc_t* a = acc.data() + (c * R + r) * W;
            for (int64_t x = 0; x < W; ++x) best[x] = std::max(best[x], a[x]);
          }
          std::fill(norm.begin(), norm.end(), acc_t(0));  // now the sum of exponentials
          for (int64_t c = 0; c < C; ++c) {
            acc_t* a = acc.data() + (c * R + r) * W;
            for (int64_t x = 0; x < W; ++x) {
              a[x] = std::exp(a[x] - best[x]);
              norm[x] += a[x];
            }
          }
          for (int64_t c = 0; c < C; ++c) {
            acc_t* a = acc.data() + (c * R + r) * W;
            for (int64_t x = 0; x < W; ++x) a[x] /= norm[x];
            store_run(out + ((n * C + c) * H + y) * W, a, W);
          }
        } else {
          uint8_t* out = static_cast<uint8_t*>(out_ptr) + (n * H + y) * W;
          std::copy(acc.begin() + r * W, acc.begin() + (r + 1) * W, best.begin());
          std::fill(label.begin(), label.end(), acc_t(0));
          for (int64_t c = 1; c < C; ++c)
            argmax_step(acc.data() + (c * R + r) * W, best.data(), label.data(), acc_t(c), W);
          for (int64_t x = 0; x < W; ++x) out[x] = static_cast<uint8_t>(static_cast<int>(label[x]));
        }
      }
    }
#ifdef FASTUNET_STREAM_STORES
    if (stream) _mm_sfence();  // make the streamed stores visible before the task ends
#endif
  });
}

// Normaliser per pixel for tile_extract(normalize=True): summed weights of the covering windows.
// The columns' covering windows are found once (a division each), not once per pixel.
template <typename acc_t>
std::vector<acc_t> normaliser(const TileGrid& g, const acc_t* weight) {
  std::vector<acc_t> norm(g.height * g.width);
  std::vector<Span> cols(g.width);
  for (int64_t x = 0; x < g.width; ++x) g.cover_x(x, &cols[x].first, &cols[x].last);
  at::parallel_for(0, g.height, 16, [&](int64_t y0, int64_t y1) {
    for (int64_t y = y0; y < y1; ++y) {
      int64_t i0, i1;
      g.cover_y(y, &i0, &i1);
      for (int64_t x = 0; x < g.width; ++x) {
        const int64_t j0 = cols[x].first, j1 = cols[x].last;
        acc_t s = 0;
        if (i1 >= i0 && j1 >= j0) {
          if (weight == nullptr) {
            s = acc_t((i1 - i0 + 1) * (j1 - j0 + 1));
          } else {
            for (int64_t i = i0; i <= i1; ++i) {
              const acc_t* wrow = weight + (y - g.start_y(i)) * g.tile_w;
              for (int64_t j = j0; j <= j1; ++j) s += wrow[x - g.start_x(j)];
            }
          }
        }
        norm[y * g.width + x] = s;
      }
    }
  });
  return norm;
}

template <typename scalar_t>
void extract_impl(const TileGrid& g, const scalar_t* image, const at::Tensor& weight_t,
                  bool normalize, scalar_t* tiles) {
  using acc_t = tile_acc_t<scalar_t>;
  const acc_t* weight = weight_t.defined() ? weight_t.data_ptr<acc_t>() : nullptr;
  std::vector<acc_t> norm;
  if (normalize) norm = normaliser<acc_t>(g, weight);
  const int64_t num_rows = g.num_tiles() * g.channels * g.tile_h;
  at::parallel_for(0, num_rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ty = r % g.tile_h;
      const int64_t c = (r / g.tile_h) % g.channels;
      const int64_t t = r / (g.tile_h * g.channels);
      const int64_t j = t % g.grid_w;
      const int64_t i = (t / g.grid_w) % g.grid_h;
      const int64_t n = t / (g.grid_w * g.grid_h);
      const int64_t y = g.start_y(i) + ty;
      const int64_t x0 = g.start_x(j);
      const scalar_t* src = image + ((n * g.channels + c) * g.height + y) * g.width + x0;
      scalar_t* dst = tiles + r * g.tile_w;
      if (!normalize && weight == nullptr) {
        std::copy(src, src + g.tile_w, dst);
        continue;
      }
      const acc_t* nrow = normalize ? norm.data() + y * g.width + x0 : nullptr;
      const acc_t* wrow = weight ? weight + ty * g.tile_w : nullptr;
      for (int64_t tx = 0; tx < g.tile_w; ++tx) {
        acc_t v = acc_t(src[tx]);
        if (wrow) v *= wrow[tx];
        if (nrow) v = nrow[tx] > acc_t(0) ? v / nrow[tx] : acc_t(0);
        dst[tx] = scalar_t(v);
      }
    }
  });
}

// tile_aggregate_into: the one aggregation kernel (the allocating ops run it on a fresh output).
void tile_aggregate_into_cpu(const at::Tensor& tiles, int64_t batch, int64_t height,
                             int64_t width, int64_t stride_h, int64_t stride_w,
                             const c10::optional<at::Tensor>& weight, bool normalize,
                             c10::string_view epilogue, const at::Tensor& out) {
  TORCH_CHECK(tiles.device().is_cpu(), "tile_aggregate (CPU kernel): tiles must be on CPU");
  const AggregateArgs a = aggregate_args(tiles, batch, height, width, stride_h, stride_w, weight,
                                         normalize, epilogue, out);
  if (out.numel() == 0) return;
  advise_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.tiles.scalar_type(),
                                  "tile_aggregate_cpu", [&] {
    const at::Tensor w = a.weight.value_or(at::Tensor());
    const scalar_t* t = a.tiles.data_ptr<scalar_t>();
    switch (a.epilogue) {
      case TileEpilogue::kSoftmax:
        aggregate_impl<scalar_t, TileEpilogue::kSoftmax>(a.g, t, w, a.normalize, out.data_ptr());
        break;
      case TileEpilogue::kArgmax:
        aggregate_impl<scalar_t, TileEpilogue::kArgmax>(a.g, t, w, a.normalize, out.data_ptr());
        break;
      case TileEpilogue::kNone:
        aggregate_impl<scalar_t, TileEpilogue::kNone>(a.g, t, w, a.normalize, out.data_ptr());
        break;
    }
  });
}

at::Tensor tile_extract_cpu(const at::Tensor& image_in, int64_t tile_h, int64_t tile_w,
                            int64_t stride_h, int64_t stride_w,
                            const c10::optional<at::Tensor>& weight_in, bool normalize) {
  TORCH_CHECK(image_in.device().is_cpu(), "tile_extract (CPU kernel): image must be on CPU");
  const TileGrid g = extract_grid(image_in, tile_h, tile_w, stride_h, stride_w, weight_in);
  const at::Tensor image = image_in.contiguous();
  const auto weight = prepare_tile_weight(weight_in, image.scalar_type());
  at::Tensor tiles = at::empty({g.num_tiles(), g.channels, tile_h, tile_w}, image.options());
  if (tiles.numel() == 0) return tiles;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(),
                                  "tile_extract_cpu", [&] {
    extract_impl<scalar_t>(g, image.data_ptr<scalar_t>(), weight.value_or(at::Tensor()),
                           normalize, tiles.data_ptr<scalar_t>());
  });
  return tiles;
}

}  // namespace
}  // namespace fastunet

TORCH_LIBRARY_IMPL(fastunet, CPU, m) {
  m.impl("tile_aggregate_into", &fastunet::tile_aggregate_into_cpu);
  m.impl("tile_extract", &fastunet::tile_extract_cpu);
}
