// Op schemas of the fastunet library (one place for all of them) and the Python module that
// reports how this binary was built. Kernels register per backend in csrc/cpu and csrc/cuda.
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#ifndef FASTUNET_CUDA_ARCHS
#define FASTUNET_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(fastunet, m) {
  // Sliding-window tiles. Window grid: SPEC §1 (see csrc/common/tile_grid.h).
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
  // tile_extract: the adjoint of tile_aggregate (without softmax) with the same
  // weight/normalize; with the defaults it cuts the windows out of the images.
  m.def("tile_extract(Tensor image, int tile_h, int tile_w, int stride_h, int stride_w, "
        "Tensor? weight=None, bool normalize=False) -> Tensor");
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
}
