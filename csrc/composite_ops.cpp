// Kernels written once for every device (CompositeExplicitAutograd: the dispatcher runs them
// wherever a device has no kernel of its own; autograd stays with the Python registrations).
//
// tile_aggregate and tile_aggregate_argmax allocate their result and run the device's
// tile_aggregate_into on it, so each device implements the aggregation once, as the out-variant,
// and its arguments (out included) are validated in one place (aggregate_args). _bias_relu_ is
// ATen's add_ and relu_ here; CUDA has its own one-pass kernel.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "common/bn_relu_args.h"
#include "common/tile_args.h"

namespace fastunet {
namespace {

void tile_aggregate_into(const at::Tensor& tiles, int64_t batch, int64_t height, int64_t width,
                         int64_t stride_h, int64_t stride_w,
                         const c10::optional<at::Tensor>& weight, bool normalize,
                         c10::string_view epilogue, const at::Tensor& out) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastunet::tile_aggregate_into", "")
          .typed<void(const at::Tensor&, int64_t, int64_t, int64_t, int64_t, int64_t,
                      const c10::optional<at::Tensor>&, bool, c10::string_view,
                      const at::Tensor&)>();
  op.call(tiles, batch, height, width, stride_h, stride_w, weight, normalize, epilogue, out);
}

// The grid is validated before the result is allocated (an absurd batch or size must fail with
// a message, not an allocation); tile_aggregate_into then validates everything.
at::Tensor aggregate_fresh(const at::Tensor& tiles, int64_t batch, int64_t height, int64_t width,
                           int64_t stride_h, int64_t stride_w,
                           const c10::optional<at::Tensor>& weight, bool normalize,
                           TileEpilogue epilogue) {
  const TileGrid g = aggregate_grid(tiles, batch, height, width, stride_h, stride_w, weight);
  if (epilogue == TileEpilogue::kArgmax) check_argmax_channels(g);
  at::Tensor out = at::empty(aggregate_shape(g, epilogue),
                             tiles.options().dtype(aggregate_dtype(tiles, epilogue)));
  tile_aggregate_into(tiles, batch, height, width, stride_h, stride_w, weight, normalize,
                      tile_epilogue_name(epilogue), out);
  return out;
}

at::Tensor tile_aggregate(const at::Tensor& tiles, int64_t batch, int64_t height, int64_t width,
                          int64_t stride_h, int64_t stride_w,
                          const c10::optional<at::Tensor>& weight, bool normalize, bool softmax) {
  return aggregate_fresh(tiles, batch, height, width, stride_h, stride_w, weight, normalize,
                         softmax ? TileEpilogue::kSoftmax : TileEpilogue::kNone);
}

at::Tensor tile_aggregate_argmax(const at::Tensor& tiles, int64_t batch, int64_t height,
                                 int64_t width, int64_t stride_h, int64_t stride_w,
                                 const c10::optional<at::Tensor>& weight) {
  return aggregate_fresh(tiles, batch, height, width, stride_h, stride_w, weight, true,
                         TileEpilogue::kArgmax);
}

void bias_relu(const at::Tensor& self, const at::Tensor& bias) {
  check_bias_relu_args(self, bias);
  at::Tensor y = self;  // the in-place ops need a non-const handle; same tensor
  y.add_(bias.reshape({1, bias.size(0), 1, 1})).relu_();
}

}  // namespace
}  // namespace fastunet

TORCH_LIBRARY_IMPL(fastunet, CompositeExplicitAutograd, m) {
  m.impl("tile_aggregate", &fastunet::tile_aggregate);
  m.impl("tile_aggregate_argmax", &fastunet::tile_aggregate_argmax);
  m.impl("_bias_relu_", &fastunet::bias_relu);
}
