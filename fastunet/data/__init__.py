"""Data: image I/O, dataset converters, datasets, the training pipeline, synthetic vessels."""
from .io import (ImageConversionWarning, ImageReadError, decode_image, decode_label, read_image,
                 read_label, write_png)

__all__ = ["ImageConversionWarning", "ImageReadError", "decode_image", "decode_label",
           "read_image", "read_label", "write_png"]
