"""The training pipeline of mmseg's retinal-vessel configs, and the test-time transform.

Per sample (mmseg 1.x's ``train_pipeline`` + ``SegDataPreProcessor`` of the retinal configs):

1. ``RandomResize(scale=img_scale, ratio_range=(0.5, 2.0), keep_ratio=True)``: r ~ U(0.5, 2),
   target (int(s0·r), int(s1·r)); the image is rescaled by mmcv's ``rescale_size`` factor
   min(long/long_edge, short/short_edge), new size int(w·f + 0.5) x int(h·f + 0.5); bilinear for
   the image (OpenCV's uint8 INTER_LINEAR arithmetic), nearest for the label (see below);
2. ``RandomCrop(crop, cat_max_ratio=0.75)``: up to 10 re-draws while the crop is a single class or
   one class covers >= 75% of its non-ignored pixels (mmseg's loop, so the 11th draw is kept);
3. ``RandomFlip(prob=0.5)``, horizontal;
4. ``PhotoMetricDistortion``: brightness ±32, contrast [0.5, 1.5] first or last (random mode),
   saturation [0.5, 1.5] and hue ±18 in OpenCV's uint8 HSV, each with p = 0.5;
5. normalise with mean (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375) in RGB order;
6. pad bottom/right to the crop size: image 0 (after normalising), label 255.

The label's nearest resize (``label_resize``) is where fastunet departs from mmseg by default:

- ``'centre'`` (default): each label pixel is the source pixel under its centre,
  floor((x + 0.5) * scale), the grid the image's bilinear resize uses, so label and image stay
  aligned at every scale;
- ``'mmseg'``: OpenCV's INTER_NEAREST, floor(x * scale), as mmseg: reproduces mmseg's pipeline
  bit for bit, including its half-pixel label offset (after a random rescale the label sits up
  to half a source pixel off the image; a retinal vessel is 1-8 pixels wide).

The resize is evaluated only inside the crop window (identical to resizing then cropping, much
cheaper). Randomness comes from an explicit ``np.random.Generator``; ``TrainDataset`` derives it
from (seed, epoch, index), so every DataLoader worker and every resumed run reproduces the same
samples. Outputs: float32 CHW tensor and int64 HW tensor.

Bit-exactness against OpenCV (4.10, x86-64 AVX2), measured with it installed: RGB->HSV exact;
HSV->RGB differs by 1 level on ~6 in 10^5 values; INTER_NEAREST exact; INTER_LINEAR differs by 1
level on ~1 in 10^3 values (border rows), all else identical.
"""
import numpy as np
import torch

from . import _cv

__all__ = ["MEAN", "STD", "LABEL_RESIZE", "TrainTransform", "TestTransform", "TrainDataset",
           "EpochSampler", "sample_rng", "normalize", "photometric_distortion"]

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
# the label resizes TrainTransform offers (module docstring), default first
LABEL_RESIZE = ("centre", "mmseg")


def sample_rng(seed, epoch, index):
    """The generator of one training sample: a pure function of (seed, epoch, index)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


def normalize(img, mean=MEAN, std=STD):
    """HxWx3 uint8 RGB -> float32 CHW tensor, (x - mean) / std per channel."""
    # numpy, not torch: a DataLoader worker's torch threads would fight over a few cores
    m = np.asarray(mean, np.float32).reshape(3, 1, 1)
    s = np.asarray(std, np.float32).reshape(3, 1, 1)
    x = np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)
    x -= m
    x /= s
    return torch.from_numpy(x)


def _convert(img, alpha=1.0, beta=0.0):
    """mmseg PhotoMetricDistortion.convert: float32 affine, clip, truncate to uint8."""
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(img, rng, brightness_delta=32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta=18):
    """mmseg's PhotoMetricDistortion on a uint8 RGB image (same draws, same arithmetic)."""
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast_range))
    if rng.integers(2):
        hsv = _cv.rgb2hsv(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        img = _cv.hsv2rgb(hsv)
    if rng.integers(2):
        hsv = _cv.rgb2hsv(img)
        # numpy's randint(-d, d) excludes d, as in mmseg
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-hue_delta, hue_delta)) % 180
        img = _cv.hsv2rgb(hsv)
    if mode == 0 and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast_range))
    return img


class TrainTransform:
    """mmseg's training pipeline for one (image, label) pair; see the module docstring.

    crop_size: (h, w); img_scale: the config's scale tuple (only its long and short side
    matter, as in mmcv); label_resize: 'centre' (labels on the image's pixel grid) or 'mmseg'
    (bit for bit mmseg, with its half-pixel label offset). Call with (img uint8 HxWx3 RGB,
    label uint8 HxW, rng).
    """

    def __init__(self, crop_size, img_scale, ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                 flip_prob=0.5, photometric=True, ignore_index=255, mean=MEAN, std=STD,
                 label_resize="centre"):
        if isinstance(crop_size, int):
            crop_size = (crop_size, crop_size)
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        if min(self.crop_size) <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        self.img_scale = tuple(int(s) for s in img_scale)
        self.ratio_range = tuple(ratio_range)
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = photometric
        self.ignore_index = ignore_index
        self.mean, self.std = mean, std
        if label_resize not in LABEL_RESIZE:
            raise ValueError(f"label_resize must be one of {', '.join(map(repr, LABEL_RESIZE))}, "
                             f"got {label_resize!r}")
        self.label_resize = label_resize

    def _nearest_maps(self, label, new_w, new_h):
        """Source row and column of every pixel of the label resized to (new_w, new_h)."""
        h, w = label.shape
        centre = self.label_resize == "centre"
        return _cv.nearest_index(h, new_h, centre), _cv.nearest_index(w, new_w, centre)

    @staticmethod
    def _label_window(label, maps, box):
        rows, cols = maps
        y0, y1, x0, x1 = box
        return label[rows[y0:y1, None], cols[None, x0:x1]]

    def _crop_box(self, label, new_w, new_h, rng, maps=None):
        ch, cw = self.crop_size
        maps = maps or self._nearest_maps(label, new_w, new_h)

        def draw():
            oy = rng.integers(0, max(new_h - ch, 0) + 1)
            ox = rng.integers(0, max(new_w - cw, 0) + 1)
            return oy, oy + ch, ox, ox + cw

        box = draw()
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                seg = self._label_window(label, maps, box)
                counts = np.bincount(seg.ravel(), minlength=256)
                if self.ignore_index is not None and self.ignore_index < len(counts):
                    counts[self.ignore_index] = 0
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = draw()
        return box

    def __call__(self, img, label, rng):
        """(img HxWx3 uint8 RGB, label HxW uint8, rng) -> (float32 3xhxw, int64 hxw) tensors."""
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"TrainTransform: expected HxWx3 uint8 RGB, got {img.shape} "
                             f"{img.dtype}")
        if label.shape != img.shape[:2]:
            raise ValueError(f"TrainTransform: label {label.shape} does not match image "
                             f"{img.shape[:2]}")
        h, w = label.shape
        lo, hi = self.ratio_range
        ratio = rng.random() * (hi - lo) + lo
        scale = (int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio))
        new_w, new_h, _ = _cv.rescale_size(w, h, scale)
        maps = self._nearest_maps(label, new_w, new_h)
        box = self._crop_box(label, new_w, new_h, rng, maps)
        y0, y1, x0, x1 = box[0], min(box[1], new_h), box[2], min(box[3], new_w)
        im = _cv.resize_linear_window(img, new_w, new_h, y0, y1, x0, x1)
        seg = self._label_window(label, maps, box)
        if rng.random() < self.flip_prob:
            im, seg = im[:, ::-1], seg[:, ::-1]
        im = np.ascontiguousarray(im)
        if self.photometric:
            im = photometric_distortion(im, rng)
        ch, cw = self.crop_size
        h2, w2 = seg.shape
        if h2 < ch or w2 < cw:
            # pad bottom/right: label 255; the image with 0 after normalising (mmseg pads there)
            x = np.zeros((3, max(ch, h2), max(cw, w2)), np.float32)
            x[:, :h2, :w2] = normalize(im, self.mean, self.std).numpy()
            y = np.full((max(ch, h2), max(cw, w2)), 255, np.int64)
            y[:h2, :w2] = seg
            return torch.from_numpy(x), torch.from_numpy(y)
        return normalize(im, self.mean, self.std), torch.from_numpy(seg.astype(np.int64))


class TestTransform:
    """Test-time transform: normalise only (the configs' test resize leaves each dataset's images
    at their own size)."""

    def __init__(self, mean=MEAN, std=STD):
        self.mean, self.std = mean, std

    def __call__(self, img, label=None):
        """(img uint8 HxWx3 RGB, label or None) -> (float32 3xHxW, int64 HxW or None)."""
        x = normalize(img, self.mean, self.std)
        y = None if label is None else torch.from_numpy(label.astype(np.int64))
        return x, y


class TrainDataset(torch.utils.data.Dataset):
    """Wraps a dataset of dict(img, label, ...) items with a TrainTransform, reproducibly.

    ``ds[(epoch, index)]`` transforms item ``index`` with ``sample_rng(seed, epoch, index)``;
    ``ds[index]`` uses ``self.epoch`` (``set_epoch``). Use ``EpochSampler`` to feed (epoch, index)
    keys so that persistent workers need no epoch broadcast. Decoded items are cached in memory
    per process when ``cache`` (default: when the first item suggests the set needs < 1 GiB).
    """

    def __init__(self, dataset, transform, seed=0, cache="auto"):
        self.dataset, self.transform, self.seed = dataset, transform, int(seed)
        self.epoch = 0
        self._cache_mode = cache
        self._cache = {}

    def __len__(self):
        return len(self.dataset)

    def set_epoch(self, epoch):
        """Select the epoch used by integer keys."""
        self.epoch = int(epoch)

    def _item(self, index):
        if index in self._cache:
            return self._cache[index]
        item = self.dataset[index]
        if self._cache_mode == "auto":
            nbytes = item["img"].nbytes + item["label"].nbytes
            self._cache_mode = nbytes * len(self.dataset) < (1 << 30)
        if self._cache_mode:
            self._cache[index] = item
        return item

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        if not 0 <= index < len(self.dataset):
            raise IndexError(f"index {index} out of range for {len(self.dataset)} items")
        item = self._item(index)
        return self.transform(item["img"], item["label"], sample_rng(self.seed, epoch, index))


class EpochSampler(torch.utils.data.Sampler):
    """Endless (epoch, index) keys: each epoch a permutation drawn from (seed, epoch).

    ``start`` skips that many samples (e.g. iteration x batch size when resuming), so a resumed
    run continues with exactly the samples an uninterrupted one would have drawn.
    """

    def __init__(self, num_items, seed=0, shuffle=True, start=0):
        if num_items <= 0:
            raise ValueError("EpochSampler needs at least one item")
        self.n, self.seed, self.shuffle, self.start = int(num_items), int(seed), shuffle, int(start)

    def order(self, epoch):
        """The item order of one epoch."""
        if not self.shuffle:
            return np.arange(self.n)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch), 0x5EED])
        return rng.permutation(self.n)

    def __iter__(self):
        epoch, pos = divmod(self.start, self.n)
        while True:
            order = self.order(epoch)
            for i in range(pos, self.n):
                yield (epoch, int(order[i]))
            epoch, pos = epoch + 1, 0
