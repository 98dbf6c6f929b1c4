"""Checks that the CMake build and setup.py build the same native library.

    python tools/check_cmake_parity.py BUILD_DIR

Compares (1) the source lists (setup.py's vs BUILD_DIR/fastunet_sources.txt), (2) the ops each
binary registers, (3) the results of every op on a fixed input. Each binary is loaded in its own
process, since both register the same TORCH_LIBRARY namespace. Exit status 1 on any drift.
"""
import glob
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a child process: load one binary, list its ops, run them on fixed inputs.
PROBE = r"""
import sys, torch
which, out = sys.argv[1], sys.argv[2]
if which == "setup.py":
    import fastunet  # the package's own extension
else:
    torch.ops.load_library(which)
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastunet::"))
torch.manual_seed(0)
img = torch.randn(2, 3, 45, 59, dtype=torch.float64)
w = torch.rand(20, 24, dtype=torch.float64)
tiles = torch.ops.fastunet.tile_extract(img, 20, 24, 13, 17, w, True)
agg = torch.ops.fastunet.tile_aggregate(tiles, 2, 45, 59, 13, 17, w, True)
torch.save({"ops": ops, "tiles": tiles, "agg": agg}, out)
"""


def probe(which, tmp):
    out = os.path.join(tmp, f"{len(os.listdir(tmp))}.pt")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", PROBE, which, out], check=True, cwd=ROOT, env=env)
    return torch.load(out)


def main(build_dir):
    problems = []
    env = dict(os.environ, FASTUNET_PRINT_SOURCES="1")
    setup_sources = subprocess.run([sys.executable, "setup.py"], cwd=ROOT, env=env, check=True,
                                   capture_output=True, text=True).stdout.split()
    with open(os.path.join(build_dir, "fastunet_sources.txt")) as f:
        cmake_sources = f.read().split()
    if sorted(setup_sources) != sorted(cmake_sources):
        problems.append(f"sources differ: setup.py {sorted(setup_sources)} vs CMake "
                        f"{sorted(cmake_sources)}")
    libs = glob.glob(os.path.join(build_dir, "_C*.so"))
    if len(libs) != 1:
        problems.append(f"expected one _C*.so in {build_dir}, found {libs}")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            a, b = probe("setup.py", tmp), probe(os.path.abspath(libs[0]), tmp)
        if a["ops"] != b["ops"]:
            problems.append(f"ops differ: setup.py {a['ops']} vs CMake {b['ops']}")
        for key in ("tiles", "agg"):
            if not torch.equal(a[key], b[key]):
                problems.append(f"results differ for {key}")
        print(f"ops registered by both builds: {', '.join(a['ops'])}")
    print(f"sources compiled by both builds: {', '.join(sorted(setup_sources))}")
    for p in problems:
        print(f"DRIFT: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
