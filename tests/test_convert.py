"""python -m fastunet.convert on small hand-made archives in the datasets' real formats."""
import gzip
import io
import json
import os
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from fastunet import convert as cli
from fastunet.data import read_image, read_label
from fastunet.data.converters import MANIFEST, ConvertError, convert_dataset

H, W = 12, 10


def _enc(array, fmt, **kw):
    b = io.BytesIO()
    Image.fromarray(array).save(b, fmt, **kw)
    return b.getvalue()


def _rgb(seed):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _mask(seed, hi=255):
    m = np.random.default_rng(seed + 1000).random((H, W)) < 0.3
    return (m * hi).astype(np.uint8)


def _gif(mask):
    return _enc(mask, "GIF")


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return str(path)


def _tar(path, members):
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return str(path)


def replace_with_deflated_zeros(path, member, size):
    """Rewrite the zip at ``path`` with ``member`` a deflated stream of ``size`` zero bytes."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist() if n != member}
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
        info = zipfile.ZipInfo(member)
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as f:
            for _ in range(size >> 22):
                f.write(bytes(1 << 22))


def drive_archives(d, drop=(), n_train=20, with_test_labels=True):
    train, test = {}, {}
    for i in range(21, 21 + n_train):
        train[f"training/images/{i}_training.tif"] = _enc(_rgb(i), "TIFF")
        train[f"training/1st_manual/{i}_manual1.gif"] = _gif(_mask(i))
        train[f"training/mask/{i}_training_mask.gif"] = _gif(_mask(i + 50))
    for i in range(1, 21):
        test[f"test/images/{i:02d}_test.tif"] = _enc(_rgb(i), "TIFF")
        if with_test_labels:
            test[f"test/1st_manual/{i:02d}_manual1.gif"] = _gif(_mask(i))
            test[f"test/2nd_manual/{i:02d}_manual2.gif"] = _gif(_mask(i + 7))
        test[f"test/mask/{i:02d}_test_mask.gif"] = _gif(_mask(i + 50))
    for name in drop:
        train.pop(name, None)
        test.pop(name, None)
    return [_zip(d / "training.zip", train), _zip(d / "test.zip", test)]


def _ppm_gz(array):
    return gzip.compress(_enc(array, "PPM"))


STARE_IDS = ["im0001", "im0002", "im0003", "im0004", "im0005", "im0044", "im0077", "im0081",
             "im0082", "im0139", "im0162", "im0163", "im0235", "im0236", "im0239", "im0240",
             "im0255", "im0291", "im0319", "im0324"]


def stare_archives(d, vk=True):
    images = {f"{s}.ppm.gz": _ppm_gz(_rgb(k)) for k, s in enumerate(STARE_IDS)}
    ah = {f"{s}.ah.ppm.gz": _ppm_gz(np.repeat(_mask(k)[..., None], 3, 2))
          for k, s in enumerate(STARE_IDS)}
    out = [_tar(d / "stare-images.tar", images), _tar(d / "labels-ah.tar", ah)]
    if vk:
        vkm = {f"{s}.vk.ppm.gz": _ppm_gz(np.repeat(_mask(k + 3)[..., None], 3, 2))
               for k, s in enumerate(STARE_IDS)}
        out.append(_tar(d / "labels-vk.tar", vkm))
    return out


CHASE_IDS = [f"Image_{i:02d}{e}" for i in range(1, 15) for e in "LR"]


def chase_archive(d):
    members = {}
    for k, s in enumerate(CHASE_IDS):
        members[f"{s}.jpg"] = _enc(_rgb(k), "JPEG", quality=95)
        members[f"{s}_1stHO.png"] = _enc(_mask(k, hi=1).astype(bool), "PNG")  # 1-bit PNG
        members[f"{s}_2ndHO.png"] = _enc(_mask(k + 5), "PNG")
    return [_zip(d / "CHASEDB1.zip", members)]


def hrf_archives(d, fov=True):
    out = []
    for cat, zname in (("h", "healthy"), ("g", "glaucoma"), ("dr", "diabetic_retinopathy")):
        ext = ".JPG" if cat == "dr" else ".jpg"  # HRF mixes extension cases
        imgs = {f"{i:02d}_{cat}{ext}": _enc(_rgb(i), "JPEG", quality=95) for i in range(1, 16)}
        labs = {f"{i:02d}_{cat}.tif": _enc(np.repeat(_mask(i)[..., None], 3, 2), "TIFF")
                for i in range(1, 16)}
        out += [_zip(d / f"{zname}.zip", imgs), _zip(d / f"{zname}_manualsegm.zip", labs)]
        if fov:
            masks = {f"{i:02d}_{cat}_mask.tif": _enc(_mask(i + 9), "TIFF") for i in range(1, 16)}
            out.append(_zip(d / f"{zname}_fovmask.zip", masks))
    return out


def _files(root):
    return sorted(os.path.relpath(os.path.join(dp, f), root)
                  for dp, _, fs in os.walk(root) for f in fs)


def _no_leftovers(parent):
    return [f for f in os.listdir(parent) if f.startswith(".")] == []


def test_drive_layout_names_values_and_fov(tmp_path):
    archives = drive_archives(tmp_path)
    root = tmp_path / "out" / "DRIVE"
    assert cli.main(["drive", *archives, "-o", str(root), "-q"]) == 0
    files = _files(root)
    assert len([f for f in files if f.startswith("images/training/")]) == 20
    assert len([f for f in files if f.startswith("images/validation/")]) == 20
    assert "images/training/21.png" in files and "annotations/training/21_manual1.png" in files
    assert "images/validation/01.png" in files and "annotations/validation/01_manual1.png" in files
    assert "annotations/validation/01_manual2.png" in files  # mmseg writes 2nd_manual too
    assert "fov/training/21.png" in files and "fov/validation/01.png" in files
    # TIFF -> PNG is lossless; GIF 0/255 -> {0,1} by value >= 128
    assert np.array_equal(read_image(root / "images/training/21.png"), _rgb(21))
    lab = read_label(root / "annotations/training/21_manual1.png")
    assert set(np.unique(lab)) <= {0, 1} and np.array_equal(lab, _mask(21) // 255)
    assert Image.open(root / "annotations/training/21_manual1.png").mode == "L"
    assert np.array_equal(read_label(root / "fov/validation/05.png"), _mask(55) // 255)
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["dataset"] == "drive" and manifest["counts"] == {"training": 20,
                                                                     "validation": 20}
    assert _no_leftovers(root.parent)


def test_idempotent_refuse_and_overwrite(tmp_path, capsys):
    archives = drive_archives(tmp_path)
    root = tmp_path / "DRIVE"
    assert convert_dataset("drive", archives, root) == "written"
    before = {f: (root / f).stat().st_mtime_ns for f in _files(root)}
    assert cli.main(["drive", *archives, "-o", str(root), "-q"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {f: (root / f).stat().st_mtime_ns for f in _files(root)} == before
    # a root holding something else: refused, untouched; --overwrite replaces it
    os.remove(root / "images/training/21.png")
    assert cli.main(["drive", *archives, "-o", str(root), "-q"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert not (root / "images/training/21.png").exists()
    assert cli.main(["drive", *archives, "-o", str(root), "-q", "--overwrite"]) == 0
    after = _files(root)
    assert after == sorted(before)
    # byte-identical to the first conversion
    assert all((root / f).stat().st_size > 0 for f in after)
    again = tmp_path / "DRIVE2"
    convert_dataset("drive", archives, again)
    assert all((root / f).read_bytes() == (again / f).read_bytes() for f in after)
    assert _no_leftovers(tmp_path)


def test_unrelated_existing_folder_is_refused(tmp_path):
    archives = drive_archives(tmp_path)
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("my files")
    with pytest.raises(ConvertError, match="--overwrite"):
        convert_dataset("drive", archives, root)
    assert (root / "notes.txt").read_text() == "my files"


@pytest.mark.parametrize("case", ["missing_label", "wrong_count", "no_test_labels",
                                  "only_one_archive", "wrong_archive"])
def test_drive_validation_errors_leave_nothing(tmp_path, capsys, case):
    if case == "missing_label":
        archives = drive_archives(tmp_path, drop=["training/1st_manual/25_manual1.gif"])
        expect = "1st_manual labels missing for 25"
    elif case == "wrong_count":
        archives = drive_archives(tmp_path, n_train=19)
        expect = "expected 20 DRIVE training images"
    elif case == "no_test_labels":
        archives = drive_archives(tmp_path, with_test_labels=False)
        expect = "lacks the test labels"
    elif case == "only_one_archive":
        archives = drive_archives(tmp_path)[:1]
        expect = "pass test.zip"
    else:
        archives = drive_archives(tmp_path) + chase_archive(tmp_path)
        expect = "CHASEDB1.zip: contains none of the expected files"
    root = tmp_path / "out"
    assert cli.main(["drive", *archives, "-o", str(root), "-q"]) == 1
    err = capsys.readouterr().err
    assert expect in err and err.count("\n") == 1  # one clear line
    assert not root.exists() and _no_leftovers(tmp_path)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow, before our clear error
def test_corrupt_archive_and_members(tmp_path, capsys):
    good = drive_archives(tmp_path)
    # a truncated download is not an archive at all
    data = open(good[0], "rb").read()
    trunc = tmp_path / "trunc" / "training.zip"
    trunc.parent.mkdir()
    trunc.write_bytes(data[: len(data) // 3])
    assert cli.main(["drive", str(trunc), good[1], "-o", str(tmp_path / "o1"), "-q"]) == 1
    assert "not a zip or tar archive" in capsys.readouterr().err
    # a flipped byte inside a member: zip's CRC check catches it while converting
    with zipfile.ZipFile(good[0]) as z:
        info = z.getinfo("training/images/30_training.tif")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 40
    raw = bytearray(data)
    raw[start] ^= 0xFF
    bad = tmp_path / "bad" / "training.zip"
    bad.parent.mkdir()
    bad.write_bytes(bytes(raw))
    out = tmp_path / "o2"
    assert cli.main(["drive", str(bad), good[1], "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert "30_training.tif" in err and "corrupt" in err
    assert not out.exists() and _no_leftovers(tmp_path)
    # an archive member that is not a decodable image
    members = {n: zipfile.ZipFile(good[1]).read(n) for n in zipfile.ZipFile(good[1]).namelist()}
    members["test/images/07_test.tif"] = members["test/images/07_test.tif"][:40]
    broken = _zip(tmp_path / "test.zip", members)
    assert cli.main(["drive", good[0], broken, "-o", str(tmp_path / "o3"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "unreadable image" in err and "07_test.tif" in err
    # empty file
    empty = tmp_path / "empty.zip"
    empty.write_bytes(b"")
    with pytest.raises(ConvertError, match="empty"):
        convert_dataset("drive", [str(empty)], tmp_path / "o4")


def test_stare_tar_ppm_gz_split_and_vk(tmp_path):
    root = tmp_path / "STARE"
    convert_dataset("stare", stare_archives(tmp_path), root)
    train = sorted(os.listdir(root / "images/training"))
    val = sorted(os.listdir(root / "images/validation"))
    assert train == [f"{s}.png" for s in STARE_IDS[:10]]
    assert val == [f"{s}.png" for s in STARE_IDS[10:]]
    assert (root / "annotations/training/im0001.ah.png").exists()
    assert (root / "annotations/validation/im0324.vk.png").exists()
    assert not (root / "fov").exists()  # STARE ships no FOV masks
    assert np.array_equal(read_image(root / "images/validation/im0162.png"), _rgb(10))
    assert np.array_equal(read_label(root / "annotations/training/im0003.ah.png"), _mask(2) // 255)
    # labels-vk is optional
    root2 = tmp_path / "STARE2"
    sub = tmp_path / "novk"
    sub.mkdir()
    convert_dataset("stare", stare_archives(sub, vk=False), root2)
    assert not any(f.endswith(".vk.png") for f in _files(root2))


def test_chase_jpeg_1bit_png(tmp_path):
    root = tmp_path / "CHASE_DB1"
    convert_dataset("chase_db1", chase_archive(tmp_path), root)
    assert len(os.listdir(root / "images/training")) == 20
    assert sorted(os.listdir(root / "images/validation"))[0] == "Image_11L.png"
    img = read_image(root / "images/training/Image_01L.png")
    jpeg = Image.open(io.BytesIO(_enc(_rgb(0), "JPEG", quality=95)))
    assert np.array_equal(img, np.asarray(jpeg.convert("RGB")))  # decoded pixels kept exactly
    lab = read_label(root / "annotations/training/Image_01L_1stHO.png")
    assert np.array_equal(lab, _mask(0, hi=1))  # 1-bit PNG: True -> 255 -> 1
    assert (root / "annotations/validation/Image_14R_2ndHO.png").exists()


def test_hrf_mixed_extensions_tif_labels_fov(tmp_path):
    root = tmp_path / "HRF"
    convert_dataset("hrf", hrf_archives(tmp_path), root)
    train = sorted(os.listdir(root / "images/training"))
    assert len(train) == 15 and len(os.listdir(root / "images/validation")) == 30
    assert "01_dr.png" in train and "05_g.png" in train and "06_h.png" not in train
    assert np.array_equal(read_label(root / "annotations/validation/06_dr.png"), _mask(6) // 255)
    assert np.array_equal(read_label(root / "fov/training/02_h.png"), _mask(11) // 255)


def test_hrf_partial_fov_is_an_error(tmp_path):
    archives = [a for a in hrf_archives(tmp_path) if "glaucoma_fovmask" not in a]
    with pytest.raises(ConvertError, match="FOV masks missing"):
        convert_dataset("hrf", archives, tmp_path / "HRF")


def test_size_mismatch_between_image_and_label(tmp_path):
    members = {}
    for k, s in enumerate(CHASE_IDS):
        members[f"{s}.jpg"] = _enc(_rgb(k), "JPEG")
        lab = _mask(k) if k != 3 else np.zeros((H + 1, W), np.uint8)
        members[f"{s}_1stHO.png"] = _enc(lab, "PNG")
    archive = _zip(tmp_path / "CHASEDB1.zip", members)
    with pytest.raises(ConvertError, match="Image_02R_1stHO.png: size 10x13 differs"):
        convert_dataset("chase_db1", [archive], tmp_path / "out")


def test_help_explains_layout(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("training.zip test.zip", "annotations/{training,validation}", "--overwrite",
                 "fov/", "value >= 128"):
        assert text in out


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    archives = chase_archive(tmp_path)
    assert cli.main(["chase_db1", *archives, "-o", str(tmp_path / "C")]) == 0
    cap = capsys.readouterr()
    assert "converting chase_db1" in cap.err and "converting" not in cap.out
