"""Datasets over the converted layout, a generic image/mask folder dataset, and ``build_dataset``.

Every dataset yields ``dict(img=HxWx3 uint8 RGB, label=HxW uint8, name=str, fov=HxW bool or
None)``. The retinal datasets read ``<root>/images/<split>/<name><img_suffix>`` with the label
``<root>/annotations/<split>/<name><seg_suffix>`` (suffixes as mmseg's dataset classes) and, when
present, the FOV mask ``<root>/fov/<split>/<name><img_suffix>``.

``FolderDataset`` pairs images and masks of any readable format by file stem. Mask values are
mapped for binary segmentation: {0, 1} (with 255 = ignore) are kept; masks whose values are
{0, 255} (the usual black/white PNG) become ``value >= 128`` -> 1; anything else is an error naming
the file and the values found (``label_map='raw'`` keeps values unchanged, for class-index masks).
"""
import os

import numpy as np
import torch

from .io import read_image, read_label

__all__ = ["DatasetError", "VesselDataset", "DRIVEDataset", "STAREDataset", "ChaseDB1Dataset",
           "HRFDataset", "FolderDataset", "build_dataset", "DATASETS", "DATASET_INFO",
           "IMAGE_EXTENSIONS", "binary_label"]

SPLITS = ("training", "validation")


class DatasetError(ValueError):
    """The files of a data set are inconsistent: label values, sizes, unpaired images/labels.
    The message names the file and what to do; the CLIs print it in one line."""
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm",
                    ".pbm", ".webp", ".ppm.gz", ".pgm.gz")

# image size (h, w), the configs' img_scale and crop (mmseg's dataset configs)
DATASET_INFO = {
    "drive": dict(size=(584, 565), img_scale=(584, 565), crop_size=(64, 64)),
    "stare": dict(size=(605, 700), img_scale=(605, 700), crop_size=(128, 128)),
    "chase_db1": dict(size=(960, 999), img_scale=(960, 999), crop_size=(128, 128)),
    "hrf": dict(size=(2336, 3504), img_scale=(2336, 3504), crop_size=(256, 256)),
    "synthetic": dict(size=(584, 565), img_scale=(584, 565), crop_size=(64, 64)),
}


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class VesselDataset(torch.utils.data.Dataset):
    """A split of a converted data root (see the module docstring); subclasses fix the suffixes."""

    CLASSES = ("background", "vessel")
    IMG_SUFFIX = ".png"
    SEG_SUFFIX = ".png"

    def __init__(self, root, split="training", img_suffix=None, seg_suffix=None, use_fov=True):
        _check_split(split)
        self.root, self.split = os.fspath(root), split
        self.img_suffix = img_suffix or self.IMG_SUFFIX
        self.seg_suffix = seg_suffix or self.SEG_SUFFIX
        self.img_dir = os.path.join(self.root, "images", split)
        self.ann_dir = os.path.join(self.root, "annotations", split)
        self.fov_dir = os.path.join(self.root, "fov", split)
        name = type(self).__name__
        if not os.path.isdir(self.img_dir):
            raise FileNotFoundError(
                f"{name}: {self.img_dir} does not exist; convert the dataset first "
                f"(python -m fastunet.convert ... -o {self.root})")
        files = sorted(f for f in os.listdir(self.img_dir) if f.endswith(self.img_suffix))
        self.names = [f[:-len(self.img_suffix)] for f in files]
        if not self.names:
            raise FileNotFoundError(f"{name}: no *{self.img_suffix} images in {self.img_dir}")
        missing = [n for n in self.names
                   if not os.path.isfile(os.path.join(self.ann_dir, n + self.seg_suffix))]
        if missing:
            raise FileNotFoundError(
                f"{name}: {len(missing)} of {len(self.names)} images have no label "
                f"{self.ann_dir}/<name>{self.seg_suffix} (e.g. {missing[0]}{self.seg_suffix})")
        known = set(self.names)
        orphans = sorted(f for f in os.listdir(self.ann_dir) if f.endswith(self.seg_suffix)
                         and f[:-len(self.seg_suffix)] not in known)
        if orphans:  # labels whose image is gone: the two lists no longer describe one set
            raise DatasetError(
                f"{name}: {len(orphans)} label(s) in {self.ann_dir} have no image "
                f"{self.img_dir}/<name>{self.img_suffix} (e.g. {orphans[0]}); restore the "
                f"images or remove the labels")
        self.use_fov = use_fov and os.path.isdir(self.fov_dir)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        name = self.names[index]
        img_path = os.path.join(self.img_dir, name + self.img_suffix)
        seg_path = os.path.join(self.ann_dir, name + self.seg_suffix)
        img = read_image(img_path)
        label = read_label(seg_path)
        if label.shape != img.shape[:2]:
            raise DatasetError(f"{seg_path}: label size {label.shape[::-1]} differs from image "
                               f"{img_path} {img.shape[1::-1]}")
        if label.max() > 1 and ((label > 1) & (label != 255)).any():
            vals = np.unique(label)
            raise DatasetError(f"{seg_path}: label values {vals[:8].tolist()} are not class "
                               "indices {0, 1} (255 = ignore); was the root converted with "
                               "python -m fastunet.convert?")
        fov = None
        if self.use_fov:
            fov_path = os.path.join(self.fov_dir, name + self.img_suffix)
            if os.path.isfile(fov_path):
                fov = read_label(fov_path) > 0
                if fov.shape != label.shape:
                    raise DatasetError(f"{fov_path}: FOV size differs from image {img_path}")
        return dict(img=img, label=label, name=name, fov=fov)


class DRIVEDataset(VesselDataset):
    """DRIVE: ``21.png`` / ``21_manual1.png`` (mmseg's DRIVEDataset suffixes)."""
    SEG_SUFFIX = "_manual1.png"


class STAREDataset(VesselDataset):
    """STARE: ``im0001.png`` / ``im0001.ah.png``."""
    SEG_SUFFIX = ".ah.png"


class ChaseDB1Dataset(VesselDataset):
    """CHASE_DB1: ``Image_01L.png`` / ``Image_01L_1stHO.png``."""
    SEG_SUFFIX = "_1stHO.png"


class HRFDataset(VesselDataset):
    """HRF: ``01_h.png`` / ``01_h.png`` (same name in annotations/)."""
    SEG_SUFFIX = ".png"


def _stem(filename):
    low = filename.lower()
    for ext in sorted(IMAGE_EXTENSIONS, key=len, reverse=True):
        if low.endswith(ext):
            return filename[:-len(ext)]
    return None


def binary_label(label, path="<label>"):
    """Map a binary mask to {0, 1} (255 kept as ignore); see the module docstring."""
    if label.max() <= 1:
        return label
    values = np.unique(label)
    present = set(values.tolist())
    if present <= {0, 255}:
        return (label >= 128).astype(np.uint8)  # black/white mask
    if present <= {0, 1, 255}:
        return label  # class indices with ignored pixels
    shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
    raise DatasetError(f"{path}: mask values {{{shown}}} are not a binary mask; expected {{0, 1}} "
                       "or {0, 255} (black/white); re-save it as such, or use label_map='raw'")


class FolderDataset(torch.utils.data.Dataset):
    """Images and masks in two folders, paired by file stem (``a.jpg`` <-> ``a.png``).

    mask_suffix: text between the stem and the extension of mask files (``a_mask.png``);
    fov_dir: optional folder of FOV masks paired the same way; label_map: 'binary' (default, see
    the module docstring) or 'raw'.
    """

    CLASSES = ("background", "vessel")

    def __init__(self, img_dir, mask_dir, mask_suffix="", fov_dir=None, label_map="binary"):
        if label_map not in ("binary", "raw"):
            raise ValueError(f"label_map must be 'binary' or 'raw', got {label_map!r}")
        self.img_dir, self.mask_dir, self.fov_dir = img_dir, mask_dir, fov_dir
        self.label_map = label_map
        images = self._index(img_dir, "", "image")
        masks = self._index(mask_dir, mask_suffix, "mask")
        only_img = sorted(set(images) - set(masks))
        only_mask = sorted(set(masks) - set(images))
        if only_img or only_mask:
            parts = []
            if only_img:
                parts.append(f"{len(only_img)} image(s) without a mask (e.g. "
                             f"{images[only_img[0]]}, expected {only_img[0]}{mask_suffix}.<ext> "
                             f"in {mask_dir})")
            if only_mask:
                parts.append(f"{len(only_mask)} mask(s) without an image (e.g. "
                             f"{masks[only_mask[0]]})")
            raise DatasetError("FolderDataset: images and masks do not pair up by name: "
                               + "; ".join(parts))
        self.names = sorted(images)
        self.images = [os.path.join(img_dir, images[n]) for n in self.names]
        self.masks = [os.path.join(mask_dir, masks[n]) for n in self.names]
        self.fovs = None
        if fov_dir is not None:
            fovs = self._index(fov_dir, "", "FOV mask")
            missing = [n for n in self.names if n not in fovs]
            if missing:
                raise DatasetError(f"FolderDataset: {len(missing)} image(s) have no FOV mask in "
                                   f"{fov_dir} (e.g. {missing[0]})")
            self.fovs = [os.path.join(fov_dir, fovs[n]) for n in self.names]

    @staticmethod
    def _index(directory, suffix, what):
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"FolderDataset: {what} folder {directory} does not exist")
        out = {}
        for f in sorted(os.listdir(directory)):
            stem = _stem(f)
            if stem is None or not os.path.isfile(os.path.join(directory, f)):
                continue
            if suffix:
                if not stem.endswith(suffix):
                    continue
                stem = stem[:-len(suffix)]
            if stem in out:
                raise DatasetError(f"FolderDataset: {os.path.join(directory, out[stem])} and "
                                   f"{os.path.join(directory, f)} have the same name; keep one")
            out[stem] = f
        if not out:
            raise FileNotFoundError(f"FolderDataset: no {what} files "
                                    f"({', '.join(IMAGE_EXTENSIONS)}) in {directory}")
        return out

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        img = read_image(self.images[index])
        label = read_label(self.masks[index])
        if label.shape != img.shape[:2]:
            raise DatasetError(f"{self.masks[index]}: mask size {label.shape[::-1]} differs from "
                               f"image {self.images[index]} {img.shape[1::-1]}")
        if self.label_map == "binary":
            label = binary_label(label, self.masks[index])
        fov = None
        if self.fovs is not None:
            fov = read_label(self.fovs[index]) > 0
            if fov.shape != label.shape:
                raise DatasetError(f"{self.fovs[index]}: FOV size differs from the image")
        return dict(img=img, label=label, name=self.names[index], fov=fov)


DATASETS = {"drive": DRIVEDataset, "stare": STAREDataset, "chase_db1": ChaseDB1Dataset,
            "hrf": HRFDataset}


def build_dataset(name, root=None, split="training", **kwargs):
    """A dataset by name: 'drive', 'stare', 'chase_db1', 'hrf', 'folder' or 'synthetic'.

    'drive' ... 'hrf': a root written by ``python -m fastunet.convert`` (or mmseg's converters).

    'folder': ``<root>/images/<split>/`` and ``<root>/masks/<split>/`` unless ``img_dir`` and
    ``mask_dir`` are given. 'synthetic': ``SyntheticVessels(split, root=root, **kwargs)`` (root
    None = the cache directory).
    """
    _check_split(split)
    key = name.lower()
    if key in DATASETS:
        if root is None:
            raise ValueError(f"build_dataset({name!r}): the converted data root is required")
        return DATASETS[key](root, split, **kwargs)
    if key == "folder":
        img_dir = kwargs.pop("img_dir", None) or os.path.join(root or ".", "images", split)
        mask_dir = kwargs.pop("mask_dir", None) or os.path.join(root or ".", "masks", split)
        return FolderDataset(img_dir, mask_dir, **kwargs)
    if key == "synthetic":
        from .synthetic import SyntheticVessels
        return SyntheticVessels(split=split, root=root, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose one of "
                     f"{', '.join([*DATASETS, 'folder', 'synthetic'])}")
