"""Data: image I/O, dataset converters, datasets, the training pipeline, synthetic vessels.

    from fastunet.data import build_dataset, TrainTransform, TrainDataset, EpochSampler
    ds = build_dataset("drive", "data/DRIVE", "training")       # or "synthetic", "folder", ...
    train = TrainDataset(ds, TrainTransform(crop_size=(64, 64), img_scale=(584, 565)), seed=0)
"""
from .datasets import (DATASET_INFO, DATASETS, ChaseDB1Dataset, DatasetError, DRIVEDataset,
                       FolderDataset, HRFDataset, STAREDataset, VesselDataset, build_dataset)
from .io import (ImageConversionWarning, ImageReadError, decode_image, decode_label, read_image,
                 read_label, write_png)
from .synthetic import SyntheticVessels, green_channel_baseline, write_synthetic
from .transforms import (MEAN, STD, EpochSampler, TestTransform, TrainDataset, TrainTransform,
                         sample_rng)

__all__ = ["DATASET_INFO", "DATASETS", "ChaseDB1Dataset", "DRIVEDataset", "DatasetError",
           "EpochSampler",
           "FolderDataset", "HRFDataset", "ImageConversionWarning", "ImageReadError", "MEAN",
           "STAREDataset", "STD", "SyntheticVessels", "TestTransform", "TrainDataset",
           "TrainTransform", "VesselDataset", "build_dataset", "decode_image", "decode_label",
           "green_channel_baseline", "read_image", "read_label", "sample_rng", "write_png",
           "write_synthetic"]
