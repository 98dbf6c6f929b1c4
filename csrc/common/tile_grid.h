// Window grid of sliding-window inference (SPEC §1), shared by the CPU and CUDA kernels.
//
// Along one axis of extent `size`, windows of extent `tile` (<= size) start at i*stride, except
// that a window running past the end is moved back to end at the border:
//   count    = (size - tile + stride - 1) / stride + 1
//   start(i) = min(i * stride, size - tile)
// Starts are strictly increasing, so the windows covering a coordinate p form one contiguous
// index range [first, last] (empty when a stride larger than the window leaves a gap at p).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace fastunet {

// All of it is templated on the index type: the CUDA kernels use 32-bit indices when every
// offset fits (64-bit integer division costs several times more on a GPU).
template <typename index_t>
C10_HOST_DEVICE inline index_t tile_count(index_t size, index_t tile, index_t stride) {
  return (size - tile + stride - 1) / stride + 1;
}

template <typename index_t>
C10_HOST_DEVICE inline index_t tile_start(index_t index, index_t size, index_t tile,
                                          index_t stride) {
  const index_t start = index * stride;
  return start + tile > size ? size - tile : start;
}

// Windows covering coordinate p: [*first, *last]; *last < *first when none does.
template <typename index_t>
C10_HOST_DEVICE inline void tile_cover(index_t p, index_t size, index_t tile, index_t stride,
                                       index_t count, index_t* first, index_t* last) {
  // last window starting at or before p
  const index_t final_start = size - tile;
  index_t hi = p >= final_start ? count - 1 : p / stride;
  if (hi > count - 1) hi = count - 1;
  // first window ending after p: start > p - tile
  const index_t lowest = p - tile + 1;
  index_t lo = lowest <= 0 ? 0 : (lowest + stride - 1) / stride;
  if (lo > count - 1) lo = count - 1;  // the border window, start size - tile > p - tile
  *first = lo;
  *last = hi;
}

// Shapes of one aggregation / extraction problem, validated on the host.
template <typename index_t>
struct TileGridT {
  index_t batch, channels, height, width;  // full images
  index_t tile_h, tile_w;                   // window extent (<= image extent)
  index_t stride_h, stride_w;
  index_t grid_h, grid_w;                   // windows per column / row

  C10_HOST_DEVICE index_t num_tiles() const { return batch * grid_h * grid_w; }
  C10_HOST_DEVICE index_t start_y(index_t i) const {
    return tile_start(i, height, tile_h, stride_h);
  }
  C10_HOST_DEVICE index_t start_x(index_t j) const { return tile_start(j, width, tile_w, stride_w); }
  C10_HOST_DEVICE void cover_y(index_t y, index_t* a, index_t* b) const {
    tile_cover(y, height, tile_h, stride_h, grid_h, a, b);
  }
  C10_HOST_DEVICE void cover_x(index_t x, index_t* a, index_t* b) const {
    tile_cover(x, width, tile_w, stride_w, grid_w, a, b);
  }

  template <typename other_t>
  TileGridT<other_t> cast() const {
    return {other_t(batch), other_t(channels), other_t(height), other_t(width), other_t(tile_h),
            other_t(tile_w), other_t(stride_h), other_t(stride_w), other_t(grid_h),
            other_t(grid_w)};
  }
};

using TileGrid = TileGridT<int64_t>;

}  // namespace fastunet
