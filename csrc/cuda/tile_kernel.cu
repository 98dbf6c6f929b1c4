// CUDA kernels of tile_aggregate / tile_aggregate_argmax / tile_extract.
//
// Gather formulation: a thread owns output pixels and sums the windows covering them in the
// reference's order (window row i, then window column j), so results are deterministic and need
// no atomics. Launches are 2-D: threadIdx.x runs along image columns, so a warp reads 32
// consecutive elements of one window row (coalesced) and writes 32 consecutive outputs; the
// column's covering-window range is computed once per thread, the row's once per grid row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/tile_args.h"

namespace fastunet {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

inline int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 32 ? b : 65535 * 32);
}

inline dim3 grid_2d(int64_t width, int64_t rows) {
  return dim3(static_cast<unsigned>((width + kThreads - 1) / kThreads),
              static_cast<unsigned>(rows < kMaxGridY ? rows : kMaxGridY));
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

// One thread per (column x, grid row (n, c, y)).
template <typename scalar_t, typename acc_t>
__global__ void tile_aggregate_forward_kernel_impl(TileGrid g, const scalar_t* __restrict__ tiles,
                                                   const acc_t* __restrict__ weight,
                                                   bool normalize, scalar_t* __restrict__ out) {
  const int64_t x = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (x >= g.width) return;
  int64_t j0, j1;
  g.cover_x(x, &j0, &j1);
  const int64_t rows = g.batch * g.channels * g.height;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t y = row % g.height;
    const int64_t c = (row / g.height) % g.channels;
    const int64_t n = row / (g.height * g.channels);
    int64_t i0, i1;
    g.cover_y(y, &i0, &i1);
    acc_t sum, norm;
    gather(g, tiles, weight, n, c, y, x, i0, i1, j0, j1, &sum, &norm);
    out[row * g.width + x] = static_cast<scalar_t>(finish(sum, norm, normalize));
  }
}

// One thread per (column x, grid row (n, y)), looping over the classes: softmax (two passes,
// online max/sum in the first) or argmax (one pass) of the averaged values.
template <typename scalar_t, typename acc_t, bool kArgmax>
__global__ void tile_aggregate_epilogue_kernel_impl(TileGrid g, const scalar_t* __restrict__ tiles,
                                                    const acc_t* __restrict__ weight,
                                                    bool normalize, scalar_t* __restrict__ probs,
                                                    uint8_t* __restrict__ labels) {
  const int64_t x = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (x >= g.width) return;
  int64_t j0, j1;
  g.cover_x(x, &j0, &j1);
  const int64_t rows = g.batch * g.height;
  const int64_t plane = g.height * g.width;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t y = row % g.height;
    const int64_t n = row / g.height;
    int64_t i0, i1;
    g.cover_y(y, &i0, &i1);
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
    } else {
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

// Shared by the allocating ops and their _into forms: `out` is the checked, contiguous output.
// kind: 0 average (or sum), 1 softmax, 2 argmax.
void aggregate_cuda(const TileGrid& g, const at::Tensor& tiles,
                    const c10::optional<at::Tensor>& weight, bool normalize, int kind,
                    const at::Tensor& out) {
  if (out.numel() == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tiles.scalar_type(),
                                  "tile_aggregate_cuda", [&] {
    using acc_t = tile_acc_t<scalar_t>;
    const acc_t* w = weight ? weight->data_ptr<acc_t>() : nullptr;
    const scalar_t* t = tiles.data_ptr<scalar_t>();
    if (kind == 2) {
      tile_aggregate_epilogue_kernel_impl<scalar_t, acc_t, true>
          <<<grid_2d(g.width, g.batch * g.height), kThreads, 0, stream>>>(
              g, t, w, true, nullptr, out.data_ptr<uint8_t>());
    } else if (kind == 1) {
      tile_aggregate_epilogue_kernel_impl<scalar_t, acc_t, false>
          <<<grid_2d(g.width, g.batch * g.height), kThreads, 0, stream>>>(
              g, t, w, normalize, out.data_ptr<scalar_t>(), nullptr);
    } else {
      tile_aggregate_forward_kernel_impl<scalar_t, acc_t>
          <<<grid_2d(g.width, g.batch * g.channels * g.height), kThreads, 0, stream>>>(
              g, t, w, normalize, out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor tile_aggregate_cuda(const at::Tensor& tiles_in, int64_t batch, int64_t height,
                               int64_t width, int64_t stride_h, int64_t stride_w,
                               const c10::optional<at::Tensor>& weight_in, bool normalize,
                               bool softmax) {
  TORCH_CHECK(tiles_in.is_cuda(), "tile_aggregate (CUDA kernel): tiles must be on a CUDA device");
  const TileGrid g = aggregate_grid(tiles_in, batch, height, width, stride_h, stride_w, weight_in);
  const c10::cuda::CUDAGuard guard(tiles_in.device());
  const at::Tensor tiles = tiles_in.contiguous();
  at::Tensor out = at::empty({batch, g.channels, height, width}, tiles.options());
  aggregate_cuda(g, tiles, prepare_tile_weight(weight_in, tiles.scalar_type()), normalize,
                 softmax ? 1 : 0, out);
  return out;
}

void tile_aggregate_into_cuda(const at::Tensor& tiles_in, int64_t batch, int64_t height,
                              int64_t width, int64_t stride_h, int64_t stride_w,
                              const c10::optional<at::Tensor>& weight_in, bool normalize,
                              bool softmax, const at::Tensor& out) {
  TORCH_CHECK(tiles_in.is_cuda(),
              "tile_aggregate_into (CUDA kernel): tiles must be on a CUDA device");
  const TileGrid g = aggregate_grid(tiles_in, batch, height, width, stride_h, stride_w, weight_in);
  const c10::cuda::CUDAGuard guard(tiles_in.device());
  const at::Tensor tiles = tiles_in.contiguous();
  const auto weight = prepare_tile_weight(weight_in, tiles.scalar_type());
  check_tile_out(out, tiles, weight, {batch, g.channels, height, width}, tiles.scalar_type(),
                 "tile_aggregate_into");
  aggregate_cuda(g, tiles, weight, normalize, softmax ? 1 : 0, out);
}

at::Tensor tile_aggregate_argmax_cuda(const at::Tensor& tiles_in, int64_t batch, int64_t height,
                                      int64_t width, int64_t stride_h, int64_t stride_w,
                                      const c10::optional<at::Tensor>& weight_in) {
  TORCH_CHECK(tiles_in.is_cuda(),
              "tile_aggregate_argmax (CUDA kernel): tiles must be on a CUDA device");
  const TileGrid g = aggregate_grid(tiles_in, batch, height, width, stride_h, stride_w, weight_in);
  check_argmax_channels(g);
  const c10::cuda::CUDAGuard guard(tiles_in.device());
  const at::Tensor tiles = tiles_in.contiguous();
  at::Tensor out = at::empty({batch, height, width}, tiles.options().dtype(at::kByte));
  aggregate_cuda(g, tiles, prepare_tile_weight(weight_in, tiles.scalar_type()), true, 2, out);
  return out;
}

void tile_aggregate_argmax_into_cuda(const at::Tensor& tiles_in, int64_t batch, int64_t height,
                                     int64_t width, int64_t stride_h, int64_t stride_w,
                                     const c10::optional<at::Tensor>& weight_in,
                                     const at::Tensor& out) {
  TORCH_CHECK(tiles_in.is_cuda(),
              "tile_aggregate_argmax_into (CUDA kernel): tiles must be on a CUDA device");
  const TileGrid g = aggregate_grid(tiles_in, batch, height, width, stride_h, stride_w, weight_in);
  check_argmax_channels(g);
  const c10::cuda::CUDAGuard guard(tiles_in.device());
  const at::Tensor tiles = tiles_in.contiguous();
  const auto weight = prepare_tile_weight(weight_in, tiles.scalar_type());
  check_tile_out(out, tiles, weight, {batch, height, width}, at::kByte,
                 "tile_aggregate_argmax_into");
  aggregate_cuda(g, tiles, weight, true, 2, out);
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
  m.impl("tile_aggregate", &fastunet::tile_aggregate_cuda);
  m.impl("tile_aggregate_argmax", &fastunet::tile_aggregate_argmax_cuda);
  m.impl("tile_aggregate_into", &fastunet::tile_aggregate_into_cuda);
  m.impl("tile_aggregate_argmax_into", &fastunet::tile_aggregate_argmax_into_cuda);
  m.impl("tile_extract", &fastunet::tile_extract_cuda);
}
