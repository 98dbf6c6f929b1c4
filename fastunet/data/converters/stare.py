"""STARE: ``stare-images.tar``, ``labels-ah.tar`` (and optional ``labels-vk.tar``).

As mmseg's ``tools/dataset_converters/stare.py``: the 20 images ``im0001.ppm.gz``... sorted by
name, the first 10 to ``training``, the last 10 to ``validation``: ``im0001.png`` with its
annotation ``im0001.ah.png`` (Hoover) and, when labels-vk.tar is given, ``im0001.vk.png``
(Kouznetsova). STARE ships no FOV masks.
"""
from .common import (ConvertError, Sample, archives_of, check_archives_used, check_count,
                     check_paired, match_members, rx)

NAME = "stare"
IMAGE_SIZE = (605, 700)  # (h, w) of the original images
ARCHIVES = "stare-images.tar labels-ah.tar [labels-vk.tar]"
TOTAL, TRAINING = 20, 10
_PPM = r"\.(?i:ppm)(?:\.(?i:gz))?"
PATTERNS = {
    "image": rx(r"(?P<id>im\d+)" + _PPM),
    "ah": rx(r"(?P<id>im\d+)\.ah" + _PPM),
    "vk": rx(r"(?P<id>im\d+)\.vk" + _PPM),
}


def plan(archives):
    """Samples of STARE's archives (validated: counts, pairing, the right archives)."""
    found = match_members(archives, PATTERNS)
    check_archives_used(archives, found, f"STARE needs {ARCHIVES}")
    images, ah, vk = found["image"], found["ah"], found["vk"]
    if not images:
        raise ConvertError(f"no STARE images (im0001.ppm.gz ...): pass stare-images.tar "
                           f"(STARE needs {ARCHIVES})")
    if not ah:
        raise ConvertError(f"no STARE labels (im0001.ah.ppm.gz ...): pass labels-ah.tar "
                           f"(STARE needs {ARCHIVES})")
    check_count(f"STARE images in {archives_of(images, 'stare-images.tar')}", len(images),
                TOTAL)
    check_paired("images", images, "labels-ah annotations", ah)
    if vk:
        check_paired("images", images, "labels-vk annotations", vk)
    samples = []
    for k, ident in enumerate(sorted(images)):
        labels = {f"{ident}.ah.png": ah[ident]}
        if vk:
            labels[f"{ident}.vk.png"] = vk[ident]
        samples.append(Sample("training" if k < TRAINING else "validation", f"{ident}.png",
                              images[ident], labels))
    return samples
