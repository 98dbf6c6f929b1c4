// Host-side validation for the tile ops; both backends call these before launching.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <c10/util/string_view.h>

#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/tile_grid.h"

namespace fastunet {

inline void check_tile_weight(const c10::optional<at::Tensor>& weight, const at::Tensor& ref,
                              int64_t tile_h, int64_t tile_w) {
  if (!weight.has_value()) return;
  FASTUNET_CHECK_FLOATING(*weight, "tile weight");
  FASTUNET_CHECK_SAME_DEVICE(*weight, ref, "tile weight", "tiles");
  TORCH_CHECK(weight->dim() == 2 && weight->size(0) == tile_h && weight->size(1) == tile_w,
              "tile weight must have shape (", tile_h, ", ", tile_w, ") like one window, got ",
              weight->sizes());
}

// Accumulation type of the tile kernels on both backends: float for float/half/bfloat16 (the
// reference sums float32 logits in float32, in the same order, so float results are bitwise
// the reference's; note at::acc_type would be double on the CPU), double for double.
template <typename scalar_t>
using tile_acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline at::ScalarType tile_acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Weights in the accumulation type.
inline c10::optional<at::Tensor> prepare_tile_weight(const c10::optional<at::Tensor>& weight,
                                                     at::ScalarType dtype) {
  if (!weight.has_value()) return c10::nullopt;
  return weight->to(tile_acc_dtype(dtype)).contiguous();
}

inline void check_stride(int64_t stride_h, int64_t stride_w) {
  FASTUNET_CHECK_POSITIVE(stride_h, "stride_h");
  FASTUNET_CHECK_POSITIVE(stride_w, "stride_w");
}

// tiles (batch * grid_h * grid_w, C, tile_h, tile_w) -> images (batch, C, height, width)
inline TileGrid aggregate_grid(const at::Tensor& tiles, int64_t batch, int64_t height,
                               int64_t width, int64_t stride_h, int64_t stride_w,
                               const c10::optional<at::Tensor>& weight) {
  FASTUNET_CHECK_DIM(tiles, 4, "tiles");
  FASTUNET_CHECK_FLOATING(tiles, "tiles");
  TORCH_CHECK(batch >= 0, "batch must be non-negative, got ", batch);
  FASTUNET_CHECK_POSITIVE(height, "height");
  FASTUNET_CHECK_POSITIVE(width, "width");
  check_stride(stride_h, stride_w);
  TileGrid g;
  g.batch = batch;
  g.channels = tiles.size(1);
  g.height = height;
  g.width = width;
  g.tile_h = tiles.size(2);
  g.tile_w = tiles.size(3);
  g.stride_h = stride_h;
  g.stride_w = stride_w;
  TORCH_CHECK(g.tile_h >= 1 && g.tile_h <= height && g.tile_w >= 1 && g.tile_w <= width,
              "window (", g.tile_h, "x", g.tile_w, ") must be non-empty and fit in the image (",
              height, "x", width, "); clip the window to the image first");
  g.grid_h = tile_count(height, g.tile_h, stride_h);
  g.grid_w = tile_count(width, g.tile_w, stride_w);
  TORCH_CHECK(tiles.size(0) == g.num_tiles(), "expected ", g.num_tiles(), " windows (batch ",
              batch, " x grid ", g.grid_h, "x", g.grid_w, ") for a ", height, "x", width,
              " image with window ", g.tile_h, "x", g.tile_w, " and stride ", stride_h, "x",
              stride_w, ", got ", tiles.size(0));
  check_tile_weight(weight, tiles, g.tile_h, g.tile_w);
  return g;
}

// The argmax epilogue writes class indices as uint8.
inline void check_argmax_channels(const TileGrid& g) {
  TORCH_CHECK(g.channels >= 1 && g.channels <= 256, "tile_aggregate_argmax needs 1 to 256 "
              "channels (classes) to write uint8 labels, got ", g.channels);
}

// The caller's output of tile_aggregate_into: written whole, so it must be exactly the
// tensor the allocating form would return. `tiles` and `weight` are what the kernel will read
// (after .contiguous() and the weight's conversion), which must not share memory with it.
inline void check_tile_out(const at::Tensor& out, const at::Tensor& tiles,
                           const c10::optional<at::Tensor>& weight, at::IntArrayRef shape,
                           at::ScalarType dtype, const char* op) {
  TORCH_CHECK(out.device() == tiles.device(), op, ": out is on ", out.device(),
              " but the tiles are on ", tiles.device(), "; pass an out on the tiles' device");
  TORCH_CHECK(out.scalar_type() == dtype, op, ": out must be ", dtype, ", got ",
              out.scalar_type());
  TORCH_CHECK(out.sizes() == shape, op, ": out must have shape ", shape, ", got ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous (NCHW), got strides ",
              out.strides(), "; pass a fresh tensor or a .contiguous() one");
  const auto overlaps = [&](const at::Tensor& t) {
    const auto status = at::get_overlap_status(out, t);
    return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
  };
  TORCH_CHECK(!overlaps(tiles) && !(weight.has_value() && overlaps(*weight)), op,
              ": out shares memory with the tiles or the weight; pass a separate buffer");
}

// images (batch, C, height, width) -> tiles (batch * grid_h * grid_w, C, tile_h, tile_w)
inline TileGrid extract_grid(const at::Tensor& image, int64_t tile_h, int64_t tile_w,
                             int64_t stride_h, int64_t stride_w,
                             const c10::optional<at::Tensor>& weight) {
  FASTUNET_CHECK_DIM(image, 4, "image");
  FASTUNET_CHECK_FLOATING(image, "image");
  check_stride(stride_h, stride_w);
  TileGrid g;
  g.batch = image.size(0);
  g.channels = image.size(1);
  g.height = image.size(2);
  g.width = image.size(3);
  g.tile_h = tile_h;
  g.tile_w = tile_w;
  g.stride_h = stride_h;
  g.stride_w = stride_w;
  TORCH_CHECK(tile_h >= 1 && tile_h <= g.height && tile_w >= 1 && tile_w <= g.width,
              "window (", tile_h, "x", tile_w, ") must be non-empty and fit in the image (",
              g.height, "x", g.width, "); clip the window to the image first");
  g.grid_h = tile_count(g.height, tile_h, stride_h);
  g.grid_w = tile_count(g.width, tile_w, stride_w);
  check_tile_weight(weight, image, tile_h, tile_w);
  return g;
}

enum class TileEpilogue { kNone, kSoftmax, kArgmax };

inline TileEpilogue parse_tile_epilogue(c10::string_view epilogue) {
  const std::string_view name(epilogue.data(), epilogue.size());
  if (name == "none") return TileEpilogue::kNone;
  if (name == "softmax") return TileEpilogue::kSoftmax;
  TORCH_CHECK(name == "argmax", "epilogue must be \"none\", \"softmax\" or \"argmax\", got \"",
              std::string(name), "\"");
  return TileEpilogue::kArgmax;
}

inline const char* tile_epilogue_name(TileEpilogue e) {
  return e == TileEpilogue::kNone ? "none" : e == TileEpilogue::kSoftmax ? "softmax" : "argmax";
}

// Shape and dtype of tile_aggregate's result for an epilogue: (batch, C, height, width) in the
// tiles' dtype, or uint8 labels (batch, height, width) for argmax.
inline std::vector<int64_t> aggregate_shape(const TileGrid& g, TileEpilogue e) {
  if (e == TileEpilogue::kArgmax) return {g.batch, g.height, g.width};
  return {g.batch, g.channels, g.height, g.width};
}

inline at::ScalarType aggregate_dtype(const at::Tensor& tiles, TileEpilogue e) {
  return e == TileEpilogue::kArgmax ? at::kByte : tiles.scalar_type();
}

// tile_aggregate_into's arguments, validated once (out included) and in the form both devices'
// kernels read: contiguous tiles, the weight in the accumulation dtype.
struct AggregateArgs {
  TileGrid g;
  at::Tensor tiles;
  c10::optional<at::Tensor> weight;
  TileEpilogue epilogue;
  bool normalize;  // argmax always compares averages
};

inline AggregateArgs aggregate_args(const at::Tensor& tiles, int64_t batch, int64_t height,
                                    int64_t width, int64_t stride_h, int64_t stride_w,
                                    const c10::optional<at::Tensor>& weight, bool normalize,
                                    c10::string_view epilogue, const at::Tensor& out) {
  AggregateArgs a;
  a.g = aggregate_grid(tiles, batch, height, width, stride_h, stride_w, weight);
  a.epilogue = parse_tile_epilogue(epilogue);
  if (a.epilogue == TileEpilogue::kArgmax) check_argmax_channels(a.g);
  a.normalize = normalize || a.epilogue == TileEpilogue::kArgmax;
  a.tiles = tiles.contiguous();
  a.weight = prepare_tile_weight(weight, a.tiles.scalar_type());
  check_tile_out(out, a.tiles, a.weight, aggregate_shape(a.g, a.epilogue),
                 aggregate_dtype(a.tiles, a.epilogue), "tile_aggregate");
  return a;
}

}  // namespace fastunet
