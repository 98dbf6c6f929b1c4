"""fastunet.data.io: conversions to 8-bit RGB / labels, clear read errors, atomic PNG writes."""
import gzip
import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from fastunet.data import io as fio
from fastunet.data.io import (ImageConversionWarning, ImageReadError, decode_image, decode_label,
                              read_image, read_label, write_png)

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)


def enc(im, fmt, **kw):
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def png16(arr):
    """A 16-bit RGB (or RGBA) PNG with Sub-filtered rows, written by hand (Pillow cannot)."""
    h, w, c = arr.shape
    rows = []
    for y in range(h):
        r = arr[y].astype(">u2").tobytes()
        bpp = 2 * c
        rows.append(b"\x01" + bytes((r[i] - (r[i - bpp] if i >= bpp else 0)) & 255
                                    for i in range(len(r))))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    ctype = {3: 2, 4: 6}[c]
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def tiff16rgb(arr):
    """An uncompressed little-endian 16-bit RGB TIFF."""
    h, w, _ = arr.shape
    data = arr.astype("<u2").tobytes()
    n, ifd = 9, 8
    bps = ifd + 2 + n * 12 + 4
    off = bps + 6
    e = lambda tag, typ, cnt, val: struct.pack("<HHII", tag, typ, cnt, val)
    ents = [e(256, 4, 1, w), e(257, 4, 1, h), e(258, 3, 3, bps), e(259, 3, 1, 1), e(262, 3, 1, 2),
            e(273, 4, 1, off), e(277, 3, 1, 3), e(278, 4, 1, h), e(279, 4, 1, len(data))]
    return (b"II*\x00" + struct.pack("<I", ifd) + struct.pack("<H", n) + b"".join(ents)
            + b"\0\0\0\0" + struct.pack("<HHH", 16, 16, 16) + data)


def scaled(v):
    return ((v.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)


def no_warning(fn, *a):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageConversionWarning)
        return fn(*a)


def test_rgb_png_roundtrip_exact_and_writable():
    out = no_warning(decode_image, enc(Image.fromarray(RGB), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (6, 9, 3) and np.array_equal(out, RGB)
    out[0, 0] = 1  # callers own the array


@pytest.mark.parametrize("mode", ["L", "1", "P"])
def test_gray_bilevel_palette_expand_to_rgb_without_warning(mode):
    im = Image.fromarray(RGB).convert(mode)
    out = no_warning(decode_image, enc(im, "PNG"))
    assert np.array_equal(out, np.asarray(im.convert("RGB")))


def test_16bit_gray_is_scaled_by_rounding_not_truncation():
    v = np.array([[0, 255, 256, 32767], [32768, 65280, 65534, 65535]], np.uint16)
    with pytest.warns(ImageConversionWarning, match="16-bit"):
        out = decode_image(enc(Image.fromarray(v), "PNG"), "g16.png")
    assert np.array_equal(out[..., 0], scaled(v))
    assert out[0, 1, 0] == 1 and out[1, 1, 0] == 254  # truncation (>> 8) would give 0 and 255


def test_16bit_colour_png_and_tiff_are_scaled_from_all_16_bits():
    v = RNG.integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    v[0, 0] = (255, 65280, 65535)
    for data in (png16(v), tiff16rgb(v)):
        with pytest.warns(ImageConversionWarning, match="16-bit colour"):
            out = decode_image(data, "c16")
        assert np.array_equal(out, scaled(v))
    rgba = np.concatenate([v, np.full((5, 7, 1), 65535, np.uint16)], axis=2)
    with pytest.warns(ImageConversionWarning):
        assert np.array_equal(decode_image(png16(rgba)), scaled(v))


def test_alpha_dropped_warns_only_when_not_opaque():
    rgba = np.concatenate([RGB, np.full((6, 9, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(no_warning(decode_image, enc(Image.fromarray(rgba), "PNG")), RGB)
    rgba[0, 0, 3] = 10
    with pytest.warns(ImageConversionWarning, match="alpha"):
        assert np.array_equal(decode_image(enc(Image.fromarray(rgba), "PNG")), RGB)
    la = Image.fromarray(RGB[..., 0]).convert("LA")
    out = no_warning(decode_image, enc(la, "PNG"))
    assert np.array_equal(out, np.repeat(RGB[..., :1], 3, axis=2))


def test_cmyk_converts_with_warning():
    cmyk = Image.fromarray(RGB).convert("CMYK")
    with pytest.warns(ImageConversionWarning, match="CMYK"):
        out = decode_image(enc(cmyk, "JPEG", quality=100), "cmyk.jpg")
    assert out.shape == (6, 9, 3)
    assert np.abs(out.astype(int) - RGB).mean() < 40  # JPEG + CMYK round trip: approximate


def test_exif_orientation_applied_like_opencv():
    im = Image.fromarray(RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = enc(im, "PNG", exif=exif)
        expect = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        assert np.array_equal(decode_image(data), expect), orientation


def test_gzip_transparent():
    assert np.array_equal(decode_image(gzip.compress(enc(Image.fromarray(RGB), "PPM"))), RGB)


def test_errors_name_the_file(tmp_path):
    good = enc(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    cases = {
        "trunc.png": good[: len(good) // 2],
        "trunc.jpg": enc(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
                         "JPEG")[:300],
        "empty.png": b"",
        "text.png": b"this is not an image",
        "bad.ppm.gz": b"\x1f\x8b" + b"garbage",
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        for reader in (read_image, read_label):
            with pytest.raises(ImageReadError, match=name.replace(".", r"\.")):
                reader(p)
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)
    assert issubclass(ImageReadError, ValueError)


def test_read_label_palette_gray_vs_index():
    mask = (RNG.random((6, 9)) < 0.5).astype(np.uint8)
    # a GIF of a black/white mask stores a grayscale palette: we get the gray levels
    assert np.array_equal(decode_label(enc(Image.fromarray(mask * 255), "GIF")), mask * 255)
    # a class-index PNG with a colour palette (mmseg's annotation convention): the indices
    p = Image.fromarray(mask, "P")
    p.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    assert np.array_equal(decode_label(enc(p, "PNG")), mask)


def test_read_label_colour_and_16bit():
    m = (RNG.random((6, 9)) < 0.5).astype(np.uint8) * 255
    gray_rgb = enc(Image.fromarray(np.stack([m] * 3, 2)), "PNG")
    assert np.array_equal(no_warning(decode_label, gray_rgb), m)
    colour = np.stack([m, m // 2, m // 3], 2)
    with pytest.warns(ImageConversionWarning, match="luminance"):
        out = decode_label(enc(Image.fromarray(colour), "PNG"))
    assert np.array_equal(out, np.asarray(Image.fromarray(colour).convert("L")))
    small = (m // 255).astype(np.uint16)  # 16-bit class indices are kept
    assert np.array_equal(no_warning(decode_label, enc(Image.fromarray(small), "PNG")), m // 255)
    big = m.astype(np.uint16) * 257
    with pytest.warns(ImageConversionWarning):
        assert np.array_equal(decode_label(enc(Image.fromarray(big), "PNG")), m)
    assert np.array_equal(decode_label(enc(Image.fromarray(m > 0), "PNG")), m)  # 1-bit


def test_write_png_roundtrip_and_no_temp_left(tmp_path):
    for arr in (RGB, RGB[..., 0], RGB[..., 0] > 100,
                np.concatenate([RGB, RGB[..., :1]], axis=2)):
        p = tmp_path / "x.png"
        write_png(p, arr)
        back = np.asarray(Image.open(p))
        assert np.array_equal(back, arr.astype(np.uint8) if arr.dtype == bool else arr)
    assert os.listdir(tmp_path) == ["x.png"]
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "y.png", RGB.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        write_png(tmp_path / "y.png", RGB[None])


def test_write_png_is_atomic_when_interrupted(tmp_path, monkeypatch):
    p = tmp_path / "x.png"
    write_png(p, RGB)
    before = p.read_bytes()

    def broken_save(self, fp, *a, **k):
        fp.write(b"\x89PNG half")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        write_png(p, RGB[..., 0])
    assert p.read_bytes() == before  # the old file is intact, never half-written
    assert os.listdir(tmp_path) == ["x.png"]
    with pytest.raises(KeyboardInterrupt):
        write_png(tmp_path / "new.png", RGB)
    assert not (tmp_path / "new.png").exists()


def test_written_files_honour_umask(tmp_path):
    write_png(tmp_path / "x.png", RGB)
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "x.png").stat().st_mode & 0o777 == 0o666 & ~mask


def test_swap_endian_helper_rejects_8bit():
    assert fio._colour16(enc(Image.fromarray(RGB), "PNG")) is None
