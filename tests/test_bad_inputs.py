"""Bad input, one table per CLI / function family: each case gives its exit status (or exception),
one clear line on stderr (never a traceback), and nothing partial on disk.

Conversions that are meaningful (grayscale, RGBA, CMYK, 16-bit) succeed with a warning.
"""
import io
import os
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import fastunet
from fastunet import convert, predict
from fastunet.data import synthetic
from fastunet.data.io import ImageReadError, read_image, write_png
from fastunet.models import apply_overrides, build_segmentor, get_config, save_checkpoint

CONFIG = "synthetic"
HAS_CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------ fixtures

def _png_with_size(width, height):
    """A PNG whose header declares width x height (0 is invalid in PNG, as a scanner may write)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Files for the tables: a good checkpoint, broken ones, images of every awkward kind."""
    d = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    good = save_checkpoint(d / "good.pth", build_segmentor(get_config(CONFIG)))
    data = open(good, "rb").read()
    (d / "truncated.pth").write_bytes(data[:len(data) // 2])
    (d / "empty.pth").write_bytes(b"")
    (d / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"epoch": 3}, d / "no_weights.pth")
    other = apply_overrides(get_config("pspnet_unet_s5-d16_64x64_40k_drive"), [
        "model.backbone.base_channels=2", "model.decode_head.in_channels=2",
        "model.auxiliary_head.in_channels=4"])
    save_checkpoint(d / "other_model.pth", build_segmentor(other))
    (d / "ckpt_dir").mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    write_png(d / "rgb.png", rgb)
    png = open(d / "rgb.png", "rb").read()
    (d / "truncated.png").write_bytes(png[:len(png) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("not an image")
    (d / "zero_size.png").write_bytes(_png_with_size(0, 10))
    (d / "huge_header.png").write_bytes(_png_with_size(12000, 12000))  # 144 MP in 60 bytes
    Image.fromarray(rgb[..., 1]).save(d / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 90, np.uint8)])).save(d / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(d / "gray16.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "one_pixel.png")
    (d / "no_images").mkdir()
    (d / "no_images" / "notes.txt").write_text("x")
    (d / "a_file").write_text("x")
    return d


def run_cli(main, argv, capsys):
    """(exit status, stderr) of a CLI's main(argv), argparse's SystemExit included."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


def error_lines(err, prog):
    """stderr lines that report a problem (warnings and the final summary excluded)."""
    return [line for line in err.splitlines() if line.strip()
            and not line.startswith((f"{prog}: warning:", f"{prog}: wrote ", f"{prog}: note:"))]


def assert_clean(err, prog, expect_error):
    assert "Traceback" not in err, err
    lines = error_lines(err, prog)
    if expect_error:
        assert len(lines) == 1, f"expected one error line, got:\n{err}"
    else:
        assert lines == [], err


def assert_nothing_partial(folder):
    """No temporary leftovers; every file present is a complete, readable image."""
    if not os.path.exists(folder):
        return
    for root, _, files in os.walk(folder):
        for name in files:
            assert not name.endswith(".tmp") and not name.startswith("."), name
            read_image(os.path.join(root, name))


# ------------------------------------------------------------------------------ predict CLI

def _predict_argv(fx, out, inputs=("rgb.png",), checkpoint="good.pth", config=CONFIG, extra=()):
    return ([str(fx / i) for i in inputs] + ["--config", config, "--checkpoint",
                                            str(fx / checkpoint), "--out-dir", str(out),
                                            "--quiet"] + list(extra))


# (id, argv keyword arguments, exit status, text the one line must contain, warning text)
PREDICT_CASES = [
    ("missing checkpoint", dict(checkpoint="nope.pth"), 2, "does not exist", None),
    ("checkpoint is a folder", dict(checkpoint="ckpt_dir"), 2, "is a folder", None),
    ("truncated checkpoint", dict(checkpoint="truncated.pth"), 2, "truncated or corrupt", None),
    ("empty checkpoint", dict(checkpoint="empty.pth"), 2, "the file is empty", None),
    ("not a checkpoint", dict(checkpoint="random.pth"), 2, "not a readable PyTorch", None),
    ("checkpoint without weights", dict(checkpoint="no_weights.pth"), 2, "no state_dict", None),
    ("checkpoint of another model", dict(checkpoint="other_model.pth"), 2,
     "does not match the model", None),
    ("misspelt config", dict(config="fcn_unet_s5-d16_64x64_40k_driv"), 2,
     "did you mean 'fcn_unet_s5-d16_64x64_40k_drive'", None),
    ("--device cuda without CUDA", dict(extra=["--device", "cuda"]), 2, "use cpu", None),
    ("--device cuda:7", dict(extra=["--device", "cuda:7"]), 2, "cuda:7", None),
    ("--device unknown", dict(extra=["--device", "tpu9"]), 2, "unknown device", None),
    ("--window-batch 0", dict(extra=["--window-batch", "0"]), 2, ">= 1", None),
    ("--tile-size 0", dict(extra=["--mode", "overlap-tile", "--tile-size", "0"]), 2,
     "tile_size", None),
    ("--tile-size negative", dict(extra=["--mode", "overlap-tile", "--tile-size", "-32"]), 2,
     "tile_size", None),
    ("--margin negative", dict(extra=["--mode", "overlap-tile", "--margin", "-1"]), 2,
     "margin", None),
    ("--precision unknown", dict(extra=["--precision", "int8"]), 2, "invalid choice", None),
    ("--out-dir is a file", dict(extra=["--out-dir", "{fx}/a_file"]), 2, "not a folder", None),
    ("missing image", dict(inputs=["nope.png"]), 2, "no such file", None),
    ("folder without images", dict(inputs=["no_images"]), 2, "no images found", None),
    ("truncated image", dict(inputs=["truncated.png"]), 1, "truncated", None),
    ("empty image file", dict(inputs=["empty.png"]), 1, "file is empty", None),
    ("not an image", dict(inputs=["text.png"]), 1, "not an image file", None),
    ("zero-size image", dict(inputs=["zero_size.png"]), 1, "zero_size.png", None),
    ("one-pixel image", dict(inputs=["one_pixel.png"]), 0, None, None),
    ("grayscale image", dict(inputs=["gray.png"]), 0, None, "gray.png: grayscale image"),
    ("RGBA image", dict(inputs=["rgba.png"]), 0, None, "alpha channel dropped"),
    ("CMYK image", dict(inputs=["cmyk.jpg"]), 0, None, "CMYK image converted"),
    ("16-bit image", dict(inputs=["gray16.png"]), 0, None, "16-bit image scaled"),
    ("one bad among good", dict(inputs=["rgb.png", "truncated.png"]), 1, "truncated", None),
    ("image above the pixel limit", dict(inputs=["huge_header.png"]), 1,
     "12000x12000 pixels (144 megapixels) is above the limit of 100 megapixels", None),
    ("--max-pixels below the image", dict(extra=["--max-pixels", "1000"]), 1,
     "above the limit of 0.001 megapixels", None),
    ("--max-pixels negative", dict(extra=["--max-pixels", "-1"]), 2, "--max-pixels must be >= 0",
     None),
]


@pytest.mark.parametrize("case, kw, status, message, warning", PREDICT_CASES,
                         ids=[c[0] for c in PREDICT_CASES])
def test_predict_cli(case, kw, status, message, warning, fx, tmp_path, capsys):
    if HAS_CUDA and "without CUDA" in case:
        pytest.skip("this machine has CUDA")
    if HAS_CUDA and case == "--device cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    out = tmp_path / "out"
    kw = dict(kw)
    extra = [e.replace("{fx}", str(fx)) for e in kw.pop("extra", [])]
    if "--out-dir" in extra:
        i = extra.index("--out-dir")
        out = extra[i + 1]
    argv = _predict_argv(fx, out, **kw, extra=extra + ["--device", "cpu"]
                         if "--device" not in extra else extra)
    code, err = run_cli(predict.main, argv, capsys)
    assert code == status, err
    assert_clean(err, "fastunet.predict", expect_error=message is not None)
    if message:
        assert message in error_lines(err, "fastunet.predict")[0], err
    if warning:
        assert f"fastunet.predict: warning: " in err and warning in err, err
    if status == 2:  # refused before any work: no output folder
        assert not os.path.isdir(out) or not os.listdir(out)
    if status == 0:
        stem = kw["inputs"][0].rsplit(".", 1)[0]
        mask = read_image(os.path.join(out, f"{stem}_mask.png"))
        assert mask.shape[:2] == Image.open(fx / kw["inputs"][0]).size[::-1]
    assert_nothing_partial(out) if os.path.isdir(str(out)) else None


def test_clis_exit_in_one_line_as_processes(fx, tmp_path):
    """The real processes (as a user runs them): exit status, one line, no traceback."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    runs = [
        (["fastunet.predict"] + _predict_argv(fx, tmp_path / "o", checkpoint="truncated.pth"),
         2, "truncated or corrupt"),
        (["fastunet.convert", "drive", str(fx / "rgb.png"), "-o", str(tmp_path / "D")], 1,
         "not a zip or tar"),
        (["fastunet.data", "write", str(fx / "a_file"), "--num-training", "1"], 1,
         "exists and is not empty"),
    ]
    for argv, status, message in runs:
        proc = subprocess.run([sys.executable, "-m"] + argv, capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == status, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, \
            proc.stderr


# ------------------------------------------------------------------------------ convert CLI

@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    from test_convert import _zip, drive_archives, replace_with_deflated_zeros

    d = tmp_path_factory.mktemp("archives")
    good = drive_archives(d)
    few = d / "few"
    few.mkdir()
    short = drive_archives(few, n_train=3)
    bad = d / "bad"
    bad.mkdir()
    data = open(good[0], "rb").read()
    (bad / "truncated.zip").write_bytes(data[:len(data) // 3])
    (bad / "empty.zip").write_bytes(b"")
    (bad / "random.zip").write_bytes(np.random.default_rng(1).bytes(3000))
    _zip(bad / "other.zip", {"readme.txt": b"hello"})
    corrupt = d / "corrupt"
    corrupt.mkdir()
    import zipfile
    with zipfile.ZipFile(good[0]) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["training/images/21_training.tif"] = b"II*\x00garbage"
    _zip(corrupt / "training.zip", members)
    out = {"good": good, "short": short, "bad": bad, "corrupt": [str(corrupt / "training.zip"),
                                                                 good[1]], "dir": d}
    member = "training/images/21_training.tif"
    with zipfile.ZipFile(good[0]) as z:
        originals = {n: z.read(n) for n in z.namelist()}
    for name in ("huge", "dup", "bomb"):
        (d / name).mkdir()
        path = _zip(d / name / "training.zip", dict(originals, **{
            member: _png_with_size(12000, 12000)}) if name == "huge" else originals)
        if name == "dup":  # the same member twice inside one archive
            with zipfile.ZipFile(path, "a") as z, pytest.warns(UserWarning, match="Duplicate"):
                z.writestr(member, originals[member])
        if name == "bomb":  # the image replaced by a member that inflates to 256 MiB
            replace_with_deflated_zeros(path, member, 256 << 20)
        out[name] = [path, good[1]]
    os.mkdir(d / "renamed")
    out["renamed"] = [str(d / "renamed" / "drive-train-v2.zip"), str(d / "renamed" / "t.zip")]
    for src, dst in zip(short, out["renamed"]):
        os.link(src, dst)
    return out


CONVERT_CASES = [
    ("missing archive", lambda a: ["drive", str(a["dir"] / "nope.zip")], 1, "no such file"),
    ("archive is a folder", lambda a: ["drive", str(a["bad"])], 1, "is a folder"),
    ("empty archive", lambda a: ["drive", str(a["bad"] / "empty.zip")], 1, "file is empty"),
    ("not an archive", lambda a: ["drive", str(a["bad"] / "random.zip")], 1, "not a zip or tar"),
    ("truncated archive", lambda a: ["drive", str(a["bad"] / "truncated.zip")], 1,
     "download it again"),
    ("wrong archive", lambda a: ["drive", str(a["bad"] / "other.zip")], 1,
     "contains none of the expected files"),
    ("wrong image count", lambda a: ["drive", *a["short"]], 1, "expected 20 DRIVE training"),
    ("corrupt member image", lambda a: ["drive", *a["corrupt"]], 1, "unreadable image"),
    ("unknown dataset", lambda a: ["drivee", *a["good"]], 2, "invalid choice"),
    ("member inflating to 256 MiB", lambda a: ["drive", *a["bomb"]], 1,
     "member training/images/21_training.tif declares 268435456 bytes, more than any image"),
    ("member declaring a huge image", lambda a: ["drive", *a["huge"]], 1,
     "21_training.tif: 12000x12000 pixels (144 megapixels) is above the limit"),
    ("duplicate member inside an archive", lambda a: ["drive", *a["dup"]], 1,
     "duplicate member inside {dup}"),
    ("the archive given is named", lambda a: ["drive", *a["renamed"]], 1,
     "expected 20 DRIVE training images in {renamed}, found 3"),
]


@pytest.mark.parametrize("case, args, status, message", CONVERT_CASES,
                         ids=[c[0] for c in CONVERT_CASES])
def test_convert_cli(case, args, status, message, archives, tmp_path, capsys):
    out = tmp_path / "DRIVE"
    code, err = run_cli(convert.main, args(archives) + ["-o", str(out), "-q"], capsys)
    assert code == status, err
    assert_clean(err, "fastunet.convert", expect_error=True)
    assert message.format(**{k: v[0] for k, v in archives.items()
                             if isinstance(v, list)}) in err, err
    assert not out.exists()  # never a partial root
    assert os.listdir(tmp_path) == []  # nor a temporary one


def test_convert_cli_output_side(archives, tmp_path, capsys):
    good = archives["good"]
    (tmp_path / "file").write_text("x")
    # -o is a file; -o inside a file; -o an unrelated non-empty folder
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    for out, status, message in ((tmp_path / "file", 1, "not a directory"),
                                 (tmp_path / "file" / "DRIVE", 1, "cannot write"),
                                 (tmp_path / "other", 1, "--overwrite")):
        code, err = run_cli(convert.main, ["drive", *good, "-o", str(out), "-q"], capsys)
        assert code == status and message in err, err
        assert_clean(err, "fastunet.convert", expect_error=True)
    assert (tmp_path / "file").read_text() == "x"
    assert os.listdir(tmp_path / "other") == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["file", "other"]


# ------------------------------------------------------------------------------ data CLI

DATA_CASES = [
    ("--num-training 0", lambda d: ["write", str(d / "S"), "--num-training", "0"], 2, ">= 1"),
    ("--size 0 10", lambda d: ["write", str(d / "S"), "--size", "0", "10"], 2, "at least 32"),
    ("--size negative", lambda d: ["baseline", "--size", "-5", "64"], 2, "at least 32"),
    ("root exists", lambda d: ["write", str(d / "full"), "--num-training", "1",
                               "--num-validation", "1", "--size", "32", "32"], 1,
     "exists and is not empty"),
    ("unknown action", lambda d: ["wirte", str(d / "S")], 2, "invalid choice"),
]


@pytest.mark.parametrize("case, args, status, message", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_data_cli(case, args, status, message, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code, err = run_cli(synthetic.main, args(tmp_path), capsys)
    assert code == status and message in err, err
    assert_clean(err, "python -m fastunet.data", expect_error=True)
    assert not (tmp_path / "S").exists()
    assert sorted(os.listdir(tmp_path)) == ["full"]


# ------------------------------------------------------------------------------ library functions

@pytest.fixture(scope="module")
def predictor(fx):
    return fastunet.Predictor(CONFIG, fx / "good.pth", device="cpu")


def _folder_root(tmp, images, masks, mask_values=(0, 255)):
    for split_dir, names in (("images", images), ("masks", masks)):
        os.makedirs(tmp / split_dir / "training", exist_ok=True)
        for n in names:
            arr = (np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
                   if split_dir == "images" else
                   np.random.default_rng(1).choice(mask_values, (16, 16)).astype(np.uint8))
            write_png(tmp / split_dir / "training" / f"{n}.png", arr)
    return tmp


def _vessel_root(tmp, images, labels, label_values=(0, 1)):
    for kind, names in (("images", images), ("annotations", labels)):
        os.makedirs(tmp / kind / "training", exist_ok=True)
        for n in names:
            arr = (np.zeros((16, 16, 3), np.uint8) if kind == "images" else
                   np.random.default_rng(2).choice(label_values, (16, 16)).astype(np.uint8))
            name = f"{n}.png" if kind == "images" else f"{n}_manual1.png"
            write_png(tmp / kind / "training" / name, arr)
    return tmp


def _with_pixel_limit(limit, call):
    from fastunet.data.io import set_max_pixels

    restore = set_max_pixels(limit)
    try:
        return call()
    finally:
        restore()


def _engine(**kw):
    from fastunet.inference import InferenceEngine
    return InferenceEngine(lambda x: x[:, :2], **kw)


# (id, call(fx, predictor, tmp), exception, message regex)
LIBRARY_CASES = [
    ("get_config misspelt", lambda f, p, t: get_config("fcn_unet_s5-d16_64x64_40k_driv"),
     KeyError, "did you mean 'fcn_unet_s5-d16_64x64_40k_drive'"),
    ("override misspelt key", lambda f, p, t: apply_overrides(
        get_config(CONFIG), ["train.max_iter=4"]), KeyError, "did you mean 'train.max_iters'"),
    ("model misspelt keyword", lambda f, p, t: build_segmentor(apply_overrides(
        get_config(CONFIG), ["model.backbone.base_channel=4"])), ValueError,
     "did you mean 'model.backbone.base_channels'"),
    ("model zero classes", lambda f, p, t: build_segmentor(apply_overrides(
        get_config(CONFIG), ["model.decode_head.num_classes=0"])), ValueError,
     "'model.decode_head.num_classes' must be a positive integer"),
    ("model negative width", lambda f, p, t: build_segmentor(apply_overrides(
        get_config(CONFIG), ["model.backbone.base_channels=-4"])), ValueError,
     "must be a positive integer"),
    ("model zero test stride", lambda f, p, t: build_segmentor(apply_overrides(
        get_config(CONFIG), ["model.test_cfg.stride=(0, 42)"])), ValueError,
     "'model.test_cfg.stride' must be a positive"),
    ("override without =", lambda f, p, t: apply_overrides(get_config(CONFIG), ["train.lr"]),
     ValueError, "key.subkey=value"),
    ("load_checkpoint other model", lambda f, p, t: fastunet.load_checkpoint(
        build_segmentor(get_config(CONFIG)), f / "other_model.pth"), ValueError,
     "does not match the model"),
    ("load_checkpoint truncated", lambda f, p, t: fastunet.load_checkpoint(
        build_segmentor(get_config(CONFIG)), f / "truncated.pth"), RuntimeError,
     "truncated or corrupt"),
    ("load_checkpoint missing", lambda f, p, t: fastunet.load_checkpoint(
        build_segmentor(get_config(CONFIG)), f / "nope.pth"), FileNotFoundError, "not found"),
    ("Predictor cuda:7", lambda f, p, t: fastunet.Predictor(CONFIG, device="cuda:7"),
     ValueError, "cuda:7"),
    ("Predictor unknown device", lambda f, p, t: fastunet.Predictor(CONFIG, device="gpu"),
     ValueError, "unknown device"),
    ("Predictor zero crop", lambda f, p, t: fastunet.Predictor(CONFIG, device="cpu",
                                                               crop_size=0, stride=4),
     ValueError, "crop_size"),
    ("Predictor negative stride", lambda f, p, t: fastunet.Predictor(
        CONFIG, device="cpu", crop_size=64, stride=-42), ValueError, "stride must be positive"),
    ("Predictor crop not /16", lambda f, p, t: fastunet.Predictor(
        CONFIG, device="cpu", crop_size=60, stride=40), ValueError, "multiple of"),
    ("Predictor negative tile", lambda f, p, t: fastunet.Predictor(
        CONFIG, device="cpu", mode="overlap-tile", tile_size=-16), ValueError, "tile_size"),
    ("Predictor bad precision", lambda f, p, t: fastunet.Predictor(CONFIG, precision="fp8"),
     ValueError, "precision"),
    ("predict zero-size array", lambda f, p, t: p.predict(np.zeros((0, 10, 3), np.uint8)),
     ValueError, "empty"),
    ("predict 2-channel array", lambda f, p, t: p.predict(np.zeros((10, 10, 2), np.uint8)),
     ValueError, "HxWx3"),
    ("predict NaN float image", lambda f, p, t: p.predict(np.full((10, 10, 3), np.nan)),
     ValueError, "outside"),
    ("predict negative int image", lambda f, p, t: p.predict(np.full((10, 10), -3)),
     ValueError, "outside 0..255"),
    ("predict missing path", lambda f, p, t: p.predict(str(f / "nope.png")), ImageReadError,
     "no such file"),
    ("predict array above the pixel limit", lambda f, p, t: _with_pixel_limit(
        400, lambda: p.predict(np.zeros((30, 20, 3), np.uint8))), ValueError,
     "image: 20x30 pixels .* is above the limit of 0.0004 megapixels"),
    ("predict file above the pixel limit", lambda f, p, t: p.predict(str(f / "huge_header.png")),
     ImageReadError, "huge_header.png: 12000x12000 pixels"),
    ("read_image huge header", lambda f, p, t: read_image(f / "huge_header.png"),
     ImageReadError, "above the limit of 100 megapixels"),
    ("read_image truncated", lambda f, p, t: read_image(f / "truncated.png"), ImageReadError,
     "truncated"),
    ("read_image not an image", lambda f, p, t: read_image(f / "text.png"), ImageReadError,
     "not an image file"),
    ("read_image zero size", lambda f, p, t: read_image(f / "zero_size.png"), ImageReadError,
     "zero_size.png"),
    ("folder dataset mismatched lists", lambda f, p, t: fastunet.data.build_dataset(
        "folder", _folder_root(t, ["a", "b"], ["a", "c"]), "training"), ValueError,
     "do not pair up"),
    ("folder dataset mask values", lambda f, p, t: fastunet.data.build_dataset(
        "folder", _folder_root(t, ["a"], ["a"], (0, 7, 9)), "training")[0], ValueError,
     "not a binary mask"),
    ("drive root image without label", lambda f, p, t: fastunet.data.build_dataset(
        "drive", _vessel_root(t, ["21", "22"], ["21"]), "training"), FileNotFoundError,
     "have no label"),
    ("drive root label without image", lambda f, p, t: fastunet.data.build_dataset(
        "drive", _vessel_root(t, ["21"], ["21", "22"]), "training"), ValueError,
     "have no image"),
    ("drive root label values", lambda f, p, t: fastunet.data.build_dataset(
        "drive", _vessel_root(t, ["21"], ["21"], (0, 128)), "training")[0], ValueError,
     "not class indices"),
    ("dataset unknown split", lambda f, p, t: fastunet.data.build_dataset("drive", t, "test"),
     ValueError, "split must be one of"),
    ("SegMetric float labels", lambda f, p, t: fastunet.metrics.SegMetric().update(
        np.zeros((4, 4), np.float32), np.zeros((4, 4), np.int64)), TypeError, "integer"),
    ("SegMetric shape mismatch", lambda f, p, t: fastunet.metrics.SegMetric().update(
        np.zeros((4, 4), int), np.zeros((4, 5), int)), ValueError, "shape"),
    ("engine zero crop", lambda f, p, t: _engine(mode="slide", crop_size=0, stride=4),
     ValueError, "crop_size must be positive"),
    ("engine zero stride", lambda f, p, t: _engine(mode="slide", crop_size=16, stride=(0, 4)),
     ValueError, "stride must be positive"),
    ("engine raw pixels without normalize", lambda f, p, t: _engine(mode="whole")(
        torch.zeros(1, 3, 16, 16, dtype=torch.uint8)), ValueError, "normalize"),
]


@pytest.mark.parametrize("case, call, exc, message", LIBRARY_CASES,
                         ids=[c[0] for c in LIBRARY_CASES])
def test_library_functions(case, call, exc, message, fx, predictor, tmp_path):
    if HAS_CUDA and case == "Predictor cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(exc, match=message.replace("(", r"\(").replace("+", r"\+")) as info:
        call(fx, predictor, tmp_path)
    text = str(info.value.args[0]) if isinstance(info.value, KeyError) else str(info.value)
    assert "\n" not in text.strip() and len(text) > 10


def test_segmetric_warns_about_unexpected_label_values():
    metric = fastunet.metrics.SegMetric()
    with pytest.warns(RuntimeWarning, match=r"label values \[128\]"):
        metric.update(np.zeros((4, 4), int), np.array([[0, 1, 128, 255]] * 4))
    assert metric.compute()["aAcc"] == pytest.approx(100 * 4 / 8)  # 128 counts as no class


# ------------------------------------------------------------------------------ train / test CLIs

@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """A tiny DRIVE-layout root, and broken copies of it; a weights-only checkpoint."""
    import shutil

    from fastunet.data import write_synthetic
    from trainkit import tiny_model

    d = tmp_path_factory.mktemp("roots")
    good = write_synthetic(d / "DRIVE", num_training=2, num_validation=1, size=(64, 64))
    out = {"good": good, "dir": d}
    for name in ("orphan_label", "train_values", "val_values", "missing_label"):
        shutil.copytree(good, d / name)
        out[name] = str(d / name)
    first = lambda folder: os.path.join(folder, sorted(os.listdir(folder))[0])
    os.remove(first(d / "orphan_label" / "images" / "training"))
    os.remove(first(d / "missing_label" / "annotations" / "validation"))
    stripes = (np.arange(64 * 64).reshape(64, 64) % 3 * 100).astype(np.uint8)  # 0/100/200
    write_png(first(d / "train_values" / "annotations" / "training"), stripes)
    write_png(first(d / "val_values" / "annotations" / "validation"), stripes)
    cfg = apply_overrides(get_config("fcn_unet_s5-d16_64x64_40k_drive"), tiny_model(2))
    torch.manual_seed(0)
    out["weights"] = save_checkpoint(d / "weights.pth", build_segmentor(cfg))
    data = open(out["weights"], "rb").read()
    (d / "truncated.pth").write_bytes(data[:len(data) // 2])
    (d / "a_file").write_text("x")
    _damaged_resume_checkpoints(out, d)
    return out


def _damaged_resume_checkpoints(out, d):
    """A real 1-iteration training checkpoint and copies of it, each with one part of the
    training state damaged (out['resume <name>'])."""
    from fastunet import train as train_cli
    from trainkit import tiny_model

    work = d / "run"
    assert train_cli.main(["--config", "fcn_unet_s5-d16_64x64_40k_drive", "--data-root",
                           out["good"], "--max-iters", "1", "--batch-size", "2", "--workers",
                           "0", "--work-dir", str(work), "--cfg-options", *tiny_model(2)]) == 0
    good = torch.load(work / "latest.pth", weights_only=False)  # our own file: trusted
    momentum = good["optimizer"]["state"][0]["momentum_buffer"]

    def with_momentum(value):
        return lambda ck: ck["optimizer"]["state"][0].update(momentum_buffer=value)

    damage = {
        "best a list": lambda ck: ck["meta"].update(best=[0.5]),
        "negative iteration": lambda ck: ck["meta"].update(iteration=-1),
        "huge iteration": lambda ck: ck["meta"].update(iteration=10 ** 18),
        "momentum of another shape": with_momentum(momentum.flatten()[:5].clone()),
        "momentum a string": with_momentum("abc"),
        "momentum expanded": with_momentum(torch.zeros(1).expand(momentum.shape)),
        "momentum NaN": with_momentum(torch.full_like(momentum, float("nan"))),
        "weights NaN": lambda ck: next(iter(ck["state_dict"].values())).fill_(float("nan")),
        "momentum setting a string": lambda ck: ck["optimizer"]["param_groups"][0].update(
            momentum="0.9"),
        "random states a string": lambda ck: ck.update(rng="x"),
    }
    import copy
    for name, change in damage.items():
        ck = copy.deepcopy(good)
        change(ck)
        path = d / f"resume_{name.replace(' ', '_')}.pth"
        torch.save(ck, path)
        out[f"resume {name}"] = str(path)


def _train_argv(r, work, *extra, root="good", opts=()):
    from trainkit import tiny_model

    return ["--config", "fcn_unet_s5-d16_64x64_40k_drive", "--data-root", r[root],
            "--max-iters", "1", "--batch-size", "2", "--workers", "0", "--work-dir", str(work),
            *extra, "--cfg-options", *tiny_model(2), *opts]


D = lambda r: r["dir"]
# (id, extra arguments(roots), exit status, message, extra --cfg-options); later flags win
TRAIN_CASES = [
    ("misspelt config", lambda r: ["--config", "fcn_unet_s5-d16_64x64_40k_driv"], 2,
     "did you mean", ()),
    ("--max-iters 0", lambda r: ["--max-iters", "0"], 2, "must be positive", ()),
    ("--batch-size -2", lambda r: ["--batch-size", "-2"], 2, "batch size", ()),
    ("--workers -1", lambda r: ["--workers", "-1"], 2, "--workers must be >= 0", ()),
    ("--log-interval 0", lambda r: ["--log-interval", "0"], 2, "--log-interval must be >= 1",
     ()),
    ("--device cuda without CUDA", lambda r: ["--device", "cuda"], 2, "use cpu", ()),
    ("--device cuda:7", lambda r: ["--device", "cuda:7"], 2, "cuda:7", ()),
    ("--device unknown", lambda r: ["--device", "npu"], 2, "unknown device", ()),
    ("--amp fp16 on CPU", lambda r: ["--amp", "fp16", "--device", "cpu"], 2, "CUDA GPUs", ()),
    ("--amp unknown", lambda r: ["--amp", "fp8"], 2, "invalid choice", ()),
    ("--cfg-options without =", lambda r: [], 2, "key.subkey=value", ["train.lr"]),
    ("--cfg-options misspelt", lambda r: [], 2, "did you mean 'train.lr'", ["train.lrr=1"]),
    ("--cfg-options bad value", lambda r: [], 2, "'train.lr' must be a positive number",
     ["train.lr=abc"]),
    ("zero crop", lambda r: [], 2, "'data.crop_size' must be a positive", ["data.crop_size=0"]),
    ("negative crop", lambda r: [], 2, "'data.crop_size' must be", ["data.crop_size=(-64,64)"]),
    ("zero test stride", lambda r: [], 2, "'model.test_cfg.stride' must be a positive",
     ["model.test_cfg.stride=(0,0)"]),
    ("misspelt model key", lambda r: [], 2, "did you mean 'model.backbone.base_channels'",
     ["model.backbone.base_channel=4"]),
    ("missing data root", lambda r: ["--data-root", str(D(r) / "nope")], 2, "does not exist",
     ()),
    ("label without image", lambda r: ["--data-root", r["orphan_label"]], 2, "have no image",
     ()),
    ("image without label", lambda r: ["--data-root", r["missing_label"]], 2, "have no label",
     ()),
    ("training label values", lambda r: ["--data-root", r["train_values"]], 1,
     "not class indices", ()),
    ("validation label values", lambda r: ["--data-root", r["val_values"]], 1,
     "not class indices", ()),
    ("--load-from truncated", lambda r: ["--load-from", str(D(r) / "truncated.pth")], 2,
     "truncated or corrupt", ()),
    ("--load-from a folder", lambda r: ["--load-from", str(D(r))], 2, "is a folder", ()),
    ("--load-from another model", lambda r: ["--load-from", r["weights"]], 2,
     "does not match the model", ["model.backbone.base_channels=4",
                                  "model.decode_head.in_channels=4"]),
    ("--resume without checkpoint", lambda r: ["--resume"], 2, "--resume: no checkpoint", ()),
    ("--resume weights only", lambda r: ["--resume", r["weights"]], 2, "holds weights only",
     ()),
    ("--resume truncated", lambda r: ["--resume", str(D(r) / "truncated.pth")], 2,
     "truncated or corrupt", ()),
    ("--work-dir is a file", lambda r: ["--work-dir", str(D(r) / "a_file")], 2,
     "is not a folder", ()),
    # sizes that cannot fit, counts that would take years, a class count the loss cannot train
    ("synthetic images too big", lambda r: ["--config", "synthetic"], 2,
     "config key 'data.image_size' = (100000, 100000): generating one synthetic image of it "
     "needs at least", ["data.image_size=(100000,100000)"]),
    ("crop too big for memory", lambda r: [], 2, "config key 'data.crop_size' = (100000, "
     "100000): a training step on it needs at least", ["data.crop_size=(100000,100000)"]),
    ("rescale too big for memory", lambda r: [], 2, "config key 'data.img_scale'",
     ["data.img_scale=(100000,100000)"]),
    ("one class", lambda r: [], 2, "'model.decode_head.num_classes' is 1, but the data has 2 "
     "classes", ["model.decode_head.num_classes=1"]),
    ("a billion synthetic images", lambda r: ["--config", "synthetic"], 2,
     "config key 'data.num_train' = 1000000000: the synthetic images are generated before "
     "training, at least", ["data.num_train=1000000000"]),
    # resumed training states that load but would break at the first step
    ("resume best a list", lambda r: ["--resume", r["resume best a list"]], 2,
     "meta.best is [0.5]", ()),
    ("resume negative iteration", lambda r: ["--resume", r["resume negative iteration"]], 2,
     "meta.iteration is -1", ()),
    ("resume huge iteration", lambda r: ["--resume", r["resume huge iteration"]], 2,
     "meta.iteration is 1000000000000000000, beyond this run's 1 iterations", ()),
    ("resume momentum of another shape", lambda r: [
        "--resume", r["resume momentum of another shape"]], 2,
     "optimizer state[0]['momentum_buffer'] has shape (5,), its parameter (2, 3, 3, 3)", ()),
    ("resume momentum a string", lambda r: ["--resume", r["resume momentum a string"]], 2,
     "optimizer state[0]['momentum_buffer'] is a str, not a tensor", ()),
    ("resume momentum expanded", lambda r: ["--resume", r["resume momentum expanded"]], 2,
     "has strides (0, 0, 0, 0) that share elements", ()),
    ("resume momentum NaN", lambda r: ["--resume", r["resume momentum NaN"]], 2,
     "optimizer state[0]['momentum_buffer'] holds NaN", ()),
    ("resume weights NaN", lambda r: ["--resume", r["resume weights NaN"]], 2,
     "holds NaN or infinite values", ()),
    ("resume momentum setting a string", lambda r: [
        "--resume", r["resume momentum setting a string"]], 2,
     "optimizer param_groups[0]['momentum'] is '0.9'", ()),
    ("resume random states a string", lambda r: ["--resume", r["resume random states a string"]],
     2, "rng is 'x'", ()),
]


@pytest.mark.parametrize("case, extra, status, message, opts", TRAIN_CASES,
                         ids=[c[0] for c in TRAIN_CASES])
def test_train_cli(case, extra, status, message, opts, roots, tmp_path, capsys, monkeypatch):
    from fastunet import train as train_cli
    from trainkit import tiny_model

    if HAS_CUDA and ("without CUDA" in case or "on CPU" in case):
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("FASTUNET_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    extra = extra(roots)
    data = [] if "synthetic" in extra else ["--data-root", roots["good"]]  # it makes its own
    argv = ["--config", "fcn_unet_s5-d16_64x64_40k_drive", *data, "--max-iters", "1",
            "--batch-size", "2", "--workers", "0", "--work-dir", str(work), *extra,
            "--cfg-options", *tiny_model(2), *opts]
    code, err = run_cli(train_cli.main, argv, capsys)
    assert code == status, err
    assert_clean(err, "python -m fastunet.train", expect_error=True)
    assert message in err, err
    if status == 2:  # refused before any work
        assert not work.exists() or not any(work.iterdir())
    else:  # a data error found mid-run: only complete checkpoints, no temporary files
        assert not [n for n in os.listdir(work) if n.startswith(".tmp")]
        for name in os.listdir(work):
            if name.endswith(".pth"):
                fastunet.models.checkpoint.read_checkpoint(work / name)


TEST_CASES = [
    ("missing checkpoint", lambda r: ["--checkpoint", str(D(r) / "nope.pth")], 2, "not found",
     ()),
    ("checkpoint is a folder", lambda r: ["--checkpoint", str(D(r))], 2, "is a folder", ()),
    ("truncated checkpoint", lambda r: ["--checkpoint", str(D(r) / "truncated.pth")], 2,
     "truncated or corrupt", ()),
    ("checkpoint of another model", lambda r: [], 2, "does not match the model",
     ["model.backbone.base_channels=4", "model.decode_head.in_channels=4"]),
    ("misspelt config", lambda r: ["--config", "unet-s5-d16_fcn_4xb4-40k_drive-64x6"], 2,
     "did you mean", ()),
    ("--device unknown", lambda r: ["--device", "gpu0"], 2, "unknown device", ()),
    ("--device cuda:7", lambda r: ["--device", "cuda:7"], 2, "cuda:7", ()),
    ("--mode unknown", lambda r: ["--mode", "tiles"], 2, "invalid choice", ()),
    ("--cfg-options misspelt", lambda r: [], 2, "did you mean 'model.test_cfg'",
     ["model.test_cf.mode='whole'"]),
    ("zero test stride", lambda r: [], 2, "'model.test_cfg.stride' must be a positive",
     ["model.test_cfg.stride=(0,0)"]),
    ("validation label values", lambda r: ["--data-root", r["val_values"]], 2,
     "not class indices", ()),
    ("image without label", lambda r: ["--data-root", r["missing_label"]], 2, "have no label",
     ()),
    ("--json is a folder", lambda r: ["--json", str(D(r))], 2, "is a folder", ()),
    ("--save-predictions is a file", lambda r: ["--save-predictions", str(D(r) / "a_file")], 2,
     "is not a folder", ()),
    ("--max-pixels below the images", lambda r: ["--max-pixels", "100"], 2,
     "64x64 pixels (0.0041 megapixels) is above the limit of 0.0001 megapixels", ()),
]


@pytest.mark.parametrize("case, extra, status, message, opts", TEST_CASES,
                         ids=[c[0] for c in TEST_CASES])
def test_test_cli(case, extra, status, message, opts, roots, tmp_path, capsys):
    from fastunet import test as test_cli
    from trainkit import tiny_model

    argv = ["--config", "fcn_unet_s5-d16_64x64_40k_drive", "--data-root", roots["good"],
            "--checkpoint", roots["weights"], *extra(roots), "--cfg-options", *tiny_model(2),
            *opts]
    code, err = run_cli(test_cli.main, argv, capsys)
    assert code == status, err
    assert_clean(err, "python -m fastunet.test", expect_error=True)
    assert message in err, err
