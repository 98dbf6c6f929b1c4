"""From a config's ``data`` section to datasets and the training DataLoader.

Configs name datasets as the published tables do ('DRIVE', 'STARE', 'CHASE_DB1', 'HRF',
'synthetic'); :func:`dataset_key` maps them (any case) to ``fastunet.data.build_dataset``'s
names. For 'synthetic', the config's ``data_root`` is the cache folder of the generated images
(default ``$FASTUNET_CACHE`` or ``~/.cache/fastunet``), generated on first use; a ``--data-root``
is refused there, since whoever passes one means their own images.
"""
import os
import random
import sys

import numpy as np
import torch

from ..data import EpochSampler, TrainDataset, TrainTransform, build_dataset
from ..data.datasets import DATASETS
from .distributed import ShardedSampler

__all__ = ["dataset_key", "check_data_root", "build_split", "train_transform",
           "build_train_loader", "collate_channels_last", "DataRootError"]

_CONVERT_HINT = {
    "drive": "python -m fastunet.convert drive training.zip test.zip -o {root}",
    "stare": "python -m fastunet.convert stare stare-images.tar labels-ah.tar -o {root}",
    "chase_db1": "python -m fastunet.convert chase_db1 CHASEDB1.zip -o {root}",
    "hrf": "python -m fastunet.convert hrf healthy.zip glaucoma.zip diabetic_retinopathy.zip "
           "healthy_manualsegm.zip glaucoma_manualsegm.zip diabetic_retinopathy_manualsegm.zip "
           "-o {root}",
}


class DataRootError(FileNotFoundError):
    """The data root is missing or not in the converted layout; the message says what to run."""


def dataset_key(name):
    """The ``build_dataset`` name of a config's dataset name ('CHASE_DB1' -> 'chase_db1')."""
    key = str(name).strip().lower().replace("-", "_")
    if key == "chasedb1":
        key = "chase_db1"
    if key not in (*DATASETS, "synthetic", "folder"):
        raise ValueError(f"unknown dataset {name!r} in the config; use one of DRIVE, STARE, "
                         f"CHASE_DB1, HRF, synthetic, folder")
    return key


def check_data_root(data_cfg, data_root=None):
    """The data root to use; a one-line DataRootError when a converted root is missing."""
    key = dataset_key(data_cfg["dataset"])
    root = data_root if data_root is not None else data_cfg.get("data_root")
    if key == "synthetic":
        if data_root is not None and data_root != data_cfg.get("data_root"):
            raise DataRootError(
                f"--data-root {data_root}: the synthetic config generates its own images (into "
                f"the cache; FASTUNET_CACHE moves it). To train on your images in {data_root}, "
                f"add --cfg-options data.dataset=folder ({data_root}/images/training/, "
                f"{data_root}/masks/training/, and the same for validation)")
        return root  # a cache folder (None: the default one), created on demand
    if root is None:
        raise DataRootError(f"dataset {data_cfg['dataset']} needs --data-root DIR")
    root = os.fspath(root)
    if key == "folder":
        if not os.path.isdir(root):
            raise DataRootError(f"data root {root} does not exist")
        return root
    for split in ("training", "validation"):
        if not os.path.isdir(os.path.join(root, "images", split)):
            what = "does not exist" if not os.path.isdir(root) else \
                f"has no images/{split}/ folder (not a converted data root)"
            raise DataRootError(f"data root {root} {what}; convert the {data_cfg['dataset']} "
                                f"archives first: {_CONVERT_HINT[key].format(root=root)} "
                                f"(or pass --data-root DIR)")
    return root


def build_split(data_cfg, split, data_root=None):
    """The 'training' or 'validation' dataset of a config (root checked first)."""
    key = dataset_key(data_cfg["dataset"])
    root = check_data_root(data_cfg, data_root)
    if key == "synthetic":
        n = data_cfg.get("num_train" if split == "training" else "num_val", 20)
        size = tuple(data_cfg.get("image_size", (584, 565)))
        return build_dataset("synthetic", root, split, num_images=n, size=size,
                             seed=data_cfg.get("synthetic_seed", 0),
                             progress=sys.stderr.isatty())
    if key == "folder":  # FOV masks, when there are any, in fov/<split>/ beside images/ and masks/
        fov_dir = os.path.join(root, "fov", split)
        return build_dataset(key, root, split,
                             fov_dir=fov_dir if os.path.isdir(fov_dir) else None)
    return build_dataset(key, root, split)


def train_transform(data_cfg):
    """mmseg's training pipeline with the config's crop, scale, augmentation and label resize
    settings (ValueError for a label_resize it does not know)."""
    return TrainTransform(
        crop_size=tuple(data_cfg["crop_size"]), img_scale=tuple(data_cfg["img_scale"]),
        ratio_range=tuple(data_cfg.get("ratio_range", (0.5, 2.0))),
        cat_max_ratio=data_cfg.get("cat_max_ratio", 0.75),
        flip_prob=data_cfg.get("flip_prob", 0.5),
        photometric=data_cfg.get("photometric_distortion", True),
        ignore_index=data_cfg.get("ignore_index", 255),
        mean=tuple(data_cfg.get("mean", (123.675, 116.28, 103.53))),
        std=tuple(data_cfg.get("std", (58.395, 57.12, 57.375))),
        label_resize=data_cfg.get("label_resize", "centre"))


def _seed_worker(worker_id):
    # the pipeline draws from explicit per-sample generators; this only pins the global ones a
    # user's custom transform might touch, so runs stay repeatable
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(1)  # workers share the cores with the model


def collate_channels_last(samples):
    """(images, labels) batch of (image, label) samples with the images in channels_last, the
    layout the model trains in: one copy here (in the loader's worker) instead of two."""
    images, labels = zip(*samples)
    batch = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype,
                        memory_format=torch.channels_last)
    for out, image in zip(batch, images):
        out.copy_(image)
    return batch, torch.stack(labels)


def build_train_loader(dataset, data_cfg, batch_per_rank, total_batch, seed, start_iter,
                       rank=0, world_size=1, workers=2, pin_memory=False, generator=None,
                       channels_last=False):
    """Endless DataLoader of (images, labels) batches; iteration i (every rank together) holds
    the global samples i·total_batch .. (i+1)·total_batch - 1 of the seeded epoch order.
    ``channels_last``: image batches in that memory format (same values)."""
    train = TrainDataset(dataset, train_transform(data_cfg), seed=seed)
    sampler = ShardedSampler(EpochSampler(len(train), seed=seed, start=start_iter * total_batch),
                             rank, world_size)
    kwargs = {}
    if workers > 0:
        kwargs = dict(persistent_workers=True, prefetch_factor=4, worker_init_fn=_seed_worker)
    if channels_last:
        kwargs["collate_fn"] = collate_channels_last
    return torch.utils.data.DataLoader(train, batch_size=batch_per_rank, sampler=sampler,
                                       num_workers=workers, pin_memory=pin_memory,
                                       drop_last=True, generator=generator, **kwargs)
