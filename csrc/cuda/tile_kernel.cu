// CUDA kernels of tile_aggregate / tile_extract: one thread per output element gathers from the
// windows covering it (deterministic, no atomics); the normaliser is recomputed in closed form.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/tile_args.h"

namespace fastunet {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 32 ? b : 65535 * 32);
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
__global__ void tile_aggregate_forward_kernel_impl(TileGrid g, const scalar_t* __restrict__ tiles,
                                                   const acc_t* __restrict__ weight,
                                                   bool normalize, scalar_t* __restrict__ out,
                                                   int64_t total) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t x = idx % g.width;
    const int64_t y = (idx / g.width) % g.height;
    const int64_t c = (idx / (g.width * g.height)) % g.channels;
    const int64_t n = idx / (g.width * g.height * g.channels);
    int64_t i0, i1, j0, j1;
    g.cover_y(y, &i0, &i1);
    g.cover_x(x, &j0, &j1);
    acc_t sum = 0, norm = 0;
    for (int64_t i = i0; i <= i1; ++i) {
      const int64_t ty = y - g.start_y(i);
      for (int64_t j = j0; j <= j1; ++j) {
        const int64_t tx = x - g.start_x(j);
        const int64_t t = (n * g.grid_h + i) * g.grid_w + j;
        const acc_t w = weight ? weight[ty * g.tile_w + tx] : acc_t(1);
        sum += w * acc_t(tiles[((t * g.channels + c) * g.tile_h + ty) * g.tile_w + tx]);
        norm += w;
      }
    }
    out[idx] = normalize ? scalar_t(norm > acc_t(0) ? sum / norm : acc_t(0)) : scalar_t(sum);
  }
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

at::Tensor tile_aggregate_cuda(const at::Tensor& tiles_in, int64_t batch, int64_t height,
                               int64_t width, int64_t stride_h, int64_t stride_w,
                               const c10::optional<at::Tensor>& weight_in, bool normalize) {
  TORCH_CHECK(tiles_in.is_cuda(), "tile_aggregate (CUDA kernel): tiles must be on a CUDA device");
  const TileGrid g = aggregate_grid(tiles_in, batch, height, width, stride_h, stride_w, weight_in);
  const c10::cuda::CUDAGuard guard(tiles_in.device());
  const at::Tensor tiles = tiles_in.contiguous();
  const auto weight = prepare_tile_weight(weight_in, tiles.scalar_type());
  at::Tensor out = at::empty({batch, g.channels, height, width}, tiles.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tiles.scalar_type(),
                                  "tile_aggregate_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    tile_aggregate_forward_kernel_impl<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        g, tiles.data_ptr<scalar_t>(), weight ? weight->data_ptr<acc_t>() : nullptr, normalize,
        out.data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
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
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
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
  m.impl("tile_extract", &fastunet::tile_extract_cuda);
}
