// CPU kernels of tile_aggregate / tile_extract: gather formulation, one output row per task, so
// every pixel is summed in a fixed order by one thread (deterministic, no atomics).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/tile_args.h"

namespace fastunet {
namespace {

struct Span {
  int64_t first, last;
};

// Covering-window ranges for every row and column, computed once per call.
void cover_tables(const TileGrid& g, std::vector<Span>* rows, std::vector<Span>* cols) {
  rows->resize(g.height);
  cols->resize(g.width);
  for (int64_t y = 0; y < g.height; ++y) g.cover_y(y, &(*rows)[y].first, &(*rows)[y].last);
  for (int64_t x = 0; x < g.width; ++x) g.cover_x(x, &(*cols)[x].first, &(*cols)[x].last);
}

// Normaliser per pixel: the summed weights of the covering windows (the count when unweighted).
template <typename acc_t>
std::vector<acc_t> normaliser(const TileGrid& g, const acc_t* weight, const std::vector<Span>& rows,
                              const std::vector<Span>& cols) {
  std::vector<acc_t> norm(g.height * g.width);
  at::parallel_for(0, g.height, 16, [&](int64_t y0, int64_t y1) {
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t x = 0; x < g.width; ++x) {
        acc_t s = 0;
        if (weight == nullptr) {
          s = acc_t((rows[y].last - rows[y].first + 1) * (cols[x].last - cols[x].first + 1));
          if (rows[y].last < rows[y].first || cols[x].last < cols[x].first) s = 0;
        } else {
          for (int64_t i = rows[y].first; i <= rows[y].last; ++i) {
            const acc_t* wrow = weight + (y - g.start_y(i)) * g.tile_w;
            for (int64_t j = cols[x].first; j <= cols[x].last; ++j) s += wrow[x - g.start_x(j)];
          }
        }
        norm[y * g.width + x] = s;
      }
    }
  });
  return norm;
}

template <typename scalar_t>
void aggregate_impl(const TileGrid& g, const scalar_t* tiles, const at::Tensor& weight_t,
                    bool normalize, scalar_t* out) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const acc_t* weight = weight_t.defined() ? weight_t.data_ptr<acc_t>() : nullptr;
  std::vector<Span> rows, cols;
  cover_tables(g, &rows, &cols);
  std::vector<acc_t> norm;
  if (normalize) norm = normaliser<acc_t>(g, weight, rows, cols);
  const int64_t tile_plane = g.tile_h * g.tile_w;
  const int64_t num_rows = g.batch * g.channels * g.height;
  at::parallel_for(0, num_rows, 8, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> acc(g.width);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t y = r % g.height;
      const int64_t c = (r / g.height) % g.channels;
      const int64_t n = r / (g.height * g.channels);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = rows[y].first; i <= rows[y].last; ++i) {
        const int64_t ty = y - g.start_y(i);
        const acc_t* wrow = weight ? weight + ty * g.tile_w : nullptr;
        for (int64_t j = 0; j < g.grid_w; ++j) {
          const int64_t t = (n * g.grid_h + i) * g.grid_w + j;
          const scalar_t* src = tiles + (t * g.channels + c) * tile_plane + ty * g.tile_w;
          acc_t* dst = acc.data() + g.start_x(j);
          if (wrow) {
            for (int64_t tx = 0; tx < g.tile_w; ++tx) dst[tx] += acc_t(src[tx]) * wrow[tx];
          } else {
            for (int64_t tx = 0; tx < g.tile_w; ++tx) dst[tx] += acc_t(src[tx]);
          }
        }
      }
      scalar_t* dst = out + r * g.width;
      if (normalize) {
        const acc_t* nrow = norm.data() + y * g.width;
        for (int64_t x = 0; x < g.width; ++x)
          dst[x] = nrow[x] > acc_t(0) ? scalar_t(acc[x] / nrow[x]) : scalar_t(0);
      } else {
        for (int64_t x = 0; x < g.width; ++x) dst[x] = scalar_t(acc[x]);
      }
    }
  });
}

template <typename scalar_t>
void extract_impl(const TileGrid& g, const scalar_t* image, const at::Tensor& weight_t,
                  bool normalize, scalar_t* tiles) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const acc_t* weight = weight_t.defined() ? weight_t.data_ptr<acc_t>() : nullptr;
  std::vector<acc_t> norm;
  if (normalize) {
    std::vector<Span> rows, cols;
    cover_tables(g, &rows, &cols);
    norm = normaliser<acc_t>(g, weight, rows, cols);
  }
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

at::Tensor tile_aggregate_cpu(const at::Tensor& tiles_in, int64_t batch, int64_t height,
                              int64_t width, int64_t stride_h, int64_t stride_w,
                              const c10::optional<at::Tensor>& weight_in, bool normalize) {
  TORCH_CHECK(tiles_in.device().is_cpu(), "tile_aggregate (CPU kernel): tiles must be on CPU");
  const TileGrid g = aggregate_grid(tiles_in, batch, height, width, stride_h, stride_w, weight_in);
  const at::Tensor tiles = tiles_in.contiguous();
  const auto weight = prepare_tile_weight(weight_in, tiles.scalar_type());
  at::Tensor out = at::empty({batch, g.channels, height, width}, tiles.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tiles.scalar_type(),
                                  "tile_aggregate_cpu", [&] {
    aggregate_impl<scalar_t>(g, tiles.data_ptr<scalar_t>(), weight.value_or(at::Tensor()),
                             normalize, out.data_ptr<scalar_t>());
  });
  return out;
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
  m.impl("tile_aggregate", &fastunet::tile_aggregate_cpu);
  m.impl("tile_extract", &fastunet::tile_extract_cpu);
}
