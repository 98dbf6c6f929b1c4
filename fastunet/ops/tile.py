"""Sliding-window tile ops: typed wrappers, fake (meta) kernels and autograd.

``tile_extract`` cuts mmseg's window grid (``tile_reference.window_starts``) out of images;
``tile_aggregate`` puts window outputs back, averaging where windows overlap. Each is the other's adjoint, so each one's
backward is the other op (double backward works too). Without the native library the wrappers
run ``tile_reference``.
"""
import torch

from .. import _native
from . import tile_reference as ref


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


EPILOGUES = ("none", "softmax", "argmax")


def tile_aggregate(tiles, batch, height, width, stride, weight=None, normalize=True,
                   epilogue="none", out=None):
    """Average (or sum) window outputs into full images, optionally fusing softmax or argmax.

    tiles: (batch * grid_h * grid_w, C, th, tw), windows in row-major grid order per image, the
    window no larger than the image; stride: int or (sh, sw); weight: optional (th, tw) per-pixel
    window weights (e.g. ``gaussian_weight``); normalize: divide by the summed weights (the
    window count when unweighted). epilogue: "none" -> (batch, C, height, width) in the tiles'
    dtype; "softmax" -> class probabilities of that, same shape (differentiable); "argmax" ->
    uint8 (batch, height, width) labels of the average (normalize ignored; first class on ties).
    Uncovered pixels are 0 (softmax 1/C, argmax 0).

    out: optional contiguous tensor of exactly that shape, dtype and device, written in place
    and returned (not differentiable). Reusing one across same-size images saves the page
    faults of a fresh output, which on the CPU cost as much as the aggregation itself.
    """
    sh, sw = _pair(stride)
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if out is not None:
        _refuse_autograd(out, tiles, weight)
    if _native.use_native(tiles):
        if out is not None:  # the op checks out against what the allocating form returns
            torch.ops.fastunet.tile_aggregate_into(tiles, batch, height, width, sh, sw, weight,
                                                   normalize, epilogue, out=out)
            return out
        if epilogue == "argmax":
            return torch.ops.fastunet.tile_aggregate_argmax(tiles, batch, height, width, sh, sw,
                                                            weight)
        return torch.ops.fastunet.tile_aggregate(tiles, batch, height, width, sh, sw, weight,
                                                 normalize, epilogue == "softmax")
    ref.check_grid(height, width, tiles.shape[-2], tiles.shape[-1], sh, sw)
    if out is not None:
        _check_reference_out(out, tiles, batch, height, width, epilogue)
    return ref.tile_aggregate(tiles, batch, height, width, sh, sw, weight, normalize, epilogue,
                              out=out)


def _refuse_autograd(out, tiles, weight):
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a tensor or None, got {type(out).__name__}")
    if torch.is_grad_enabled() and (tiles.requires_grad or out.requires_grad
                                    or (weight is not None and weight.requires_grad)):
        raise RuntimeError("tile_aggregate(out=...) is not differentiable; call it without out= "
                           "(or under torch.no_grad()) when gradients are needed")


def _out_problem(out, tiles, batch, height, width, epilogue):
    """Why out= is not what tile_aggregate returns for these arguments (None when it is): the
    reference path's check, and the fake kernel's."""
    if epilogue == "argmax":
        shape, dtype = (batch, height, width), torch.uint8
    else:
        shape, dtype = (batch, tiles.shape[1], height, width), tiles.dtype
    if out.device != tiles.device:
        return (f"out is on {out.device} but the tiles are on {tiles.device}; pass an out on "
                "the tiles' device")
    if out.dtype != dtype:
        return f"out must be {dtype}, got {out.dtype}"
    if tuple(out.shape) != shape:
        return f"out must have shape {shape}, got {tuple(out.shape)}"
    if not out.is_contiguous():
        return (f"out must be contiguous (NCHW), got strides {out.stride()}; pass a fresh "
                "tensor or a .contiguous() one")
    return None


def _check_reference_out(out, tiles, batch, height, width, epilogue):
    problem = _out_problem(out, tiles, batch, height, width, epilogue)
    if problem:
        raise RuntimeError(f"tile_aggregate: {problem}")


def tile_extract(image, tile_size, stride, weight=None, normalize=False):
    """Cut (N, C, H, W) images into (N * grid_h * grid_w, C, th, tw) windows (mmseg's grid).

    With weight/normalize it is the exact adjoint of tile_aggregate with the same arguments.
    """
    th, tw = _pair(tile_size)
    sh, sw = _pair(stride)
    if _native.use_native(image):
        return torch.ops.fastunet.tile_extract(image, th, tw, sh, sw, weight, normalize)
    ref.check_grid(image.shape[-2], image.shape[-1], th, tw, sh, sw)
    return ref.tile_extract(image, th, tw, sh, sw, weight, normalize)


if _native.LOADED:

    def _check_aggregate_args(tiles, batch, height, width, stride_h, stride_w):
        torch._check(tiles.dim() == 4, lambda: f"tiles must be 4-D, got {tiles.shape}")
        torch._check(tiles.shape[2] <= height and tiles.shape[3] <= width,
                     lambda: "window must fit in the image")
        gh = ref.window_count(height, tiles.shape[2], stride_h)
        gw = ref.window_count(width, tiles.shape[3], stride_w)
        torch._check(tiles.shape[0] == batch * gh * gw,
                     lambda: f"expected {batch * gh * gw} windows, got {tiles.shape[0]}")

    @torch.library.register_fake("fastunet::tile_aggregate")
    def _tile_aggregate_fake(tiles, batch, height, width, stride_h, stride_w, weight=None,
                             normalize=True, softmax=False):
        _check_aggregate_args(tiles, batch, height, width, stride_h, stride_w)
        return tiles.new_empty((batch, tiles.shape[1], height, width))

    @torch.library.register_fake("fastunet::tile_aggregate_argmax")
    def _tile_aggregate_argmax_fake(tiles, batch, height, width, stride_h, stride_w, weight=None):
        _check_aggregate_args(tiles, batch, height, width, stride_h, stride_w)
        torch._check(1 <= tiles.shape[1] <= 256, lambda: "argmax needs 1 to 256 channels")
        return tiles.new_empty((batch, height, width), dtype=torch.uint8)

    @torch.library.register_fake("fastunet::tile_aggregate_into")
    def _tile_aggregate_into_fake(tiles, batch, height, width, stride_h, stride_w, weight=None,
                                  normalize=True, epilogue="none", *, out):
        _check_aggregate_args(tiles, batch, height, width, stride_h, stride_w)
        torch._check(epilogue in EPILOGUES, lambda: f"epilogue must be one of {EPILOGUES}")
        if epilogue == "argmax":
            torch._check(1 <= tiles.shape[1] <= 256, lambda: "argmax needs 1 to 256 channels")
        problem = _out_problem(out, tiles, batch, height, width, epilogue)
        torch._check(problem is None, lambda: f"tile_aggregate: {problem}")

    @torch.library.register_fake("fastunet::tile_extract")
    def _tile_extract_fake(image, tile_h, tile_w, stride_h, stride_w, weight=None,
                           normalize=False):
        torch._check(image.dim() == 4, lambda: f"image must be 4-D, got {image.shape}")
        n, c, h, w = image.shape
        torch._check(tile_h <= h and tile_w <= w, lambda: "window must fit in the image")
        count = n * ref.window_count(h, tile_h, stride_h) * ref.window_count(w, tile_w, stride_w)
        return image.new_empty((count, c, tile_h, tile_w))

    def _aggregate_setup(ctx, inputs, output):
        tiles, _, _, _, sh, sw, weight, normalize, softmax = inputs
        ctx.args = (tiles.shape[2], tiles.shape[3], sh, sw, normalize, softmax)
        ctx.save_for_backward(weight, output if softmax else None)

    def _aggregate_backward(ctx, grad):
        th, tw, sh, sw, normalize, softmax = ctx.args
        weight, probs = ctx.saved_tensors
        if softmax:  # d softmax: p * (g - <g, p>) over the classes
            grad = probs * (grad - (grad * probs).sum(dim=1, keepdim=True))
        grad_tiles = torch.ops.fastunet.tile_extract(grad, th, tw, sh, sw, weight, normalize)
        return grad_tiles, None, None, None, None, None, None, None, None

    def _extract_setup(ctx, inputs, output):
        image, _, _, sh, sw, weight, normalize = inputs
        ctx.args = (image.shape[0], image.shape[2], image.shape[3], sh, sw, normalize)
        ctx.save_for_backward(weight)

    def _extract_backward(ctx, grad):
        n, h, w, sh, sw, normalize = ctx.args
        (weight,) = ctx.saved_tensors
        grad_image = torch.ops.fastunet.tile_aggregate(grad, n, h, w, sh, sw, weight, normalize)
        return grad_image, None, None, None, None, None, None

    torch.library.register_autograd("fastunet::tile_aggregate", _aggregate_backward,
                                    setup_context=_aggregate_setup)
    torch.library.register_autograd("fastunet::tile_extract", _extract_backward,
                                    setup_context=_extract_setup)
