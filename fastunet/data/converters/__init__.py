"""Converters from the original dataset archives to fastunet's (mmseg's) data-root layout.

    <root>/images/{training,validation}/*.png        RGB
    <root>/annotations/{training,validation}/*.png   single channel, {0, 1}  (value >= 128)
    <root>/fov/{training,validation}/<image>.png     field-of-view mask, {0, 1} (DRIVE; HRF if given)
    <root>/fastunet_dataset.json                      source archives and file hashes

Use ``python -m fastunet.convert`` or ``convert_dataset(name, archives, root)``.
"""
from . import chase_db1, drive, hrf, stare
from .common import MANIFEST, Archive, ConvertError, convert, max_pixels_of, read_manifest

CONVERTERS = {m.NAME: m for m in (drive, stare, chase_db1, hrf)}


def convert_dataset(name, archives, root, overwrite=False, progress=False):
    """Convert the original archives of dataset `name` into `root`; 'written' or 'up-to-date'."""
    if name not in CONVERTERS:
        raise ConvertError(f"unknown dataset {name!r}; choose one of {', '.join(CONVERTERS)}")
    opened = [Archive(p) for p in archives]
    if not opened:
        raise ConvertError(f"no archives given; {name} needs {CONVERTERS[name].ARCHIVES}")
    samples = CONVERTERS[name].plan(opened)
    return convert(name, samples, opened, root, overwrite=overwrite, progress=progress,
                   max_pixels=max_pixels_of(CONVERTERS[name].IMAGE_SIZE))


__all__ = ["CONVERTERS", "ConvertError", "MANIFEST", "convert_dataset", "read_manifest"]
