"""Data: image I/O, dataset converters, datasets, the training pipeline, synthetic vessels."""
from .datasets import (DATASET_INFO, DATASETS, ChaseDB1Dataset, DRIVEDataset, FolderDataset,
                       HRFDataset, STAREDataset, VesselDataset, build_dataset)
from .io import (ImageConversionWarning, ImageReadError, decode_image, decode_label, read_image,
                 read_label, write_png)
from .transforms import (MEAN, STD, EpochSampler, TestTransform, TrainDataset, TrainTransform,
                         sample_rng)

__all__ = ["DATASET_INFO", "DATASETS", "ChaseDB1Dataset", "DRIVEDataset", "EpochSampler",
           "FolderDataset", "HRFDataset", "ImageConversionWarning", "ImageReadError", "MEAN",
           "STAREDataset", "STD", "TestTransform", "TrainDataset", "TrainTransform",
           "VesselDataset", "build_dataset", "decode_image", "decode_label", "read_image",
           "read_label", "sample_rng", "write_png"]
