// Window grid of sliding-window inference (mmseg's slide mode), shared by the CPU and CUDA kernels.
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

C10_HOST_DEVICE inline int64_t tile_count(int64_t size, int64_t tile, int64_t stride) {
  return (size - tile + stride - 1) / stride + 1;
}

C10_HOST_DEVICE inline int64_t tile_start(int64_t index, int64_t size, int64_t tile,
                                          int64_t stride) {
  const int64_t start = index * stride;
  return start + tile > size ? size - tile : start;
}

// Windows covering coordinate p: [*first, *last]; *last < *first when none does.
C10_HOST_DEVICE inline void tile_cover(int64_t p, int64_t size, int64_t tile, int64_t stride,
                                       int64_t count, int64_t* first, int64_t* last) {
  // last window starting at or before p
  const int64_t final_start = size - tile;
  int64_t hi = p >= final_start ? count - 1 : p / stride;
  if (hi > count - 1) hi = count - 1;
  // first window ending after p: start > p - tile
  const int64_t lowest = p - tile + 1;
  int64_t lo = lowest <= 0 ? 0 : (lowest + stride - 1) / stride;
  if (lo > count - 1) lo = count - 1;  // the border window, start size - tile > p - tile
  *first = lo;
  *last = hi;
}

// Shapes of one aggregation / extraction problem, validated on the host.
struct TileGrid {
  int64_t batch, channels, height, width;  // full images
  int64_t tile_h, tile_w;                   // window extent (<= image extent)
  int64_t stride_h, stride_w;
  int64_t grid_h, grid_w;                   // windows per column / row

  C10_HOST_DEVICE int64_t num_tiles() const { return batch * grid_h * grid_w; }
  C10_HOST_DEVICE int64_t start_y(int64_t i) const { return tile_start(i, height, tile_h, stride_h); }
  C10_HOST_DEVICE int64_t start_x(int64_t j) const { return tile_start(j, width, tile_w, stride_w); }
  C10_HOST_DEVICE void cover_y(int64_t y, int64_t* a, int64_t* b) const {
    tile_cover(y, height, tile_h, stride_h, grid_h, a, b);
  }
  C10_HOST_DEVICE void cover_x(int64_t x, int64_t* a, int64_t* b) const {
    tile_cover(x, width, tile_w, stride_w, grid_w, a, b);
  }
};

}  // namespace fastunet
