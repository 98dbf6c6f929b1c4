"""Which convolution runs, and why: the one place that decides it for fastunet's Conv-BN-ReLU blocks.

    python -m fastunet                      # this machine's plan for the UNet's layers
    plan = fastunet.conv_plan.training_plan(x, weight, None, [1, 1], [1, 1], [1, 1], 1)
    plan.forward, plan.grad_input, plan.grad_weight, plan.why

A :class:`ConvPlan` names the algorithm of a convolution's forward pass, of its input gradient and
of its weight gradient, and why they were chosen. It is decided once per layer shape (cached):

- :func:`inference_plan`: the folded conv + bias + ReLU of an eval-mode block
  (``fastunet.ops.conv_bias_relu``);
- :func:`training_plan`: the convolution inside the fused training op
  (``fastunet.ops.conv_bn_relu_train``).

The algorithms (:data:`ALGORITHMS`) and the rules, for float32 channels_last CPU inputs of an
ungrouped, undilated, stride-1 convolution with "same" padding and no conv bias in training
(everything else runs the library convolution, oneDNN on CPU and cuDNN on CUDA):

1. **GEMM** (training only): layers with at most ``GEMM_ROWS`` output pixels over the batch run
   forward and both gradients as matrix products over an im2col; the weight gradient alone also
   up to ``GEMM_WGRAD_ROWS`` pixels for weights of at least ``GEMM_WGRAD_NUMEL`` values (the deep
   1024-channel stage of the UNet at 4x4 and 8x8). oneDNN spends most of its time outside the
   arithmetic on so few pixels and so many channels.
2. **Winograd F(4x4,3x3)**: 3x3 layers with at least ``WINOGRAD_MIN_CHANNELS`` input and output
   channels, from ``WINOGRAD_F4_MIN_TILES`` of its 4x4 output tiles over the batch in inference
   (``WINOGRAD_TRAIN_MIN_TILES`` in training, where the weight is transformed on every step).
   oneDNN's direct convolution already runs near the FMA peak; Winograd does 4x fewer multiplies.
3. **Winograd F(2x2,3x3)** (inference only): the same layers below that, from
   ``WINOGRAD_F2_MIN_TILES`` of its 2x2 tiles (2.25x fewer multiplies, a smaller weight transform).
4. Otherwise **oneDNN** with the ReLU as a post-op (inference: the fused op packs weights for it)
   or **ATen's convolution** (training; dtypes oneDNN has no fused path for).

Winograd runs only where the AVX-512 matrix kernel exists (``_C.winograd_fast_kernel()``; the
AVX2 and baseline builds are slower than oneDNN) and ``FASTUNET_WINOGRAD`` is not 0. The
thresholds are where each algorithm measured faster than oneDNN per UNet layer
(``pytest benchmarks/bench_winograd.py --benchmark-only -s``; results in
``benchmarks/results/cpu-*/``). Whether a block runs fused at all is the device default
(:mod:`fastunet.defaults`), and :func:`train_fused_default` is ``--fused auto``.
"""
import dataclasses
import functools

import torch

from . import _native, defaults, settings

__all__ = ["ALGORITHMS", "ConvPlan", "inference_plan", "training_plan", "train_fused_default",
           "describe"]

WINOGRAD_F4 = "winograd_f4"  # fastunet's Winograd F(4x4,3x3) (csrc/cpu/winograd_kernel.cpp)
WINOGRAD_F2 = "winograd_f2"  # fastunet's Winograd F(2x2,3x3), inference only
GEMM = "gemm"                # im2col + one matrix product (fastunet/ops/cpu_gemm_conv.py)
ONEDNN = "onednn"            # oneDNN's convolution with the ReLU as a post-op (CPU inference)
ATEN = "aten"                # ATen's convolution: oneDNN or ATen's kernels on CPU, cuDNN on CUDA
ALGORITHMS = (WINOGRAD_F4, WINOGRAD_F2, GEMM, ONEDNN, ATEN)

GEMM_ROWS = 128                # output pixels (N*H*W) up to which a layer runs as GEMMs ...
GEMM_WGRAD_ROWS = 512          # ... and its weight gradient does for weights of at least
GEMM_WGRAD_NUMEL = 1 << 22     # this many values
WINOGRAD_MIN_CHANNELS = 32     # fewer channels leave the transforms nothing to amortise over
WINOGRAD_F4_MIN_TILES = 32     # inference: F(4x4) from 32 of its 4x4 tiles over the batch ...
WINOGRAD_F2_MIN_TILES = 32     # ... else F(2x2) from 32 of its 2x2 tiles
WINOGRAD_TRAIN_MIN_TILES = 64  # training (weight transformed every step): F(4x4) from 64 tiles


@dataclasses.dataclass(frozen=True)
class ConvPlan:
    """The algorithms of one convolution's forward, input gradient and weight gradient."""
    forward: str
    grad_input: str
    grad_weight: str
    why: str

    @property
    def winograd_tile(self):
        """The forward's Winograd output tile (4 or 2), or 0 when it is not Winograd."""
        return {WINOGRAD_F4: 4, WINOGRAD_F2: 2}.get(self.forward, 0)


def _is_channels_last(x):
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last)


def _winograd_enabled(switches):
    """Winograd on (FASTUNET_WINOGRAD) and its AVX-512 kernel here (per the ISA cap)."""
    return switches.winograd and _native.LOADED and bool(_native._C.winograd_fast_kernel())


# read when the switches change, not per call (and a constant to torch.compile)
_WINOGRAD = {"enabled": _winograd_enabled(settings.current())}
settings.on_change(lambda s: _WINOGRAD.update(enabled=_winograd_enabled(s)))


def _key(x, weight, stride, padding, dilation, groups):
    """The hashable facts a plan depends on."""
    return (x.device.type, x.dtype, weight.dtype, weight.is_mkldnn, _is_channels_last(x),
            tuple(x.shape), tuple(weight.shape), tuple(stride), tuple(padding), tuple(dilation),
            int(groups), _WINOGRAD["enabled"])


def _library(forward, why):
    return ConvPlan(forward, ATEN, ATEN, why)


def _same_cpu_fp32(key):
    """Why the specialised CPU algorithms cannot take this conv, or None when they can."""
    device, xdt, wdt, _, channels_last, xshape, wshape, stride, padding, dilation, groups, _ = key
    if len(xshape) != 4 or len(wshape) != 4:
        return "not a 2-D convolution"  # the op itself reports the error
    if device != "cpu":
        return f"{device}: the library convolution"
    if xdt != torch.float32 or wdt != torch.float32:
        return f"{str(xdt).replace('torch.', '')}: only float32 has specialised CPU kernels"
    if not channels_last:
        return "NCHW input: the specialised CPU kernels take channels_last"
    k = wshape[2]
    if (groups != 1 or stride != (1, 1) or dilation != (1, 1) or wshape[3] != k or k % 2 == 0
            or padding != (k // 2, k // 2)):
        return "not an ungrouped stride-1 'same' convolution"
    return None


def _winograd_rule(key, min_tiles_f4, min_tiles_f2):
    """(algorithm, why) by the Winograd rule, or (None, why not)."""
    _, _, _, _, _, (n, cin, h, w), wshape, _, _, _, _, winograd = key
    if not winograd:
        return None, ("Winograd off (FASTUNET_WINOGRAD=0)" if not settings.current().winograd
                      else "no AVX-512 Winograd kernel on this CPU/build")
    if wshape[2] != 3:
        return None, f"{wshape[2]}x{wshape[3]} kernel: Winograd is for 3x3"
    if min(cin, wshape[0]) < WINOGRAD_MIN_CHANNELS:
        return None, f"fewer than {WINOGRAD_MIN_CHANNELS} channels"
    tiles4 = n * ((h + 3) // 4) * ((w + 3) // 4)
    if tiles4 >= min_tiles_f4:
        return WINOGRAD_F4, f"{tiles4} 4x4 tiles >= {min_tiles_f4}"
    tiles2 = n * ((h + 1) // 2) * ((w + 1) // 2)
    if min_tiles_f2 and tiles2 >= min_tiles_f2:
        return WINOGRAD_F2, f"{tiles2} 2x2 tiles >= {min_tiles_f2}"
    return None, f"too few tiles ({tiles4} of 4x4)"


@functools.lru_cache(maxsize=4096)
def _inference_plan(key):
    not_eligible = _same_cpu_fp32(key)
    if not_eligible is None:
        algorithm, why = _winograd_rule(key, WINOGRAD_F4_MIN_TILES, WINOGRAD_F2_MIN_TILES)
        if algorithm is not None:
            return _library(algorithm, why)
    else:
        why = not_eligible
    device, xdt, wdt, packed = key[:4]
    if (device == "cpu" and _ONEDNN
            and (packed or (xdt == torch.float32 and wdt == torch.float32))):
        return _library(ONEDNN, why)
    return _library(ATEN, why)


# the native CPU kernel calls mkldnn::_convolution_pointwise where the build has it
_ONEDNN = (_native.LOADED and torch.backends.mkldnn.is_available()
           and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


@functools.lru_cache(maxsize=4096)
def _training_plan(key, has_bias):
    why = _same_cpu_fp32(key) or ("conv bias" if has_bias else None)
    if why is not None:
        return _library(ATEN, why)
    (n, _, h, w), wshape = key[5], key[6]
    rows = n * h * w
    weight_numel = wshape[0] * wshape[1] * wshape[2] * wshape[3]
    if rows <= GEMM_ROWS:
        return ConvPlan(GEMM, GEMM, GEMM, f"{rows} output pixels <= {GEMM_ROWS}")
    wgrad_gemm = rows <= GEMM_WGRAD_ROWS and weight_numel >= GEMM_WGRAD_NUMEL
    algorithm, why = _winograd_rule(key, WINOGRAD_TRAIN_MIN_TILES, 0)
    main = algorithm or ATEN
    if wgrad_gemm:
        return ConvPlan(main, main, GEMM, f"{why}; weight gradient: {rows} output pixels <= "
                                          f"{GEMM_WGRAD_ROWS} on a {weight_numel}-value weight")
    return ConvPlan(main, main, main, why)


def _cached(fn, *args):
    # torch.compile traces the rule itself (its guards then cover the shape)
    return fn.__wrapped__(*args) if torch.compiler.is_compiling() else fn(*args)


def inference_plan(x, weight, stride, padding, dilation, groups):
    """The plan of ``relu(conv2d(x, weight) + bias)`` in an eval-mode fused block (weight folded,
    dense or oneDNN-packed). Its gradients, if ever asked for, are ATen's."""
    return _cached(_inference_plan, _key(x, weight, stride, padding, dilation, groups))


def training_plan(x, weight, bias, stride, padding, dilation, groups):
    """The plan of the convolution in the fused training op (x and weight already in the
    convolution's dtype)."""
    return _cached(_training_plan, _key(x, weight, stride, padding, dilation, groups),
                   bias is not None)


def train_fused_default(model, device):
    """``--fused auto``: whether the fused training kernels train ``model`` on ``device``.

    The device's default from :mod:`fastunet.defaults`: on CUDA the plain modules; on CPU the
    fused kernels for full-width backbones (``base_channels`` >= 64, the published configs) and
    the plain modules for narrower ones such as the synthetic default, whose blocks are too
    small for the fused kernels' savings to outweigh their fixed per-block costs.
    """
    kind = torch.device(device).type
    width = getattr(getattr(model, "backbone", None), "base_channels", 0)
    narrow = kind == "cpu" and width < CPU_FUSED_TRAIN_MIN_BASE_CHANNELS
    return defaults.custom_default("fused_training_narrow" if narrow else "fused_training", kind)


CPU_FUSED_TRAIN_MIN_BASE_CHANNELS = 64  # narrower backbones train faster unfused on CPU


# UNet-S5-D16's 3x3 convolutions (in, out, size at a 64x64 window) for describe()
_UNET_LAYERS = [(3, 64, 64), (64, 64, 64), (64, 128, 32), (128, 128, 32), (128, 256, 16),
                (256, 256, 16), (256, 512, 8), (512, 512, 8), (512, 1024, 4), (1024, 1024, 4),
                (1024, 512, 8), (512, 256, 16), (256, 128, 32), (128, 64, 64)]


def describe(batch_inference=8, batch_training=4):
    """The plan of every UNet-S5-D16 3x3 layer on this CPU (64x64 windows), as text lines."""
    lines = [f"CPU convolutions of UNet-S5-D16 (float32, channels_last, 64x64 windows; "
             f"rules: fastunet/conv_plan.py):",
             f"  {'layer':>16}  {f'inference (batch {batch_inference})':<24}"
             f"training (batch {batch_training}): forward / grad input / grad weight"]
    with torch._subclasses.fake_tensor.FakeTensorMode():  # shapes only, no memory
        for cin, cout, size in _UNET_LAYERS:
            w = torch.empty(cout, cin, 3, 3)
            geom = ([1, 1], [1, 1], [1, 1], 1)
            xi = torch.empty(batch_inference, cin, size, size).to(
                memory_format=torch.channels_last)
            xt = torch.empty(batch_training, cin, size, size).to(
                memory_format=torch.channels_last)
            inf = inference_plan(xi, w, *geom[:3], 1).forward
            tr = training_plan(xt, w, None, *geom)
            lines.append(f"  {f'{cin}->{cout} @{size}x{size}':>16}  {inf:<24}"
                         f"{tr.forward} / {tr.grad_input} / {tr.grad_weight}")
    if not _WINOGRAD["enabled"]:
        lines.append("  no Winograd here: " + (
            "FASTUNET_WINOGRAD=0" if not settings.current().winograd
            else "no AVX-512 Winograd kernel on this CPU/build"))
    return lines
