// CUDA kernels of tile_aggregate_into (which tile_aggregate and tile_aggregate_argmax run on a
// fresh output, csrc/composite_ops.cpp) and tile_extract.
//
// Aggregation is a gather: a thread owns output pixels and sums the windows covering them in the
// reference's order (window row i, then window column j), so results are deterministic and need
// no atomics. A block covers kBlockX columns x kBandRows rows of one image plane (the grid's z
// says which): warps run along image columns, so a warp reads 32 consecutive elements of one
// window row (coalesced) and writes 32 consecutive outputs. No division runs per pixel: the
// covering-window range of each of the block's rows is found once per block (into shared
// memory), a column's once per thread, and the image, channel and row come from the grid.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/tile_args.h"

namespace fastunet {
namespace {

constexpr int kThreads = 256;  // 1-D blocks of tile_extract
constexpr int kBlockX = 64;    // aggregation blocks: columns (two warps per row) ...
constexpr int kBlockY = 4;     // ... x thread rows,
constexpr int kRowsPerThread = 4;                      // each thread kRowsPerThread rows apart
constexpr int kBandRows = kBlockY * kRowsPerThread;    // by kBlockY: the block's band of rows
constexpr int64_t kMaxGridYZ = 65535;

inline int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 32 ? b : 65535 * 32);
}

// The covering-window ranges [first[r], last[r]] of rows y0 + r of the block's band.
__device__ __forceinline__ void band_covers(const TileGrid& g, int64_t y0, int64_t* first,
                                            int64_t* last) {
  const int r = threadIdx.y * blockDim.x + threadIdx.x;
  if (r < kBandRows && y0 + r < g.height) g.cover_y(y0 + r, first + r, last + r);
  __syncthreads();
}

// Weighted sum of the windows covering (y, x) in channel c of image n, and the summed weights.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void gather(const TileGrid& g, const scalar_t* __restrict__ tiles,
                                       const acc_t* __restrict__ weight, int64_t n, int64_t c,
                                       int64_t y, int64_t x, int64_t i0, int64_t i1, int64_t j0,
                                       int64_t j1, acc_t* sum_out, acc_t* norm_out) {
  acc_t sum = 0, norm = 0;
  for (int64_t i = i0; i <= i1; ++i) {
    const int64_t ty = y - g.start_y(i);
    for (int64_t j = j0; j <= j1; ++j) {
      const int64_t tx = x - g.start_x(j);
      const int64_t t = (n * g.grid_h + i) * g.grid_w + j;
      const acc_t v = static_cast<acc_t>(tiles[((t * g.channels + c) * g.tile_h + ty) * g.tile_w + tx]);
      if (weight) {
        const acc_t w = weight[ty * g.tile_w + tx];
        sum += v * w;
        norm += w;
      } else {
        sum += v;
      }
    }
  }
  if (!weight) norm = (i1 >= i0 && j1 >= j0) ? acc_t((i1 - i0 + 1) * (j1 - j0 + 1)) : acc_t(0);
  *sum_out = sum;
  *norm_out = norm;
}

template <typename acc_t>
__device__ __forceinline__ acc_t finish(acc_t sum, acc_t norm, bool normalize) {
  if (!normalize) return sum;
  return norm > acc_t(0) ? sum / norm : acc_t(0);
}

// Average (or sum): the grid's z runs over the (image, channel) planes.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockX * kBlockY)
    tile_aggregate_kernel(TileGrid g, const scalar_t* __restrict__ tiles,
                          const acc_t* __restrict__ weight, bool normalize,
                          scalar_t* __restrict__ out) {
  __shared__ int64_t first[kBandRows], last[kBandRows];
  const int64_t y0 = int64_t(blockIdx.y) * kBandRows;
  band_covers(g, y0, first, last);
  const int64_t x = int64_t(blockIdx.x) * kBlockX + threadIdx.x;
  if (x >= g.width) return;
  int64_t j0, j1;
  g.cover_x(x, &j0, &j1);
  const int64_t planes = g.batch * g.channels;
  for (int64_t p = blockIdx.z; p < planes; p += gridDim.z) {
    const int64_t n = p / g.channels, c = p - n * g.channels;
    for (int r = threadIdx.y; r < kBandRows && y0 + r < g.height; r += kBlockY) {
      acc_t sum, norm;
      gather(g, tiles, weight, n, c, y0 + r, x, first[r], last[r], j0, j1, &sum, &norm);
      out[(p * g.height + y0 + r) * g.width + x] =
          static_cast<scalar_t>(finish(sum, norm, normalize));
    }
  }
}

// Softmax (two passes over the classes, online max/sum in the first) or argmax (one pass) of
// the averaged values: the grid's z runs over the images, each thread over the classes.
template <typename scalar_t, typename acc_t, bool kArgmax>
__global__ void __launch_bounds__(kBlockX * kBlockY)
    tile_aggregate_epilogue_kernel(TileGrid g, const scalar_t* __restrict__ tiles,
                                   const acc_t* __restrict__ weight, bool normalize,
                                   scalar_t* __restrict__ probs, uint8_t* __restrict__ labels) {
  __shared__ int64_t first[kBandRows], last[kBandRows];
  const int64_t y0 = int64_t(blockIdx.y) * kBandRows;
  band_covers(g, y0, first, last);
  const int64_t x = int64_t(blockIdx.x) * kBlockX + threadIdx.x;
  if (x >= g.width) return;
  int64_t j0, j1;
  g.cover_x(x, &j0, &j1);
  const int64_t plane = g.height * g.width;
  for (int64_t n = blockIdx.z; n < g.batch; n += gridDim.z) {
    for (int r = threadIdx.y; r < kBandRows && y0 + r < g.height; r += kBlockY) {
      const int64_t y = y0 + r, i0 = first[r], i1 = last[r];
      acc_t sum, norm;
      gather(g, tiles, weight, n, 0, y, x, i0, i1, j0, j1, &sum, &norm);
      acc_t best = finish(sum, norm, normalize);
      if (kArgmax) {
        int label = 0;
        for (int64_t c = 1; c < g.channels; ++c) {
          gather(g, tiles, weight, n, c, y, x, i0, i1, j0, j1, &sum, &norm);
          const acc_t v = finish(sum, norm, normalize);
          if (v > best || (isnan(v) && !isnan(best))) {  // torch.argmax: NaN is the largest
            best = v;
            label = static_cast<int>(c);
          }
        }
        labels[n * plane + y * g.width + x] = static_cast<uint8_t>(label);
        continue;
      }
      acc_t total = 1;  // sum of exp(v - best) over the classes seen so far
      for (int64_t c = 1; c < g.channels; ++c) {
        gather(g, tiles, weight, n, c, y, x, i0, i1, j0, j1, &sum, &norm);
        const acc_t v = finish(sum, norm, normalize);
        if (v > best) {
          total = total * exp(best - v) + acc_t(1);
          best = v;
        } else {
          total += exp(v - best);
        }
      }
      scalar_t* dst = probs + n * g.channels * plane + y * g.width + x;
      for (int64_t c = 0; c < g.channels; ++c) {
        gather(g, tiles, weight, n, c, y, x, i0, i1, j0, j1, &sum, &norm);
        dst[c * plane] = static_cast<scalar_t>(exp(finish(sum, norm, normalize) - best) / total);
      }
    }
  }
}

// Summed weights of the windows covering (y, x); the window count when unweighted.
template <typename acc_t>
__device__ __forceinline__ acc_t pixel_norm(const TileGrid& g, const acc_t* weight, int64_t y,
                                            int64_t x) {
  int64_t i0, i1, j0, j1;
  g.cover_y(y, &i0, &i1);
  g.cover_x(x, &j0, &j1);
  if (i1 < i0 || j1 < j0) return acc_t(0);
  if (weight == nullptr) return acc_t((i1 - i0 + 1) * (j1 - j0 + 1));
  acc_t s = 0;
  for (int64_t i = i0; i <= i1; ++i)
    for (int64_t j = j0; j <= j1; ++j)
      s += weight[(y - g.start_y(i)) * g.tile_w + (x - g.start_x(j))];
  return s;
}

template <typename scalar_t, typename acc_t>
__global__ void tile_extract_forward_kernel_impl(TileGrid g, const scalar_t* __restrict__ image,
                                                 const acc_t* __restrict__ weight, bool normalize,
                                                 scalar_t* __restrict__ tiles, int64_t total) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t tx = idx % g.tile_w;
    const int64_t ty = (idx / g.tile_w) % g.tile_h;
    const int64_t c = (idx / (g.tile_w * g.tile_h)) % g.channels;
    const int64_t t = idx / (g.tile_w * g.tile_h * g.channels);
    const int64_t j = t % g.grid_w;
    const int64_t i = (t / g.grid_w) % g.grid_h;
    const int64_t n = t / (g.grid_w * g.grid_h);
    const int64_t y = g.start_y(i) + ty;
    const int64_t x = g.start_x(j) + tx;
    acc_t v = acc_t(image[((n * g.channels + c) * g.height + y) * g.width + x]);
    if (weight) v *= weight[ty * g.tile_w + tx];
    if (normalize) {
      const acc_t norm = pixel_norm<acc_t>(g, weight, y, x);
      v = norm > acc_t(0) ? v / norm : acc_t(0);
    }
    tiles[idx] = scalar_t(v);
  }
}

// tile_aggregate_into: the one aggregation kernel (the allocating ops run it on a fresh output).
void tile_aggregate_into_cuda(const at::Tensor& tiles, int64_t batch, int64_t height,
                              int64_t width, int64_t stride_h, int64_t stride_w,
                              const c10::optional<at::Tensor>& weight, bool normalize,
                              c10::string_view epilogue, const at::Tensor& out) {
  TORCH_CHECK(tiles.is_cuda(), "tile_aggregate (CUDA kernel): tiles must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(tiles.device());
  const AggregateArgs a = aggregate_args(tiles, batch, height, width, stride_h, stride_w, weight,
                                         normalize, epilogue, out);
  if (out.numel() == 0) return;
  const TileGrid& g = a.g;
  const int64_t bands = (g.height + kBandRows - 1) / kBandRows;
  TORCH_CHECK(bands <= kMaxGridYZ, "tile_aggregate (CUDA kernel): images taller than ",
              kMaxGridYZ * kBandRows, " rows are not supported, got ", g.height);
  const int64_t planes = a.epilogue == TileEpilogue::kNone ? g.batch * g.channels : g.batch;
  const dim3 grid(static_cast<unsigned int>((g.width + kBlockX - 1) / kBlockX),
                  static_cast<unsigned int>(bands),
                  static_cast<unsigned int>(std::min(planes, kMaxGridYZ)));
  const dim3 block(kBlockX, kBlockY);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.tiles.scalar_type(),
                                  "tile_aggregate_cuda", [&] {
    using acc_t = tile_acc_t<scalar_t>;
    const acc_t* w = a.weight ? a.weight->data_ptr<acc_t>() : nullptr;
    const scalar_t* t = a.tiles.data_ptr<scalar_t>();
    switch (a.epilogue) {
      case TileEpilogue::kNone:
        tile_aggregate_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
            g, t, w, a.normalize, out.data_ptr<scalar_t>());
        break;
      case TileEpilogue::kSoftmax:
        tile_aggregate_epilogue_kernel<scalar_t, acc_t, false><<<grid, block, 0, stream>>>(
            g, t, w, a.normalize, out.data_ptr<scalar_t>(), nullptr);
        break;
      case TileEpilogue::kArgmax:
        tile_aggregate_epilogue_kernel<scalar_t, acc_t, true><<<grid, block, 0, stream>>>(
            g, t, w, a.normalize, nullptr, out.data_ptr<uint8_t>());
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor tile_extract_cuda(const at::Tensor& image_in, int64_t tile_h, int64_t tile_w,
                             int64_t stride_h, int64_t stride_w,
                             const c10::optional<at::Tensor>& weight_in, bool normalize) {
  TORCH_CHECK(image_in.is_cuda(), "tile_extract (CUDA kernel): image must be on a CUDA device");
  const TileGrid g = extract_grid(image_in, tile_h, tile_w, stride_h, stride_w, weight_in);
  const c10::cuda::CUDAGuard guard(image_in.device());
  const at::Tensor image = image_in.contiguous();
  const auto weight = prepare_tile_weight(weight_in, image.scalar_type());
  at::Tensor tiles = at::empty({g.num_tiles(), g.channels, tile_h, tile_w}, image.options());
  const int64_t total = tiles.numel();
  if (total == 0) return tiles;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(),
                                  "tile_extract_cuda", [&] {
    using acc_t = tile_acc_t<scalar_t>;
    tile_extract_forward_kernel_impl<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        g, image.data_ptr<scalar_t>(), weight ? weight->data_ptr<acc_t>() : nullptr, normalize,
        tiles.data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return tiles;
}

}  // namespace
}  // namespace fastunet

TORCH_LIBRARY_IMPL(fastunet, CUDA, m) {
  m.impl("tile_aggregate_into", &fastunet::tile_aggregate_into_cuda);
  m.impl("tile_extract", &fastunet::tile_extract_cuda);
}
