"""Convert the original retinal-vessel dataset archives into fastunet's training layout.

    python -m fastunet.convert drive training.zip test.zip -o data/DRIVE
    python -m fastunet.convert stare stare-images.tar labels-ah.tar labels-vk.tar -o data/STARE
    python -m fastunet.convert chase_db1 CHASEDB1.zip -o data/CHASE_DB1
    python -m fastunet.convert hrf healthy.zip glaucoma.zip diabetic_retinopathy.zip \\
        healthy_manualsegm.zip glaucoma_manualsegm.zip diabetic_retinopathy_manualsegm.zip -o data/HRF
"""
import argparse
import sys

from fastunet._cli import ArgumentParser, fail
from fastunet.atomic import DiskFullError
from fastunet.data.converters import (CONVERTERS, MANIFEST, ConvertError, convert_dataset,
                                      read_manifest)

_EPILOG = f"""\
examples:
  python -m fastunet.convert drive training.zip test.zip -o data/DRIVE
  python -m fastunet.convert stare stare-images.tar labels-ah.tar labels-vk.tar -o data/STARE
  python -m fastunet.convert chase_db1 CHASEDB1.zip -o data/CHASE_DB1
  python -m fastunet.convert hrf healthy.zip glaucoma.zip diabetic_retinopathy.zip \\
      healthy_manualsegm.zip glaucoma_manualsegm.zip diabetic_retinopathy_manualsegm.zip -o data/HRF

archives each dataset needs (any order; members are recognised by name, not by archive name):
  drive      {CONVERTERS['drive'].ARCHIVES}
  stare      {CONVERTERS['stare'].ARCHIVES}
  chase_db1  {CONVERTERS['chase_db1'].ARCHIVES}
  hrf        {CONVERTERS['hrf'].ARCHIVES}

output layout (file names as mmseg's converters write them):
  ROOT/images/{{training,validation}}/NAME.png       RGB images
  ROOT/annotations/{{training,validation}}/*.png     labels, one channel, 0 background / 1 vessel
                                                  (value >= 128 in the original annotation)
  ROOT/fov/{{training,validation}}/NAME.png          field-of-view masks, 0/1, same NAME as the
                                                  image (DRIVE; HRF when *_fovmask.zip is given)
  ROOT/{MANIFEST}                       source archives (SHA-256) and the hash of every file

The data root is built in a temporary directory beside ROOT and renamed into place when
complete, so an interrupted run never leaves a partial ROOT (the next run deletes the hidden
temporary directory a killed run left). Archive members larger than any image of the dataset
can be are refused before they are read. Re-running with the same archives
finds ROOT up to date and changes nothing; if ROOT holds anything else the command refuses
unless --overwrite is given (the old ROOT is then replaced once the new one is complete).
Exit status: 0 on success, 1 on a data error (wrong/corrupt archive, missing members, wrong
counts), 2 on a usage error.
"""


PROG = "fastunet.convert"


def build_parser():
    """The argument parser of ``python -m fastunet.convert``."""
    p = ArgumentParser(
        prog="python -m fastunet.convert",
        description="Convert the original DRIVE / STARE / CHASE_DB1 / HRF archives, exactly as "
                    "distributed (zip, tar, TIFF, GIF, gzipped PPM, JPEG, PNG), into the data-root "
                    "layout that fastunet (and mmseg) train and test on.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=sorted(CONVERTERS), help="which dataset the archives hold")
    p.add_argument("archives", nargs="+", metavar="ARCHIVE", help="the original archive files")
    p.add_argument("-o", "--out", required=True, metavar="ROOT",
                   help="data root to create, e.g. data/DRIVE")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing ROOT that holds something else")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    """Run the converter CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        result = convert_dataset(args.dataset, args.archives, args.out,
                                 overwrite=args.overwrite, progress=not args.quiet)
    except ConvertError as e:
        return fail(PROG, e, code=1)
    except OSError as e:  # the output side: permissions, a full disk
        what = str(e) if isinstance(e, DiskFullError) else \
            f"cannot write {e.filename or args.out}: {e.strerror or e}"
        return fail(PROG, f"{what}; nothing was changed in {args.out}", code=1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {args.out} was not changed", file=sys.stderr)
        return 130
    counts = read_manifest(args.out).get("counts", {})
    summary = ", ".join(f"{n} {split}" for split, n in counts.items())
    if result == "up-to-date":
        print(f"{args.out}: already converted from these archives ({summary}); nothing to do")
    else:
        print(f"{args.out}: {args.dataset} converted ({summary} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
