"""Shared machinery of the dataset converters: archives, member matching, atomic data roots.

A converter module (drive.py, ...) only says which archive members it expects and where each
goes (``plan(archives) -> [Sample]``) and how large its images are (``IMAGE_SIZE``); ``convert``
here decodes, validates and writes them into a temporary directory beside the target and renames
it into place (:func:`fastunet.atomic.atomic_directory`), so a data root is either complete or
absent. A manifest (``fastunet_dataset.json``) records the source archives and the SHA-256 of
every written file, which makes re-running idempotent.

Archives are not trusted: a member may be read only if its declared size is one an image of
the dataset can have (:func:`member_limit`), it is read in a bounded stream, and its pixels are
checked against the dataset's from the image header before it is decoded, so a small member that
inflates to gigabytes, or declares a huge image, is refused before it costs memory.
"""
import dataclasses
import hashlib
import json
import os
import re
import sys
import tarfile
import threading
import zipfile
import zlib

import numpy as np

from ..io import ImageReadError, decode_image, write_png

MANIFEST = "fastunet_dataset.json"
SPLITS = ("training", "validation")
_FORMAT = 1


class ConvertError(Exception):
    """A conversion cannot proceed; the message says what was wrong and what to do."""


def max_pixels_of(image_size):
    """Pixels a member of a dataset whose images are ``image_size`` (h, w) may declare: 4x the
    originals' (room for re-encoded variants; far below what could exhaust memory)."""
    return 4 * image_size[0] * image_size[1]


def member_limit(max_pixels):
    """Bytes a member holding at most ``max_pixels`` pixels can take: uncompressed 16-bit RGBA
    (8 bytes a pixel) plus 1 MiB of headers."""
    return 8 * max_pixels + (1 << 20)


class Archive:
    """A zip or tar archive (any tar compression), listed once, members read on demand."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        self._lock = threading.Lock()
        if os.path.isdir(self.path):
            raise ConvertError(f"{self.path}: is a folder; pass the archive files themselves")
        if not os.path.isfile(self.path):
            raise ConvertError(f"{self.path}: no such file")
        if os.path.getsize(self.path) == 0:
            raise ConvertError(f"{self.path}: file is empty (0 bytes); download it again")
        try:
            if zipfile.is_zipfile(self.path):
                self._zip = zipfile.ZipFile(self.path)
                self._tar = None
                self.members = [i.filename for i in self._zip.infolist() if not i.is_dir()]
            elif tarfile.is_tarfile(self.path):
                self._zip = None
                self._tar = tarfile.open(self.path)
                self._tar_members = {m.name: m for m in self._tar.getmembers() if m.isfile()}
                self.members = list(self._tar_members)
            else:
                raise ConvertError(f"{self.path}: not a zip or tar archive (truncated, "
                                   "corrupt or the wrong file?); download it again")
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
            raise ConvertError(f"{self.path}: cannot read archive ({e}); "
                               "download it again") from None

    def size(self, member):
        """The uncompressed size the archive declares for a member."""
        if self._zip is not None:
            return self._zip.getinfo(member).file_size
        return self._tar_members[member].size

    def read(self, member, limit=None):
        """Bytes of one member, at most ``limit`` (streamed: a member that would inflate beyond
        it is refused before it is read whole); a corrupt archive raises ConvertError naming
        archive and member."""
        declared = self.size(member)
        if limit is not None and declared > limit:
            raise ConvertError(f"{self.path}: member {member} declares {declared} bytes, more than "
                               f"any image of this dataset takes ({limit}); the archive is not "
                               f"the original, download it again")
        try:
            with self._lock:
                f = (self._zip.open(member) if self._zip is not None
                     else self._tar.extractfile(self._tar_members[member]))
                with f:
                    data = f.read(declared + 1)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ConvertError(f"{self.path}: member {member} is corrupt ({e}); "
                               "download the archive again") from None
        if len(data) > declared:
            raise ConvertError(f"{self.path}: member {member} holds more than the {declared} "
                               f"bytes it declares; download the archive again")
        return data

    def sha256(self):
        """SHA-256 of the archive file (identifies the input in the manifest)."""
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()


@dataclasses.dataclass
class Member:
    """One archive member: where it lives."""
    archive: Archive
    name: str

    def read(self, limit=None):
        return self.archive.read(self.name, limit)

    def __str__(self):
        return f"{self.archive.path}:{self.name}"


def archives_of(members, default):
    """The archives (as given) that ``members`` ({id: Member}) came from, else ``default``."""
    paths = sorted({m.archive.path for m in members.values()})
    return ", ".join(paths) if paths else default


@dataclasses.dataclass
class Sample:
    """One image with its labels (and FOV mask) and the split it goes to.

    labels: {output file name: member}; the first entry is the primary annotation.
    """
    split: str
    image_name: str
    image: Member
    labels: dict
    fov: Member = None


def match_members(archives, patterns):
    """Group archive members by pattern: {key: {match.group('id'): Member}}.

    patterns: {key: compiled regex with a named group 'id'}, matched against the member path
    with '/' separators. A file matched twice (in two archives) is an error.
    """
    found = {key: {} for key in patterns}
    for archive in archives:
        for name in archive.members:
            path = name.replace("\\", "/")
            for key, rx in patterns.items():
                m = rx.search(path)
                if m:
                    ident = m.group("id")
                    first = found[key].get(ident)
                    if first is not None and first.archive is archive:
                        raise ConvertError(f"duplicate member inside {archive.path}: {first.name} "
                                           f"and {name} are the same file; the archive is "
                                           f"damaged or repacked, download it again")
                    if first is not None:
                        raise ConvertError(f"{first} and {archive.path}:{name} are the same file "
                                           "twice: pass each archive once")
                    found[key][ident] = Member(archive, name)
                    break
    return found


def check_archives_used(archives, found, expected):
    """Fail when an archive contributed no expected member (the wrong archive was passed)."""
    used = {m.archive.path for group in found.values() for m in group.values()}
    for a in archives:
        if a.path not in used:
            raise ConvertError(f"{a.path}: contains none of the expected files; {expected}")


def check_count(what, got, expected, hint=""):
    """Fail with a clear message when a member count is wrong."""
    if got != expected:
        raise ConvertError(f"expected {expected} {what}, found {got}"
                           + (f"; {hint}" if hint else ""))


def check_paired(what_a, a, what_b, b, hint=""):
    """Fail when two id sets differ, naming a few missing ids."""
    if set(a) != set(b):
        missing = sorted(set(a) - set(b))[:5]
        extra = sorted(set(b) - set(a))[:5]
        parts = []
        if missing:
            parts.append(f"{what_b} missing for {', '.join(missing)}")
        if extra:
            parts.append(f"{what_b} without {what_a}: {', '.join(extra)}")
        raise ConvertError("; ".join(parts) + (f"; {hint}" if hint else ""))


def rx(pattern):
    """A member pattern anchored at a path component boundary, extensions case-insensitive."""
    return re.compile(r"(?:^|/)" + pattern + r"$")


def binarize(data, name, max_pixels=None):
    """Label/mask bytes -> {0,1} uint8: ``value >= 128`` on the first channel of the BGR image.

    mmseg's converters read annotations with OpenCV (BGR) and keep ``img[:, :, 0] // 128``, i.e.
    the blue channel; for the gray annotations of these datasets every channel is the same.
    """
    return (decode_image(data, name, max_pixels)[..., 2] >= 128).astype(np.uint8)


def _convert_sample(sample, tmp_root, max_pixels):
    """Decode, validate and write one sample; returns the relative paths written."""
    limit = member_limit(max_pixels)
    written = []
    try:
        img = decode_image(sample.image.read(limit), str(sample.image), max_pixels)
    except ImageReadError as e:
        raise ConvertError(f"unreadable image: {e}; download the archive again") from None
    h, w = img.shape[:2]
    outputs = [(f"images/{sample.split}/{sample.image_name}", img)]
    parts = [(f"annotations/{sample.split}/{n}", m) for n, m in sample.labels.items()]
    if sample.fov is not None:
        parts.append((f"fov/{sample.split}/{sample.image_name}", sample.fov))
    for rel, member in parts:
        try:
            mask = binarize(member.read(limit), str(member), max_pixels)
        except ImageReadError as e:
            raise ConvertError(f"unreadable label/mask: {e}; download the archive again") from None
        if mask.shape != (h, w):
            raise ConvertError(f"{member}: size {mask.shape[1]}x{mask.shape[0]} differs from its "
                               f"image {sample.image} ({w}x{h})")
        outputs.append((rel, mask))
    for rel, array in outputs:
        write_png(os.path.join(tmp_root, rel), array)
        written.append(rel)
    return written


def _file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(root):
    """The manifest of a converted root as a dict ({} when absent or unreadable)."""
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _up_to_date(root, manifest):
    """True when root holds exactly the files a conversion with this input would produce."""
    old = read_manifest(root)
    if not old:
        return False
    if {k: old.get(k) for k in ("format", "dataset", "archives")} != \
            {k: manifest[k] for k in ("format", "dataset", "archives")}:
        return False
    files = old.get("files", {})
    on_disk = {os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
               for d, _, fs in os.walk(root) for f in fs} - {MANIFEST}
    if on_disk != set(files):
        return False
    return all(_file_sha256(os.path.join(root, rel)) == digest for rel, digest in files.items())


def convert(dataset, samples, archives, out_root, overwrite=False, progress=True,
            max_pixels=None):
    """Write samples into out_root atomically; returns 'written' or 'up-to-date'.

    out_root may not exist yet, or be empty. If it holds the result of converting the same
    archives it is left alone ('up-to-date'); any other existing content is refused unless
    ``overwrite``, in which case it is replaced only after the new root is complete. Members of
    more than ``max_pixels`` pixels (default: the io module's limit) are refused.
    """
    from tqdm import tqdm

    from ...atomic import atomic_directory, atomic_write, remove_stale_temp_files
    from ..io import MAX_PIXELS

    max_pixels = max_pixels or MAX_PIXELS
    out_root = os.path.abspath(os.fspath(out_root))
    if os.path.exists(out_root) and not os.path.isdir(out_root):
        raise ConvertError(f"{out_root}: exists and is not a directory")
    parent = os.path.dirname(out_root)
    remove_stale_temp_files(parent, recursive=False)  # roots of conversions that were killed
    manifest = {"format": _FORMAT, "dataset": dataset,
                "archives": sorted(({"name": a.name, "size": os.path.getsize(a.path),
                                     "sha256": a.sha256()} for a in archives),
                                   key=lambda d: (d["sha256"], d["name"]))}
    existing = os.path.isdir(out_root) and bool(os.listdir(out_root))
    if existing:
        if _up_to_date(out_root, manifest):
            return "up-to-date"
        if not overwrite:
            raise ConvertError(f"{out_root}: exists and is not this conversion of these archives; "
                               "pass --overwrite to replace it, or choose another -o")
    os.makedirs(parent, exist_ok=True)
    with atomic_directory(out_root, replace=True) as tmp:
        for split in SPLITS:
            for kind in ("images", "annotations"):
                os.makedirs(os.path.join(tmp, kind, split))
        if any(s.fov is not None for s in samples):
            for split in SPLITS:
                os.makedirs(os.path.join(tmp, "fov", split))
        files = []
        bar = tqdm(samples, desc=f"converting {dataset}", unit="img", file=sys.stderr,
                   disable=not progress, leave=False)
        for sample in bar:
            files.extend(_convert_sample(sample, tmp, max_pixels))
        manifest["files"] = {rel: _file_sha256(os.path.join(tmp, rel)) for rel in sorted(files)}
        manifest["counts"] = {split: sum(s.split == split for s in samples) for split in SPLITS}
        with atomic_write(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.write("\n")
    return "written"
