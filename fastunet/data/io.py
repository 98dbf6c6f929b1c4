"""Robust image reading and atomic PNG writing (Pillow + numpy only).

Every image that enters fastunet (datasets, converters, the predict CLI) goes through
``read_image`` (-> HxWx3 uint8 RGB) or ``read_label`` (-> HxW uint8). Conversions:

- 8-bit RGB: as is. Grayscale, 1-bit, palette: expanded to RGB (lossless, no warning).
- RGBA / LA / PA: alpha dropped; warns when the alpha channel is not fully opaque.
- CMYK, YCbCr, LAB, HSV: converted by Pillow to RGB, with a warning (colours are approximate).
- 16-bit (PNG, TIFF; gray or colour): scaled to 8 bits by rounding ``v * 255 / 65535``, not by
  dropping the low byte, with a warning. 32-bit integer and float images (no declared range):
  values within 0..255 are kept; integers up to 65535 are scaled as 16 bit, floats in [0, 1] by
  255; anything else fails.
- EXIF orientation is applied, as OpenCV's ``imread`` (and so mmcv) does.
- gzip-compressed files (STARE's ``.ppm.gz``) are decompressed transparently.
- Multi-frame files (GIF, TIFF): the first frame.

``read_label`` keeps single-channel values as they are (a palette image gives its palette
*indices*, as mmseg's annotation loader does, unless its palette is grayscale, e.g. a GIF mask
saved as black/white: then the gray levels). Colour labels give their first channel when the
channels agree and otherwise their luminance (with a warning). A 16-bit label whose values all fit
8 bits keeps them (class indices); otherwise it is scaled as above.

Pillow opens files lazily; the decode is forced here so a truncated file fails in ``read_*``
with an ``ImageReadError`` naming it, not later in a worker process. An image larger than
``max_pixels`` (default :data:`MAX_PIXELS`, 100 megapixels: HRF's images have 8.2;
:func:`set_max_pixels` changes it for the process, as ``--max-pixels`` does) is refused
from its header, before it is decoded, with an :class:`ImageTooLargeError`; this replaces
Pillow's own decompression-bomb limit, so the limit is one number, explicit and adjustable.
"""
import gzip
import io
import os
import threading
import warnings
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageReadError", "ImageTooLargeError", "ImageConversionWarning", "read_image",
           "read_label", "decode_image", "decode_label", "write_png", "MAX_PIXELS",
           "set_max_pixels", "check_pixels"]

_GZIP_MAGIC = b"\x1f\x8b"
# the default limit of read_* / decode_*: far above the largest retinal images (HRF 3504 x 2336),
# low enough that a tiny file declaring a huge image cannot silently take minutes or gigabytes
MAX_PIXELS = 100_000_000
_LIMIT = {"pixels": MAX_PIXELS}  # the process-wide limit, set_max_pixels changes it
_PIL_LIMIT = threading.Lock()  # Pillow's limit is a module global: swapped under a lock


class ImageReadError(ValueError):
    """An image file is missing, empty, truncated or not an image; the message names the file."""


class ImageTooLargeError(ImageReadError):
    """An image has more pixels than the limit (``--max-pixels`` / ``max_pixels=``)."""


def set_max_pixels(max_pixels):
    """Set the limit that every read and decode applies by default (0: none; the CLIs'
    ``--max-pixels``); returns a function that restores the previous one."""
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 0:
        raise ValueError(f"max_pixels must be an integer >= 0, got {max_pixels!r}")
    before, _LIMIT["pixels"] = _LIMIT["pixels"], max_pixels

    def restore():
        _LIMIT["pixels"] = before
    return restore


def check_pixels(height, width, name, max_pixels=None):
    """ImageTooLargeError when height x width exceeds ``max_pixels`` (None: the process-wide
    limit, :data:`MAX_PIXELS` unless :func:`set_max_pixels` changed it; 0: no limit)."""
    limit = _LIMIT["pixels"] if max_pixels is None else int(max_pixels)
    if limit > 0 and height * width > limit:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} pixels ({height * width / 1e6:.3g} megapixels) is above "
            f"the limit of {limit / 1e6:g} megapixels; raise it (--max-pixels N, or "
            f"max_pixels=N in Python; 0 for no limit) if the image is genuine")


class ImageConversionWarning(UserWarning):
    """An image was converted lossily (16 bit to 8 bit, alpha dropped, CMYK to RGB)."""


def _warn(name, what):
    warnings.warn(f"{name}: {what}", ImageConversionWarning, stacklevel=4)


def _open(data, name, max_pixels=None):
    """Decode bytes fully (not lazily) into a PIL image; errors become ImageReadError."""
    if not data:
        raise ImageReadError(f"{name}: file is empty (0 bytes)")
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ImageReadError(f"{name}: corrupt gzip stream ({e})") from None
        if not data:
            raise ImageReadError(f"{name}: gzip stream holds an empty file")
    try:
        with _PIL_LIMIT:  # our own limit below replaces Pillow's decompression-bomb check
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(io.BytesIO(data))  # reads the header only
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        check_pixels(img.height, img.width, name, max_pixels)
        img.load()  # force the decode: truncated data fails here
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"{name}: not an image file (or a format Pillow cannot read)"
                             ) from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{name}: cannot decode image ({e}); if you trust the file, raise "
                             f"PIL.Image.MAX_IMAGE_PIXELS") from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as e:
        raise ImageReadError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    if img.width == 0 or img.height == 0:
        raise ImageReadError(f"{name}: image has zero size ({img.width}x{img.height})")
    return img, data


def _read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a directory, not an image file") from None
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read file ({e.strerror or e})") from None


def _orientation(img):
    """EXIF orientation tag (1 = upright); a broken EXIF block counts as upright."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:
        return 1
    return value if value in range(1, 9) else 1


def _orient(a, orientation):
    """Apply an EXIF orientation to an HxW[xC] array, as cv2.imread does by default."""
    if orientation == 1:
        # Pillow's buffers are read-only; callers get an array they own
        return a if a.flags.writeable and a.flags.c_contiguous else np.array(a, order="C")
    swap = lambda x: np.swapaxes(x, 0, 1)
    op = {2: lambda x: x[:, ::-1], 3: lambda x: x[::-1, ::-1], 4: lambda x: x[::-1],
          5: swap, 6: lambda x: np.rot90(x, -1), 7: lambda x: swap(x[::-1, ::-1]),
          8: lambda x: np.rot90(x, 1)}[orientation]
    return np.ascontiguousarray(op(a))


def _scale16(a):
    """uint16-range integers -> uint8, rounded: v * 255 / 65535 (not v >> 8)."""
    a = a.astype(np.uint32)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _tile_rawmode(t):
    """The raw mode of a decoder tile (a named tuple in recent Pillow, a plain tuple before)."""
    args = t.args if hasattr(t, "args") else t[3]
    return args if isinstance(args, str) else args[0]


def _swap_endian_rawmode(img):
    """Re-decode a 16-bit colour image with the byte order swapped, which yields its low bytes."""
    tiles = []
    for t in img.tile:
        args = t.args if hasattr(t, "args") else t[3]
        raw = _tile_rawmode(t)
        if raw.endswith(";16B"):
            swapped = raw[:-1] + "L"
        elif raw.endswith(";16L"):
            swapped = raw[:-1] + "B"
        else:
            return None
        new_args = swapped if isinstance(args, str) else (swapped,) + tuple(args[1:])
        tiles.append(t._replace(args=new_args) if hasattr(t, "_replace")
                     else (t[0], t[1], t[2], new_args))
    img.tile = tiles
    return img


def _colour16(data):
    """Full 16-bit samples of a 16-bit RGB/RGBA file, or None (Pillow keeps only the high byte)."""
    try:
        raws = [_tile_rawmode(t) for t in Image.open(io.BytesIO(data)).tile]
        if not raws or not all(isinstance(r, str) and r.endswith((";16B", ";16L")) for r in raws):
            return None
        hi_img = Image.open(io.BytesIO(data))
        hi_img.load()
        lo_img = _swap_endian_rawmode(Image.open(io.BytesIO(data)))
        if lo_img is None:
            return None
        lo_img.load()
        hi, lo = np.asarray(hi_img), np.asarray(lo_img)
    except Exception:  # an exotic layout: fall back to Pillow's 8-bit decode
        return None
    return hi.astype(np.uint16) * 256 + lo if hi.shape == lo.shape else None


def _to_rgb(img, data, name):
    mode = img.mode
    if mode in ("RGB", "RGBA"):
        full = _colour16(data)
        if full is not None:
            _warn(name, "16-bit colour image scaled to 8 bits")
            if mode == "RGBA" and full[..., 3].min() < 65535:
                _warn(name, "RGBA image: alpha channel dropped (image not fully opaque)")
            return _scale16(full[..., :3])
    if mode == "RGB":
        return np.asarray(img)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if np.asarray(img.getchannel("A")).min() < 255:
            _warn(name, f"{mode} image: alpha channel dropped (image not fully opaque)")
        if mode == "RGBA":
            return np.asarray(img)[..., :3]
        if mode in ("LA", "La"):
            return np.asarray(img.getchannel("L").convert("RGB"))
        return np.asarray(img.convert("RGBA"))[..., :3]
    if mode in ("1", "L", "P"):
        return np.asarray(img.convert("RGB"))
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        _warn(name, f"{mode} image converted to RGB (colours approximate)")
        return np.asarray(img.convert("RGB"))
    gray = _wide_gray(img, name)
    if gray is not None:
        return np.repeat(gray[..., None], 3, axis=2)
    try:
        rgb = np.asarray(img.convert("RGB"))
    except Exception as e:
        raise ImageReadError(f"{name}: unsupported image mode {mode!r} ({e})") from None
    _warn(name, f"unusual image mode {mode!r} converted to RGB by Pillow")
    return rgb


def _wide_gray(img, name, keep_small=False):
    """16/32-bit integer or float grayscale -> uint8 (None for other modes).

    16-bit files are scaled from 0..65535 (keep_small: kept when all values fit 8 bits, as label
    class indices). 32-bit integer and float images carry no declared range: values within
    0..255 are kept, integers up to 65535 are scaled as 16 bit, floats in [0, 1] are scaled by 255.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.int64)
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise ImageReadError(f"{name}: 32-bit image with values outside 0..65535 "
                                 f"({lo}..{hi}); convert it to 8 or 16 bits first")
        if hi <= 255 and (keep_small or mode == "I"):
            return a.astype(np.uint8)
        _warn(name, f"{'32' if mode == 'I' else '16'}-bit image scaled to 8 bits")
        return _scale16(a)
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 255:
            raise ImageReadError(f"{name}: float image with values outside [0, 255]; "
                                 "convert it to 8-bit first")
        if a.max() <= 1:
            _warn(name, "float image in [0, 1] scaled to 8 bits")
            a = a * 255
        return np.rint(a).astype(np.uint8)
    return None


def decode_image(data, name="<bytes>", max_pixels=None):
    """Bytes of an image file -> HxWx3 uint8 RGB (see the module docstring for conversions)."""
    img, data = _open(data, name, max_pixels)
    return _orient(np.asarray(_to_rgb(img, data, name), dtype=np.uint8), _orientation(img))


def decode_label(data, name="<bytes>", max_pixels=None):
    """Bytes of a label/mask file -> HxW uint8 raw values (see the module docstring)."""
    img, data = _open(data, name, max_pixels)
    mode = img.mode
    if mode == "L":
        out = np.asarray(img)
    elif mode == "1":
        out = np.asarray(img).astype(np.uint8) * 255
    elif mode in ("P", "PA"):
        idx = np.asarray(img.convert("P") if mode == "PA" else img)
        pal = np.asarray(img.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
        used = np.unique(idx)
        if len(pal) > used.max() and (pal[used, 0] == pal[used, 1]).all() \
                and (pal[used, 1] == pal[used, 2]).all():
            out = pal[idx, 0]  # grayscale palette: the gray levels the file displays
        else:
            out = idx  # class-index palette image (mmseg's annotation convention)
    elif mode in ("LA", "La"):
        out = np.asarray(img.getchannel("L"))
    else:
        gray = _wide_gray(img, name, keep_small=True)
        if gray is not None:
            out = gray
        else:
            rgb = _to_rgb(img, data, name)
            if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
                out = rgb[..., 0]
            else:
                _warn(name, "colour label with differing channels reduced to luminance")
                out = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("L"))
    return _orient(np.asarray(out, dtype=np.uint8), _orientation(img))


def read_image(path, max_pixels=None):
    """Read an image file as HxWx3 uint8 RGB; raises ImageReadError naming the file."""
    return decode_image(_read_bytes(path), str(path), max_pixels)


def read_label(path, max_pixels=None):
    """Read a label/mask file as HxW uint8 raw values; raises ImageReadError naming the file."""
    return decode_label(_read_bytes(path), str(path), max_pixels)


def write_png(path, array, compress_level=6, text=None):
    """Write a uint8 HxW, HxWx3 (RGB) or HxWx4 array as PNG atomically
    (:func:`fastunet.atomic.atomic_write`); ``text``: {key: value} stored as PNG text chunks."""
    from PIL.PngImagePlugin import PngInfo

    from ..atomic import atomic_write

    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.dtype != np.uint8:
        raise ValueError(f"write_png({path}): expected uint8 data, got {a.dtype}")
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))):
        raise ValueError(f"write_png({path}): expected HxW, HxWx3 or HxWx4, got shape {a.shape}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    with atomic_write(path) as f:
        Image.fromarray(np.ascontiguousarray(a)).save(f, format="PNG", pnginfo=info,
                                                      compress_level=compress_level)
