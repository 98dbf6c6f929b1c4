"""Pure-PyTorch references of the tile ops and of the inference they serve, written plainly.

``slide_inference`` is mmseg's sliding-window loop itself (one window per forward, each added
to full-size logits); ``tile_extract`` / ``tile_aggregate`` are the same windows and the same
average as two ops. They define what the native kernels and the inference engine must compute:
the tests and benchmarks compare against them, and the ops run them when the native kernels
are unavailable.
"""
import torch
import torch.nn.functional as F


def window_count(size, tile, stride):
    """Number of windows along one axis, as mmseg counts them: ceil((size - tile) / stride) + 1,
    and one window (clipped to the image) when the window is larger than the image."""
    return max(size - tile + stride - 1, 0) // stride + 1


def window_starts(size, tile, stride):
    """Window starts along one axis: i*stride, the last moved back to end at the border."""
    return [min(i * stride, size - tile) for i in range(window_count(size, tile, stride))]


def slide_inference(fn, images, crop_size, stride):
    """mmseg's ``slide_inference``, verbatim: windows at multiples of the stride, the last one
    moved back to end at the border, clipped to the image where the crop is larger; each
    window's logits ``fn(window)`` zero-padded to the full image and added; the sum divided by
    how many windows cover each pixel. One window per forward: the faithful, slow reference.
    crop_size, stride: (h, w) pairs or ints."""
    h_crop, w_crop = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    h_stride, w_stride = (stride, stride) if isinstance(stride, int) else stride
    batch_size, _, h_img, w_img = images.size()
    preds = None
    count_mat = images.new_zeros((batch_size, 1, h_img, w_img))
    with torch.no_grad():
        for h_idx in range(window_count(h_img, h_crop, h_stride)):
            for w_idx in range(window_count(w_img, w_crop, w_stride)):
                y1 = h_idx * h_stride
                x1 = w_idx * w_stride
                y2 = min(y1 + h_crop, h_img)
                x2 = min(x1 + w_crop, w_img)
                y1 = max(y2 - h_crop, 0)
                x1 = max(x2 - w_crop, 0)
                crop_seg_logit = fn(images[:, :, y1:y2, x1:x2])
                if preds is None:
                    preds = images.new_zeros((batch_size, crop_seg_logit.shape[1], h_img, w_img))
                preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1),
                                                int(preds.shape[2] - y2)))
                count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


def _acc(t):
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _normaliser(height, width, tile_h, tile_w, stride_h, stride_w, weight, device, dtype):
    w = torch.ones(tile_h, tile_w, device=device, dtype=dtype) if weight is None else weight.to(dtype)
    norm = torch.zeros(height, width, device=device, dtype=dtype)
    for y in window_starts(height, tile_h, stride_h):
        for x in window_starts(width, tile_w, stride_w):
            norm[y:y + tile_h, x:x + tile_w] += w
    return norm


def tile_aggregate(tiles, batch, height, width, stride_h, stride_w, weight=None, normalize=True,
                   epilogue="none", out=None):
    """(batch*gh*gw, C, th, tw) windows -> (batch, C, height, width) weighted average (or sum).

    epilogue "softmax" returns the softmax over C of that; "argmax" the uint8 (batch, height,
    width) class index of the average (normalize is ignored: argmax always averages). out: a
    tensor of the result's shape and dtype to copy the result into and return.
    """
    result = _aggregate(tiles, batch, height, width, stride_h, stride_w, weight, normalize,
                        epilogue)
    return result if out is None else out.copy_(result)


def _aggregate(tiles, batch, height, width, stride_h, stride_w, weight, normalize, epilogue):
    _, channels, tile_h, tile_w = tiles.shape
    acc = _acc(tiles)
    ys, xs = window_starts(height, tile_h, stride_h), window_starts(width, tile_w, stride_w)
    if tiles.shape[0] != batch * len(ys) * len(xs):
        raise RuntimeError(f"expected {batch * len(ys) * len(xs)} windows, got {tiles.shape[0]}")
    grid = acc.reshape(batch, len(ys), len(xs), channels, tile_h, tile_w)
    if weight is not None:
        grid = grid * weight.to(acc.dtype)
    out = acc.new_zeros(batch, channels, height, width)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            out[:, :, y:y + tile_h, x:x + tile_w] += grid[:, i, j]
    if normalize or epilogue == "argmax":
        norm = _normaliser(height, width, tile_h, tile_w, stride_h, stride_w, weight, out.device,
                           out.dtype)
        out = torch.where(norm > 0, out / norm.clamp_min(torch.finfo(out.dtype).tiny), 0.0)
    if epilogue == "argmax":
        return out.argmax(1).to(torch.uint8)
    if epilogue == "softmax":
        out = torch.softmax(out, dim=1)
    elif epilogue != "none":
        raise ValueError(f"epilogue must be 'none', 'softmax' or 'argmax', got {epilogue!r}")
    return out.to(tiles.dtype)


def tile_extract(image, tile_h, tile_w, stride_h, stride_w, weight=None, normalize=False):
    """(N, C, H, W) -> (N*gh*gw, C, th, tw) windows; the adjoint of tile_aggregate."""
    batch, channels, height, width = image.shape
    acc = _acc(image)
    if normalize:
        norm = _normaliser(height, width, tile_h, tile_w, stride_h, stride_w, weight, acc.device,
                           acc.dtype)
        acc = torch.where(norm > 0, acc / norm.clamp_min(torch.finfo(acc.dtype).tiny), 0.0)
    ys, xs = window_starts(height, tile_h, stride_h), window_starts(width, tile_w, stride_w)
    windows = [acc[:, :, y:y + tile_h, x:x + tile_w] for y in ys for x in xs]
    out = torch.stack(windows, dim=1).reshape(batch * len(ys) * len(xs), channels, tile_h, tile_w)
    if weight is not None:
        out = out * weight.to(acc.dtype)
    return out.to(image.dtype)


def gaussian_weight(tile_size, sigma_scale=1.0 / 8, dtype=torch.float32, device=None):
    """Gaussian importance map (th, tw) for weighted aggregation: separable, centred, sigma =
    sigma_scale * window extent (1/8 as nnU-Net and MONAI use), peak 1.

    Weighting the windows so that their centres count more than their borders removes most of
    the seams between windows (border pixels see less context).
    """
    th, tw = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
    if th < 1 or tw < 1 or sigma_scale <= 0:
        raise ValueError(f"gaussian_weight needs a positive window size and sigma_scale, got "
                         f"{tile_size!r} and {sigma_scale!r}")

    def axis(n):
        r = torch.arange(n, dtype=torch.float64, device=device) - (n - 1) / 2
        return torch.exp(-0.5 * (r / (sigma_scale * n)) ** 2)

    return (axis(th)[:, None] * axis(tw)[None, :]).to(dtype)


def check_grid(height, width, tile_h, tile_w, stride_h, stride_w):
    """The native kernels' argument checks, for the reference path (same RuntimeError)."""
    if stride_h <= 0 or stride_w <= 0:
        raise RuntimeError(f"stride must be positive, got {stride_h}x{stride_w}")
    if not (1 <= tile_h <= height and 1 <= tile_w <= width):
        raise RuntimeError(f"window ({tile_h}x{tile_w}) must be non-empty and fit in the image "
                           f"({height}x{width}); clip the window to the image first")
