"""DRIVE: ``training.zip`` and ``test.zip`` -> images, annotations and FOV masks.

As mmseg's ``tools/dataset_converters/drive.py``: ``training/images/21_training.tif`` ->
``images/training/21.png``, ``training/1st_manual/21_manual1.gif`` ->
``annotations/training/21_manual1.png``; ``test/*`` goes to ``validation`` (``01.png``,
``01_manual1.png``, and ``01_manual2.png`` from ``test/2nd_manual`` when present). The FOV masks
``*/mask/*_mask.gif`` are kept as ``fov/<split>/<image name>``.
"""
from .common import (ConvertError, Sample, archives_of, check_archives_used, check_count,
                     check_paired, match_members, rx)

NAME = "drive"
IMAGE_SIZE = (584, 565)  # (h, w) of the original images
ARCHIVES = "training.zip test.zip"
COUNTS = {"training": 20, "validation": 20}
_TIF, _GIF = r"\.(?i:tiff?)", r"\.(?i:gif)"
PATTERNS = {
    ("training", "image"): rx(r"training/images/(?P<id>\d+)_training" + _TIF),
    ("training", "manual1"): rx(r"training/1st_manual/(?P<id>\d+)_manual1" + _GIF),
    ("training", "fov"): rx(r"training/mask/(?P<id>\d+)_training_mask" + _GIF),
    ("validation", "image"): rx(r"test/images/(?P<id>\d+)_test" + _TIF),
    ("validation", "manual1"): rx(r"test/1st_manual/(?P<id>\d+)_manual1" + _GIF),
    ("validation", "manual2"): rx(r"test/2nd_manual/(?P<id>\d+)_manual2" + _GIF),
    ("validation", "fov"): rx(r"test/mask/(?P<id>\d+)_test_mask" + _GIF),
}


def plan(archives):
    """Samples of DRIVE's two archives (validated: counts, pairing, the right archives)."""
    found = match_members(archives, PATTERNS)
    check_archives_used(archives, found, f"DRIVE needs {ARCHIVES}")
    samples = []
    for split, zipname in (("training", "training.zip"), ("validation", "test.zip")):
        images = found[(split, "image")]
        if not images:
            member = ("training/images/*_training.tif" if split == "training"
                      else "test/images/*_test.tif")
            raise ConvertError(f"no DRIVE {split} images ({member}): pass {zipname} too "
                               f"(DRIVE needs {ARCHIVES})")
        check_count(f"DRIVE {split} images in {archives_of(images, zipname)}", len(images),
                    COUNTS[split])
        manual1 = found[(split, "manual1")]
        if not manual1 and split == "validation":
            raise ConvertError("test.zip has no test/1st_manual/*_manual1.gif: this copy of DRIVE "
                               "lacks the test labels, which validation needs; use a distribution "
                               "that includes them")
        check_paired("images", images, "1st_manual labels", manual1)
        fov = found[(split, "fov")]
        if fov:
            check_paired("images", images, "FOV masks", fov)
        manual2 = found.get((split, "manual2"), {})
        if manual2:
            check_paired("images", images, "2nd_manual labels", manual2)
        for ident in sorted(images):
            labels = {f"{ident}_manual1.png": manual1[ident]}
            if manual2:
                labels[f"{ident}_manual2.png"] = manual2[ident]
            samples.append(Sample(split, f"{ident}.png", images[ident], labels,
                                  fov.get(ident)))
    return samples
