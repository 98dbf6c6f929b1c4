"""HRF: ``{healthy,glaucoma,diabetic_retinopathy}.zip`` + ``*_manualsegm.zip`` (+ ``*_fovmask.zip``).

As mmseg's ``tools/dataset_converters/hrf.py``: per category (``_h``, ``_g``, ``_dr``) the 15
images sorted by name, the first 5 to ``training`` and the other 10 to ``validation``:
``01_h.jpg``/``.JPG`` -> ``images/<split>/01_h.png``, the manual segmentation ``01_h.tif`` ->
``annotations/<split>/01_h.png``. FOV masks (``01_h_mask.tif`` from ``*_fovmask.zip``, or HRF's
``all.zip`` with ``images/``, ``manual1/``, ``mask/``) are kept as ``fov/<split>/01_h.png`` when
given for every image.
"""
from .common import (ConvertError, Sample, archives_of, check_archives_used, check_count,
                     check_paired, match_members, rx)

NAME = "hrf"
IMAGE_SIZE = (2336, 3504)  # (h, w) of the original images
ARCHIVES = ("healthy.zip glaucoma.zip diabetic_retinopathy.zip healthy_manualsegm.zip "
            "glaucoma_manualsegm.zip diabetic_retinopathy_manualsegm.zip [*_fovmask.zip]")
CATEGORIES = {"h": "healthy", "g": "glaucoma", "dr": "diabetic_retinopathy"}
PER_CATEGORY, TRAINING = 15, 5
_ID = r"(?P<id>\d+_(?:h|g|dr))"
PATTERNS = {
    "image": rx(_ID + r"\.(?i:jpe?g)"),
    "label": rx(_ID + r"\.(?i:tiff?)"),
    "fov": rx(_ID + r"_mask\.(?i:tiff?)"),
}


def plan(archives):
    """Samples of HRF's six (or more) archives (validated: counts, pairing, the right archives)."""
    found = match_members(archives, PATTERNS)
    check_archives_used(archives, found, f"HRF needs {ARCHIVES}")
    images, labels, fov = found["image"], found["label"], found["fov"]
    samples = []
    for cat, zipname in CATEGORIES.items():
        ids = sorted(i for i in images if i.endswith("_" + cat))
        if not ids:
            raise ConvertError(f"no HRF images *_{cat}.jpg: pass {zipname}.zip and "
                               f"{zipname}_manualsegm.zip too (HRF needs {ARCHIVES})")
        given = archives_of({i: images[i] for i in ids}, f"{zipname}.zip")
        check_count(f"HRF images *_{cat}.jpg in {given}", len(ids), PER_CATEGORY)
        cat_labels = {i: m for i, m in labels.items() if i.endswith("_" + cat)}
        if not cat_labels:
            raise ConvertError(f"no HRF manual segmentations *_{cat}.tif: pass "
                               f"{zipname}_manualsegm.zip")
        check_paired("images", {i: 0 for i in ids}, f"{zipname}_manualsegm.zip labels", cat_labels)
        for k, ident in enumerate(ids):
            samples.append(Sample("training" if k < TRAINING else "validation", f"{ident}.png",
                                  images[ident], {f"{ident}.png": labels[ident]}, fov.get(ident)))
    if fov:
        check_paired("images", images, "FOV masks", fov,
                     "pass the *_fovmask.zip of every category, or none")
    return samples
