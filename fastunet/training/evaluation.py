"""Evaluation shared by ``fastunet.train`` and ``fastunet.test``: predict, score, draw.

Each image is normalised, predicted at native resolution by ``model.inference`` (the config's
test mode, or the one asked for), and scored with :class:`fastunet.metrics.SegMetric` pooled over
the whole set (optionally only inside the field of view). Under torchrun each rank predicts every
world_size-th image and the pixel counts are summed over ranks, so every rank ends with the
metrics of the whole set.
"""
import os
import time

import numpy as np
import torch

from ..data.io import write_png
from ..data.transforms import normalize
from ..metrics import SegMetric
from . import distributed

__all__ = ["evaluate", "predict_logits", "error_overlay", "TEST_MODES"]

TEST_MODES = ("slide", "whole", "overlap-tile")


def predict_logits(model, x, mode=None, **options):
    """Logits (N, C, H, W) of normalised images in the config's test mode or ``mode``.

    ``options`` go to the inference engine (:class:`fastunet.inference.InferenceEngine`:
    channels_last, cuda_graphs, precision, ...).
    """
    if mode is not None and mode not in TEST_MODES:
        raise ValueError(f"unknown test mode {mode!r}; choose one of {', '.join(TEST_MODES)}")
    return model.inference(x, mode=mode, **options)


OVERLAY_COLOURS = (("vessel found", (40, 220, 40)), ("missed", (60, 120, 255)),
                   ("false vessel", (235, 45, 45)))
_LEGEND_HEIGHT = 22


def error_overlay(rgb, pred, label, fov=None):
    """Image | prediction side by side: vessels found (green), missed (blue), false (red), with
    that colour legend in a strip below (the picture is widened when the legend is wider).

    rgb: HxWx3 uint8; pred, label: HxW class maps (1 = vessel, 255 in label = ignored).
    """
    pred, label = np.asarray(pred) == 1, np.asarray(label)
    valid = label != 255
    if fov is not None:
        valid &= np.asarray(fov, bool)
    truth = (label == 1) & valid
    base = (rgb.astype(np.float32) * 0.55).astype(np.uint8)
    out = base.copy()
    (_, found), (_, missed), (_, false) = OVERLAY_COLOURS
    out[pred & truth] = found
    out[pred & ~truth & valid] = false
    out[~pred & truth] = missed
    gap = np.full((rgb.shape[0], 6, 3), 255, np.uint8)
    return _with_legend(np.concatenate([rgb, gap, out], axis=1))


def _with_legend(picture):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = 6 + sum(16 + probe.textlength(name, font=font) + 14 for name, _ in OVERLAY_COLOURS)
    h, w = picture.shape[:2]
    canvas = Image.new("RGB", (max(w, int(width)), h + _LEGEND_HEIGHT), "white")
    canvas.paste(Image.fromarray(picture), (0, 0))
    draw, x = ImageDraw.Draw(canvas), 6
    for name, colour in OVERLAY_COLOURS:
        draw.rectangle([x, h + 6, x + 11, h + 17], fill=colour, outline=(90, 90, 90))
        draw.text((x + 16, h + 5), name, fill="black", font=font)
        x += 16 + probe.textlength(name, font=font) + 14
    return np.asarray(canvas)


@torch.no_grad()
def evaluate(model, dataset, device, mode=None, use_fov=False, rank=0, world_size=1,
             save_dir=None, overlay_path=None, overlay_index=0, progress=None,
             weights_change=False, tta=None, precision="fp32"):
    """Score ``model`` on ``dataset`` (items dict(img, label, name, fov)); returns
    (SegMetric summed over ranks, seconds). The metric holds the vessel probabilities' AUC
    too. ``save_dir``: write each prediction as
    ``<name>.png`` (vessel 255, background 0). ``overlay_path``: write :func:`error_overlay` of
    item ``overlay_index`` (by the rank that predicts it). ``progress``: a callable(done, total).
    ``weights_change``: the model will be trained further (evaluation during training): no CUDA
    graphs, which would keep replaying the folded weights of their capture. ``tta``: None, "h",
    "v" or "hv": also predict flipped images and average the logits. ``precision``: the
    inference engine's (fp32: mmseg's numbers).
    """
    was_training = model.training
    model.eval()
    metric = SegMetric(num_classes=model.num_classes,
                       class_names=getattr(dataset, "CLASSES", None)
                       if len(getattr(dataset, "CLASSES", ())) == model.num_classes else None)
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    channels_last = weight is not None and not weight.is_contiguous() and weight.is_contiguous(
        memory_format=torch.channels_last)
    options = {"channels_last": channels_last, "precision": precision}
    if weights_change:
        options["cuda_graphs"] = False
    if tta:
        options["tta"] = tta
    t0 = time.perf_counter()
    mine = list(range(rank, len(dataset), world_size))
    for done, i in enumerate(mine, 1):
        item = dataset[i]
        x = normalize(item["img"])[None].to(device)
        logits = predict_logits(model, x, mode, **options)
        pred = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
        prob = logits[0].float().softmax(0)[1].cpu() if logits.shape[1] > 1 else None
        fov = item.get("fov") if use_fov else None
        if use_fov and fov is None:
            raise ValueError(f"--fov: image {item.get('name', i)} has no field-of-view mask "
                             f"(only DRIVE, synthetic and HRF with masks provide one)")
        metric.update(pred, item["label"], fov=fov, prob=prob)
        if save_dir is not None:
            os.makedirs(save_dir, exist_ok=True)
            write_png(os.path.join(save_dir, f"{item.get('name', i)}.png"),
                      (pred == 1).astype(np.uint8) * 255)
        if overlay_path is not None and i == overlay_index:
            os.makedirs(os.path.dirname(os.path.abspath(overlay_path)), exist_ok=True)
            write_png(overlay_path, error_overlay(item["img"], pred, item["label"], fov))
        if progress is not None:
            progress(done, len(mine))
    if world_size > 1:
        def sum_over_ranks(counts):
            if device.type == "cuda":  # NCCL reduces device tensors only
                counts = counts.to(device)
            distributed.all_reduce_sum(counts)
            return counts

        metric.reduce_counts(sum_over_ranks)
        metric.num_images = len(dataset)
    model.train(was_training)
    return metric, time.perf_counter() - t0
