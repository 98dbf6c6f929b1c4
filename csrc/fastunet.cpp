// Op schemas of the fastunet library (one place for all of them) and the Python module that
// reports how this binary was built. Kernels register per backend in csrc/cpu and csrc/cuda.
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include "common/switches.h"
#include "cpu/winograd.h"

#ifndef FASTUNET_CUDA_ARCHS
#define FASTUNET_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(fastunet, m) {
  // Sliding-window tiles. Window grid: csrc/common/tile_grid.h.
  // tile_aggregate: (batch*gh*gw, C, th, tw) windows -> (batch, C, height, width); each pixel is
  // the weighted sum of the windows covering it, divided by the summed weights if `normalize`
  // (uniform weights: the plain average of the reference). Uncovered pixels are 0. `softmax`
  // then replaces the C values of every pixel by their softmax (differentiable).
  m.def("tile_aggregate(Tensor tiles, int batch, int height, int width, int stride_h, "
        "int stride_w, Tensor? weight=None, bool normalize=True, bool softmax=False) -> Tensor");
  // tile_aggregate_argmax: the class index of the largest averaged value per pixel, as uint8
  // (batch, height, width); the first one on ties, like torch.argmax. Not differentiable.
  m.def("tile_aggregate_argmax(Tensor tiles, int batch, int height, int width, int stride_h, "
        "int stride_w, Tensor? weight=None) -> Tensor");
  // The out-variant behind both (the allocating forms above are this op on a fresh output;
  // csrc/composite_ops.cpp): epilogue "none", "softmax" or "argmax", written into a caller's
  // `out` (exactly the shape, dtype and device the allocating form returns, contiguous), so
  // that a loop over same-size images can reuse one buffer: a fresh multi-megabyte CPU output
  // costs its page faults (first touch) on every call, as much as the aggregation itself. Not
  // differentiable. Each device implements this op and tile_extract; nothing else.
  m.def("tile_aggregate_into(Tensor tiles, int batch, int height, int width, int stride_h, "
        "int stride_w, Tensor? weight=None, bool normalize=True, str epilogue=\"none\", *, "
        "Tensor(a!) out) -> ()");
  // tile_extract: the adjoint of tile_aggregate (without softmax) with the same
  // weight/normalize; with the defaults it cuts the windows out of the images.
  m.def("tile_extract(Tensor image, int tile_h, int tile_w, int stride_h, int stride_w, "
        "Tensor? weight=None, bool normalize=False) -> Tensor");

  // Fused Conv-BN-ReLU (csrc/common/bn_relu.h has the math). Inference: BN folded into the
  // conv's weight and bias by the caller, then the convolution with a bias + ReLU epilogue
  // (oneDNN post-op on CPU; on CUDA cuDNN's convolution with the bias, then an in-place ReLU),
  // in the input's memory format.
  m.def("conv_bias_relu(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool relu=True) -> Tensor");
  // The CPU kernel's Winograd path (csrc/cpu/winograd.h), callable directly for tests and
  // benchmarks: 3x3, stride 1, padding 1, float32; tile 2 or 4; block 0 = automatic.
  m.def("_winograd_conv3x3(Tensor input, Tensor weight, Tensor? bias, bool relu=True, "
        "int tile=2, int block=0) -> Tensor");
  // Training's forward (input_grad false) and input gradient (true, input = grad_out) of a
  // bias-free 3x3/s1/p1 conv by F(4x4,3x3), weight transformed per call (fastunet/ops/
  // cpu_winograd_conv.py dispatches it).
  m.def("_winograd_conv3x3_train(Tensor input, Tensor weight, bool input_grad=False, "
        "int block=0) -> Tensor");
  // Its weight gradient from the input and the output gradient (weight: shape and layout only).
  m.def("_winograd_conv3x3_grad_weight(Tensor input, Tensor grad, Tensor weight) -> Tensor");
  // The candidate CUDA epilogue: self = relu(self + bias) in place, for the output of a
  // convolution run without its bias (self NCHW or channels_last). One vectorised pass on CUDA;
  // elsewhere ATen's add_ and relu_ (csrc/composite_ops.cpp).
  m.def("_bias_relu_(Tensor(a!) self, Tensor bias) -> ()");
  m.def("conv_bias_relu_backward(Tensor grad_out, Tensor output, Tensor input, Tensor weight, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Training BatchNorm(+ReLU) with batch statistics, in the pieces SyncBN needs between
  // reductions. Statistics and sums are float (double for double inputs); inputs may be NCHW or
  // channels_last, and outputs keep the input's layout.
  // bn_stats: per-channel mean and biased variance (Welford).
  m.def("bn_stats(Tensor input) -> (Tensor mean, Tensor var)");
  // bn_relu: y = relu((x - mean) / sqrt(var + eps) * weight + bias).
  m.def("bn_relu(Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
        "float eps, bool relu=True) -> Tensor");
  // The backward of bn_relu with batch statistics, recomputing the ReLU mask from `input` (the
  // BN input) instead of reading the output: per-channel sums first (all-reduced under SyncBN;
  // they are also the weight and bias gradients), then the input gradient. `count` is the
  // number of values per channel the statistics were taken over (all ranks together).
  m.def("bn_relu_backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor var, "
        "Tensor? weight, Tensor? bias, float eps, bool relu=True) -> (Tensor sum_dy, "
        "Tensor sum_dy_xhat)");
  m.def("bn_relu_backward_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor var, "
        "Tensor? weight, Tensor? bias, Tensor sum_dy, Tensor sum_dy_xhat, SymInt count, "
        "float eps, bool relu=True) -> Tensor");
  // nn.BatchNorm2d's running-statistics update, in place: r = (1 - momentum) * r + momentum * s,
  // with the unbiased variance (var * count / (count - 1)) for running_var.
  m.def("bn_update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, "
        "Tensor var, float momentum, SymInt count) -> ()");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = FASTUNET_CUDA_ARCHS;
  info["torch_version"] = TORCH_VERSION;
#ifdef FASTUNET_DEBUG
  info["debug"] = true;
#else
  info["debug"] = false;
#endif
  info["compiler"] = __VERSION__;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastunet native kernels; the ops themselves live in torch.ops.fastunet";
  m.def("build_info", &build_info, "How this binary was built (CUDA kernels, archs, torch)");
  m.def("winograd_fast_kernel", &fastunet::winograd_has_fast_kernel,
        "Whether the CPU Winograd convolution runs its AVX-512 kernel here (else not dispatched)");
  // fastunet/settings.py reads the environment; the library takes its switches from there
  m.def(
      "_set_switches",
      [](int cpu_isa_cap, bool cudnn_fused_conv) {
        fastunet::switches().cpu_isa_cap.store(cpu_isa_cap);
        fastunet::switches().cudnn_fused_conv.store(cudnn_fused_conv);
      },
      "Set the native switches (cpu_isa_cap: 0 base, 1 AVX2, 2 AVX-512; cudnn_fused_conv)");
}
