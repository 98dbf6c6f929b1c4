"""Predictor: RGB images in, vessel masks (and probabilities) out, from a config and checkpoint.

    predictor = fastunet.Predictor.pretrained()          # the weights shipped with fastunet
    predictor = fastunet.Predictor(checkpoint="work_dirs/synthetic/latest.pth")  # its own config
    predictor = fastunet.Predictor("fcn_unet_s5-d16_64x64_40k_drive", "drive.pth")
    labels = predictor.predict(rgb)                      # HxW uint8 class indices
    labels, prob = predictor.predict(rgb, return_probs=True)   # + HxW float32 P(vessel)
    for labels in predictor.predict_many(["a.png", "b.tif"]): ...
"""
import os
import queue
import threading
import warnings

import numpy as np
import torch

from .engine import MODES, PRECISIONS, InferenceEngine, resolve_precision

# mmseg's ImageNet normalisation, used when a config does not carry its own
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def as_rgb_uint8(image, name="image"):
    """An image array -> HxWx3 uint8 RGB, converting like ``fastunet.data.io.read_image``:
    grayscale (HxW or HxWx1) expanded, alpha dropped (warns unless opaque), 16-bit scaled by
    ``v * 255 / 65535`` (warns), float in [0, 1] scaled by 255 (warns)."""
    from ..data.io import ImageConversionWarning, check_pixels

    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"{name}: expected an HxW, HxWx3 or HxWx4 image array, got shape "
                         f"{a.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: the image is empty (shape {a.shape})")
    check_pixels(a.shape[0], a.shape[1], name)  # fastunet.data.io's limit (--max-pixels)

    def warn(what):
        warnings.warn(f"{name}: {what}", ImageConversionWarning, stacklevel=3)

    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        warn("16-bit image scaled to 8 bits")
        a = np.rint(a.astype(np.float64) * (255 / 65535)).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 255:
            raise ValueError(f"{name}: float image with values outside [0, 255]; convert it "
                             f"to uint8 first")
        if a.max() <= 1:
            warn("float image in [0, 1] scaled to 8 bits")
            a = a * 255
        a = np.rint(a).astype(np.uint8)
    elif a.dtype != np.uint8:
        if a.min() < 0 or a.max() > 255:
            raise ValueError(f"{name}: {a.dtype} image with values outside 0..255; convert it "
                             f"to uint8 first")
        a = a.astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.shape[2] == 4:
        if a[..., 3].min() < 255:
            warn("RGBA image: alpha channel dropped (image not fully opaque)")
        a = a[..., :3]
    return np.ascontiguousarray(a)


COLOUR_ADVICE = ("the models are trained on colour (RGB) fundus photographs and find far fewer "
                 "vessels in grayscale ones; use the colour photograph if you have it")
GRAYSCALE_WARNING = "grayscale image: " + COLOUR_ADVICE


def is_grayscale(rgb):
    """Whether an HxWx3 image has three equal channels everywhere (a grayscale photograph)."""
    step = max(1, int((rgb.shape[0] * rgb.shape[1] / 65536) ** 0.5))
    for a in (rgb[::step, ::step], rgb):  # a strided sample settles colour photos at once
        if not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])):
            return False
    return True


class Predictor:
    """Segments RGB images with a fastunet (or mmseg) checkpoint.

    config: a config name (``fastunet.list_configs()``), file or dict; None (default) takes the
    checkpoint's own (``fastunet.models.checkpoint.checkpoint_config``: fastunet's checkpoints
    and mmseg's with their config text carry it). checkpoint: a .pth path (None keeps the initial
    weights, for testing; then config is needed). :meth:`pretrained` gives the weights that ship
    with fastunet. device: default CUDA if available, else CPU.
    precision: "auto" (default: bf16 autocast on CPUs with native bf16, AVX512-BF16 or AMX, else
    fp32; see ``fastunet.inference.resolve_precision``), "fp32" (exact reproduction of mmseg's
    numbers), "fp16" or "bf16"; ``self.precision`` says which one runs. mode: "slide" (default:
    the config's test_cfg), "overlap-tile" or "whole" (see fastunet.inference.engine). crop_size
    / stride override the config's slide window. window_batch: windows per forward (default:
    planned, see ``fastunet.inference.planner``). tta: None, "h", "v", "hv" flips. gaussian: Gaussian window weighting.
    fuse: fold BN into the convolutions (eval only; outputs change by float rounding).
    channels_last: default on (faster convolutions on CPU and with fp16/bf16 on GPU).
    fov_diameter: rescale each photo so that its field of view is this many pixels across, and
    the results back to the photo's size (``fastunet.inference.fov``: the model then sees
    vessels of the widths it was trained on); "auto" (default): the training images' diameter
    when the checkpoint records it (``meta['fov_diameter']``, as the shipped weights do), else
    no rescaling; None: never. ``self.fov_diameter`` says which applies. Other keyword
    arguments go to ``InferenceEngine`` (tile_size, margin, cuda_graphs, output_device,
    max_buffer_bytes, ...).
    Large images are normalised and aggregated band by band from the uint8 pixels; CPU memory
    is about image + labels (+ 4 bytes/pixel with return_probs) + max_buffer_bytes (1 GiB) + one
    window batch's activations.
    """

    def __init__(self, config=None, checkpoint=None, device=None, precision="auto", mode=None, *,
                 crop_size=None, stride=None, window_batch=None, tta=None, gaussian=False,
                 fuse=True, channels_last=True, fov_diameter="auto", **engine_options):
        import fastunet
        from ..models.checkpoint import checkpoint_config, load_state

        if precision != "auto" and precision not in PRECISIONS:
            raise ValueError(f"precision must be 'auto' or one of {tuple(PRECISIONS)}, got "
                             f"{precision!r}")
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if config is None and checkpoint is None:
            raise ValueError("give a checkpoint (its config is read from it) or a config; "
                             "Predictor.pretrained() uses the weights shipped with fastunet")
        from ..runtime import resolve_device

        self.device = resolve_device(device)  # ValueError for a device this machine lacks
        self.precision = resolve_precision(precision, self.device)
        # read before building the model: a wrong path fails fast, and it may hold the config
        ckpt = None if checkpoint is None else _read_checkpoint(checkpoint)
        if config is None:
            config = checkpoint_config(ckpt, checkpoint)
        self.config = fastunet.get_config(config) if isinstance(config, str) else config
        if not isinstance(self.config, dict):
            raise TypeError(f"config must be a config name or dict, got {type(config).__name__}")
        model = fastunet.build_segmentor(self.config)
        meta = {} if ckpt is None else load_state(model, ckpt, checkpoint)
        self.fov_diameter = _fov_diameter(fov_diameter, meta)
        model.eval()
        if fuse:
            model = fastunet.fuse(model)
        model.to(self.device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        model_cfg = self.config.get("model", self.config)
        test_cfg = dict(model_cfg.get("test_cfg") or {})
        mode = mode or test_cfg.get("mode", "slide")
        if mode == "slide":
            # `is None`, not `or`: an explicit 0 is an error to report, not "use the config's"
            crop_size = test_cfg.get("crop_size") if crop_size is None else crop_size
            stride = test_cfg.get("stride") if stride is None else stride
            if crop_size is None or stride is None:
                raise ValueError("mode 'slide' needs crop_size and stride (the config's test_cfg "
                                 "has none): pass crop_size=..., stride=...")
        data_cfg = self.config.get("data") or {}
        mean = torch.tensor(data_cfg.get("mean", MEAN), dtype=torch.float32, device=self.device)
        std = torch.tensor(data_cfg.get("std", STD), dtype=torch.float32, device=self.device)
        self._mean, self._std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
        self.mode = mode
        engine_options.setdefault("size_divisor", getattr(model.backbone, "downsample_rate", 16))
        self._warned_grayscale = False  # once per Predictor, not per image
        self.engine = InferenceEngine(model.encode_decode, mode, crop_size, stride,
                                      window_batch=window_batch, precision=self.precision,
                                      channels_last=channels_last, gaussian=gaussian, tta=tta,
                                      **engine_options)

    @classmethod
    def pretrained(cls, **options):
        """The weights that ship with fastunet (``fastunet.weights``: trained on synthetic fundus
        images only; fine-tune on annotated real photos for accuracy), with their config and
        photos rescaled to their training images' field of view; ``options`` as for the
        constructor."""
        from ..weights import pretrained_path

        return cls(checkpoint=pretrained_path(), **options)

    def predict(self, image, return_probs=False):
        """HxWx3 uint8 RGB array (or a path) -> HxW uint8 labels (argmax of the logits); with
        return_probs, also the HxW float32 probability of class 1 (vessel). The first grayscale
        image warns (ImageConversionWarning): the models expect colour photographs. With
        ``fov_diameter`` the photo is segmented at that field-of-view scale (a photo without a
        field of view to measure warns, FovWarning, and is segmented as it is)."""
        if isinstance(image, (str, os.PathLike)):
            from ..data.io import read_image

            image = read_image(image)
        rgb = as_rgb_uint8(image)
        if not self._warned_grayscale and is_grayscale(rgb):
            from ..data.io import ImageConversionWarning

            warnings.warn(GRAYSCALE_WARNING + " (warned once)", ImageConversionWarning,
                          stacklevel=2)
            self._warned_grayscale = True
        scale = self._scale(rgb)
        if scale is not None and scale != 1.0:
            return self._predict_rescaled(rgb, scale, return_probs)
        # the uint8 image as (1, 3, H, W); the engine normalises it band by band, so a large
        # image never exists as float (4x the bytes) nor do its logits
        with torch.inference_mode():
            x = self._as_input(rgb)
            norm = (self._mean, self._std)
            if not return_probs:
                return self.engine(x, "labels", normalize=norm)[0].cpu().numpy()
            labels, probs = self.engine(x, ("labels", "probs"), normalize=norm, prob_class=1)
            return labels[0].cpu().numpy(), probs[0].cpu().numpy()

    def _as_input(self, rgb):
        with warnings.catch_warnings():  # a read-only array (a decoded file's) is never written
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            return torch.from_numpy(rgb).to(self.device, non_blocking=True).permute(2, 0, 1)[None]

    def _scale(self, rgb):
        """The factor that brings the photo's field of view to ``fov_diameter`` (None: no
        rescaling wanted or no field of view found, which warns)."""
        if self.fov_diameter is None:
            return None
        from .fov import FovWarning, fov_scale

        scale = fov_scale(rgb, self.fov_diameter)
        if scale is None:
            warnings.warn(f"no field of view found (a bright disc on a dark border): the image is "
                          f"segmented at its own scale, not rescaled to a field of view "
                          f"{self.fov_diameter:.0f} pixels across", FovWarning, stacklevel=3)
        return scale

    def _predict_rescaled(self, rgb, scale, return_probs):
        from .fov import resize_image, resize_logits, scaled_size

        height, width = rgb.shape[:2]
        small = resize_image(rgb, *scaled_size(height, width, scale))
        with torch.inference_mode():
            logits = self.engine(self._as_input(small), "logits",
                                 normalize=(self._mean, self._std))[0]
            labels, probs = resize_logits(logits, height, width, 1 if return_probs else None)
            labels = labels.cpu().numpy()
            return (labels, probs.cpu().numpy()) if return_probs else labels

    def predict_many(self, images, return_probs=False):
        """Yield ``predict`` of each path or array, in order; the next file is read from disk
        while the current one is segmented. A file that cannot be read raises
        ``fastunet.data.io.ImageReadError`` when its turn comes."""
        from ..data.io import decode_image

        for item, data in prefetch_files(images):
            if isinstance(data, BaseException):
                raise data
            image = decode_image(data, str(item)) if isinstance(data, bytes) else data
            yield self.predict(image, return_probs=return_probs)


def _read_checkpoint(path):
    """The checkpoint file's object; IsADirectoryError / FileNotFoundError name the path."""
    from ..models.checkpoint import read_checkpoint

    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {os.fspath(path)!r} is a folder, not a .pth file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} does not exist")
    return read_checkpoint(path)


def _fov_diameter(fov_diameter, meta):
    """The field-of-view diameter photos are rescaled to (None: no rescaling)."""
    if fov_diameter == "auto":
        recorded = meta.get("fov_diameter")
        return float(recorded) if isinstance(recorded, (int, float)) and recorded > 0 else None
    if fov_diameter is None:
        return None
    if isinstance(fov_diameter, bool) or not isinstance(fov_diameter, (int, float)) or not (
            16 <= fov_diameter <= 100000):
        raise ValueError(f"fov_diameter must be 'auto', None or a number of pixels (16 or "
                         f"more), got {fov_diameter!r}")
    return float(fov_diameter)


def prefetch_files(items, depth=2):
    """Yield (item, bytes of the file | the array itself | the exception raised reading it),
    reading up to `depth` files ahead in a background thread (file I/O only: decoding, and so
    its conversion warnings, stays in the caller's thread)."""
    from ..data.io import ImageReadError

    items = list(items)
    ready = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def read(item):
        if not isinstance(item, (str, os.PathLike)):
            return item
        try:
            with open(item, "rb") as f:
                return f.read()
        except OSError as exc:
            return ImageReadError(f"{item}: cannot read file ({exc.strerror or exc})")

    def worker():
        for item in items:
            value = read(item)
            while not stop.is_set():
                try:
                    ready.put((item, value), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return

    thread = threading.Thread(target=worker, name="fastunet-prefetch", daemon=True)
    thread.start()
    try:
        for _ in items:
            yield ready.get()
    finally:
        stop.set()
