"""CHASE_DB1: ``CHASEDB1.zip`` (flat: ``Image_01L.jpg``, ``Image_01L_1stHO.png``, ``..._2ndHO.png``).

As mmseg's ``tools/dataset_converters/chase_db1.py``: the 28 images sorted by name, the first
20 to ``training``, the last 8 to ``validation``: ``Image_01L.png`` with ``Image_01L_1stHO.png``
(the annotation used for training and scoring) and ``Image_01L_2ndHO.png``. No FOV masks.
"""
from .common import (ConvertError, Sample, archives_of, check_archives_used, check_count,
                     check_paired, match_members, rx)

NAME = "chase_db1"
IMAGE_SIZE = (960, 999)  # (h, w) of the original images
ARCHIVES = "CHASEDB1.zip"
TOTAL, TRAINING = 28, 20
PATTERNS = {
    "image": rx(r"(?P<id>Image_\d+[LR])\.(?i:jpe?g)"),
    "1stHO": rx(r"(?P<id>Image_\d+[LR])_1stHO\.(?i:png)"),
    "2ndHO": rx(r"(?P<id>Image_\d+[LR])_2ndHO\.(?i:png)"),
}


def plan(archives):
    """Samples of CHASEDB1.zip (validated: counts, pairing, the right archive)."""
    found = match_members(archives, PATTERNS)
    check_archives_used(archives, found, f"CHASE_DB1 needs {ARCHIVES}")
    images, first, second = found["image"], found["1stHO"], found["2ndHO"]
    if not images:
        raise ConvertError(f"no CHASE_DB1 images (Image_01L.jpg ...): pass {ARCHIVES}")
    check_count(f"CHASE_DB1 images in {archives_of(images, ARCHIVES)}", len(images), TOTAL)
    check_paired("images", images, "_1stHO annotations", first)
    if second:
        check_paired("images", images, "_2ndHO annotations", second)
    samples = []
    for k, ident in enumerate(sorted(images)):
        labels = {f"{ident}_1stHO.png": first[ident]}
        if second:
            labels[f"{ident}_2ndHO.png"] = second[ident]
        samples.append(Sample("training" if k < TRAINING else "validation", f"{ident}.png",
                              images[ident], labels))
    return samples
