"""``--deterministic``: the same weights run to run on CPU and on CUDA.

What it sets:

- ``torch.use_deterministic_algorithms(True)``, cuDNN deterministic algorithms with autotuning
  off (``cudnn.benchmark = False``), and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (deterministic
  cuBLAS); TF32 is left as it is (it is deterministic);
- on CUDA, deterministic backward kernels for the two ops of this model that PyTorch only has
  with atomic adds (and so refuses in deterministic mode): bilinear upsampling
  (``upsample_bilinear2d_backward``: the decoder's x2 upsampling, the heads' resizes) and
  adaptive average pooling (``_adaptive_avg_pool2d_backward``: PSPNet's and DeepLabV3's pooled
  branches). Both ops are separable linear maps ``y = A_h · x · A_w^T``, so their gradient is
  ``A_h^T · g · A_w``: two small matrix products, deterministic in cuBLAS. The forward passes are
  PyTorch's own (already deterministic).

The data order is already deterministic (samples are keyed by (seed, epoch, index)) and the
DataLoader workers are seeded. CPU runs are repeatable without this switch, given the same
number of threads. Cost: none measurable on CPU; on CUDA the matrix-product backward and the
loss of cuDNN autotuning (see benchmarks/bench_train.py, the ``deterministic`` case).
"""

import torch

__all__ = ["register_cuda_kernels", "unregister_cuda_kernels", "interp_matrix", "adaptive_pool_matrix", "upsample_bilinear2d_backward",
           "adaptive_avg_pool2d_backward"]

_LIBRARY = None  # the torch.library registration (kept alive for the process)
_MATRICES = {}   # (kind, sizes, ..., device) -> matrix on that device: built once per shape


def _source_scale(in_size, out_size, align_corners, scale):
    # ATen's area_pixel_compute_scale
    if align_corners:
        return (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    return 1.0 / scale if scale is not None and scale > 0 else in_size / out_size


def interp_matrix(in_size, out_size, align_corners, scale=None, dtype=torch.float32,
                  device=None):
    """(out, in) matrix of 1-D linear interpolation exactly as ATen's bilinear kernel indexes."""
    s = _source_scale(in_size, out_size, align_corners, scale)
    dst = torch.arange(out_size, dtype=torch.float64)
    src = dst * s if align_corners else ((dst + 0.5) * s - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    l1 = src - i0
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    m.index_put_((rows, i0), 1 - l1, accumulate=True)
    m.index_put_((rows, i1), l1, accumulate=True)
    return m.to(dtype=dtype, device=device)


def adaptive_pool_matrix(in_size, out_size, dtype=torch.float32, device=None):
    """(out, in) matrix of 1-D adaptive average pooling (ATen's start/end index rule)."""
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for o in range(out_size):
        start = (o * in_size) // out_size
        end = -((-(o + 1) * in_size) // out_size)
        m[o, start:end] = 1.0 / (end - start)
    return m.to(dtype=dtype, device=device)


def _work_dtype(grad):
    return torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype


def _separable_backward(grad, a_h, a_w, input_size):
    # grad (N, C, Ho, Wo) -> A_h^T · grad · A_w  (N, C, Hi, Wi), in fp32 for low precisions
    work = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
    out = torch.matmul(torch.matmul(a_h.t(), work), a_w)
    fmt = (torch.channels_last if grad.dim() == 4 and not grad.is_contiguous()
           and grad.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
    return out.to(grad.dtype).reshape(input_size).contiguous(memory_format=fmt)


def _cached(key, build):
    m = _MATRICES.get(key)
    if m is None:
        m = _MATRICES[key] = build()
    return m


def upsample_bilinear2d_backward(grad_output, output_size, input_size, align_corners,
                                 scales_h=None, scales_w=None):
    """Deterministic gradient of ``aten::upsample_bilinear2d`` (same signature as ATen's)."""
    hi, wi = int(input_size[2]), int(input_size[3])
    ho, wo = int(output_size[0]), int(output_size[1])
    dev, dt = grad_output.device, _work_dtype(grad_output)
    a_h = _cached(("interp", hi, ho, align_corners, scales_h, dev, dt),
                  lambda: interp_matrix(hi, ho, align_corners, scales_h, dt, dev))
    a_w = _cached(("interp", wi, wo, align_corners, scales_w, dev, dt),
                  lambda: interp_matrix(wi, wo, align_corners, scales_w, dt, dev))
    return _separable_backward(grad_output, a_h, a_w, [int(s) for s in input_size])


def adaptive_avg_pool2d_backward(grad_output, self):
    """Deterministic gradient of ``aten::_adaptive_avg_pool2d`` (same signature as ATen's)."""
    hi, wi = (int(s) for s in self.shape[-2:])
    ho, wo = (int(s) for s in grad_output.shape[-2:])
    dev, dt = grad_output.device, _work_dtype(grad_output)
    a_h = _cached(("pool", hi, ho, dev, dt), lambda: adaptive_pool_matrix(hi, ho, dt, dev))
    a_w = _cached(("pool", wi, wo, dev, dt), lambda: adaptive_pool_matrix(wi, wo, dt, dev))
    return _separable_backward(grad_output, a_h, a_w, list(self.shape))


def register_cuda_kernels():
    """Route the two atomic-add backward ops on CUDA to the deterministic ones (idempotent)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    import warnings
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # "overriding a previously registered kernel" is the point
        warnings.simplefilter("ignore")
        lib.impl("upsample_bilinear2d_backward", upsample_bilinear2d_backward, "CUDA")
        lib.impl("_adaptive_avg_pool2d_backward", adaptive_avg_pool2d_backward, "CUDA")
    _LIBRARY = lib


def unregister_cuda_kernels():
    """Give the two backward ops their ATen kernels back."""
    global _LIBRARY
    if _LIBRARY is not None:
        _LIBRARY._destroy()
        _LIBRARY = None


