// Argument checks shared by the CPU and CUDA host launchers: one clear message per misuse.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define FASTUNET_CHECK_FLOATING(t, name)                                            \
  TORCH_CHECK(at::isFloatingType((t).scalar_type()), name,                         \
              " must be a floating-point tensor, got ", (t).scalar_type())

#define FASTUNET_CHECK_DIM(t, d, name)                                              \
  TORCH_CHECK((t).dim() == (d), name, " must be ", d, "-D, got shape ", (t).sizes())

#define FASTUNET_CHECK_SAME_DEVICE(a, b, name_a, name_b)                            \
  TORCH_CHECK((a).device() == (b).device(), name_a, " is on ", (a).device(), " but ", \
              name_b, " is on ", (b).device())

#define FASTUNET_CHECK_POSITIVE(v, name) \
  TORCH_CHECK((v) > 0, name, " must be positive, got ", (v))
