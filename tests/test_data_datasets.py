"""Datasets over the converted layout, the folder dataset's pairing and mask rules, build_dataset."""
import numpy as np
import pytest
from PIL import Image

from fastunet.data import (DRIVEDataset, FolderDataset, HRFDataset, STAREDataset, build_dataset,
                           write_png)
from fastunet.data.datasets import binary_label

RNG = np.random.default_rng(0)


def make_root(root, names, seg_suffix, split="training", fov=True, size=(9, 7)):
    for k, n in enumerate(names):
        img = RNG.integers(0, 256, (*size, 3), dtype=np.uint8)
        lab = (RNG.random(size) < 0.3).astype(np.uint8)
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        write_png(root / "images" / split / f"{n}.png", img)
        write_png(root / "annotations" / split / f"{n}{seg_suffix}", lab)
        if fov:
            (root / "fov" / split).mkdir(parents=True, exist_ok=True)
            write_png(root / "fov" / split / f"{n}.png", np.ones(size, np.uint8))
    return root


def test_drive_dataset_items_and_suffixes(tmp_path):
    root = make_root(tmp_path, ["22", "21"], "_manual1.png")
    # a second annotation (as mmseg writes 2nd_manual) does not confuse the listing
    write_png(root / "annotations/training/21_manual2.png", np.zeros((9, 7), np.uint8))
    ds = build_dataset("drive", root, "training")
    assert isinstance(ds, DRIVEDataset) and len(ds) == 2 and ds.names == ["21", "22"]
    item = ds[0]
    assert item["name"] == "21" and item["img"].shape == (9, 7, 3) and item["img"].dtype == np.uint8
    assert item["label"].dtype == np.uint8 and set(np.unique(item["label"])) <= {0, 1}
    assert item["fov"].dtype == bool and item["fov"].all()
    stored = np.asarray(Image.open(root / "annotations/training/21_manual1.png"))
    assert np.array_equal(item["label"], stored)


def test_stare_and_hrf_suffixes_and_missing_fov(tmp_path):
    stare = make_root(tmp_path / "S", ["im0001", "im0002"], ".ah.png", fov=False)
    ds = STAREDataset(stare, "training")
    assert ds.names == ["im0001", "im0002"] and ds[1]["fov"] is None
    hrf = make_root(tmp_path / "H", ["01_h"], ".png", split="validation")
    assert HRFDataset(hrf, "validation")[0]["name"] == "01_h"


def test_clear_errors_for_bad_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert the dataset first"):
        DRIVEDataset(tmp_path / "nothing")
    root = make_root(tmp_path / "D", ["21", "22"], "_manual1.png")
    (root / "annotations/training/22_manual1.png").unlink()
    with pytest.raises(FileNotFoundError, match="22_manual1.png"):
        DRIVEDataset(root)
    root = make_root(tmp_path / "E", ["21"], "_manual1.png")
    write_png(root / "annotations/training/21_manual1.png", np.full((9, 7), 200, np.uint8))
    with pytest.raises(ValueError, match="not class indices"):
        DRIVEDataset(root)[0]
    with pytest.raises(ValueError, match="split"):
        DRIVEDataset(root, "test")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("kitti", root)


def test_binary_label_rules():
    m01 = np.array([[0, 1], [1, 0]], np.uint8)
    assert binary_label(m01) is m01
    assert np.array_equal(binary_label(m01 * 255), m01)
    assert np.array_equal(binary_label(np.array([[0, 1], [255, 1]], np.uint8)),
                          [[0, 1], [255, 1]])                   # 255 = ignore kept
    assert np.array_equal(binary_label(np.full((2, 2), 255, np.uint8)), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"mask.png: mask values \{0, 3, 200\}"):
        binary_label(np.array([[0, 3], [200, 0]], np.uint8), "mask.png")


def _write(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt)


def test_folder_dataset_pairs_by_stem_any_format(tmp_path):
    img = RNG.integers(0, 256, (8, 6, 3), dtype=np.uint8)
    mask = (RNG.random((8, 6)) < 0.5).astype(np.uint8) * 255
    _write(tmp_path / "images/training/b.jpg", img)
    _write(tmp_path / "images/training/a.tif", img)
    _write(tmp_path / "masks/training/a.png", mask)
    _write(tmp_path / "masks/training/b.gif", mask)
    ds = build_dataset("folder", tmp_path, "training")
    assert isinstance(ds, FolderDataset) and ds.names == ["a", "b"]
    assert np.array_equal(ds[0]["img"], img) and np.array_equal(ds[0]["label"], mask // 255)
    assert np.array_equal(ds[1]["label"], mask // 255) and ds[1]["fov"] is None
    # mask suffix and explicit folders
    _write(tmp_path / "x/img/c.png", img)
    _write(tmp_path / "x/gt/c_mask.png", mask // 255)
    ds = FolderDataset(tmp_path / "x/img", tmp_path / "x/gt", mask_suffix="_mask")
    assert ds.names == ["c"] and np.array_equal(ds[0]["label"], mask // 255)


def test_folder_dataset_mismatch_and_bad_masks(tmp_path):
    img = RNG.integers(0, 256, (8, 6, 3), dtype=np.uint8)
    _write(tmp_path / "i/a.png", img)
    _write(tmp_path / "i/b.png", img)
    _write(tmp_path / "m/a.png", np.zeros((8, 6), np.uint8))
    _write(tmp_path / "m/z.png", np.zeros((8, 6), np.uint8))
    with pytest.raises(ValueError, match=r"1 image\(s\) without a mask \(e.g. b.png.*1 mask\(s\) "
                                         r"without an image \(e.g. z.png"):
        FolderDataset(tmp_path / "i", tmp_path / "m")
    (tmp_path / "m/z.png").unlink()
    _write(tmp_path / "m/b.png", (np.arange(48).reshape(8, 6) * 5).astype(np.uint8))
    ds = FolderDataset(tmp_path / "i", tmp_path / "m")
    with pytest.raises(ValueError, match="b.png: mask values"):
        ds[1]
    assert FolderDataset(tmp_path / "i", tmp_path / "m", label_map="raw")[1]["label"].max() == 235
    _write(tmp_path / "m/b.png", np.zeros((7, 6), np.uint8))
    with pytest.raises(ValueError, match="differs from image"):
        FolderDataset(tmp_path / "i", tmp_path / "m")[1]
    _write(tmp_path / "i/a.jpg", img)
    with pytest.raises(ValueError, match="same name"):
        FolderDataset(tmp_path / "i", tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderDataset(tmp_path / "nope", tmp_path / "m")
