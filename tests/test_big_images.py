"""Giant images on the CPU stay under the documented memory bound (peak RSS measured in a child
process, VmHWM after resetting it):

    peak - before <= outputs + max(max_buffer_bytes, one window row's buffers)
                     + activations of one window batch + 64 MiB (allocator slack)

outputs: labels 1 byte per pixel, + 4 per pixel for the vessel probability. The input image is
the caller's (3 bytes per pixel as uint8) and is never copied whole, nor turned into float.
The normal run predicts 4,000 x 4,000 with a stand-in window function (a 1x1 convolution: the
engine's memory, not the network's, is under test); the slow run predicts 10,000 x 10,000 with
a tiny UNet-S5-D16 end to end.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
SLACK = 64 * MiB


def _measure(size, mode, standin, probs, cap_mib):
    """Run this file as a child process; returns its JSON report."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(size), mode,
                           str(int(standin)), str(int(probs)), str(cap_mib)],
                          capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(r):
    bound = r["outputs"] + max(r["cap"], r["one_row"]) + r["activations"] + SLACK
    assert r["buffer_bytes"] <= max(r["cap"], r["one_row"])  # the engine's own plan
    assert r["peak"] <= bound, (f"peak {r['peak'] / MiB:.0f} MiB > bound {bound / MiB:.0f} MiB",
                                r)
    # working memory beyond the outputs: well under what the float pipeline held before (a
    # float32 copy of the image and full-size float logits, 20 bytes per pixel)
    assert r["peak"] - r["outputs"] < r["pixels"] * 20 / 2, r


@pytest.mark.parametrize("mode, probs", [("slide", False), ("overlap-tile", True)])
def test_4k_image_stays_under_the_bound(mode, probs):
    r = _measure(4000, mode, standin=True, probs=probs, cap_mib=32)
    _check(r)
    assert r["band_rows"] < r["window_rows"]  # it streamed


@pytest.mark.slow
def test_10k_image_with_a_tiny_unet_stays_under_the_bound():
    r = _measure(10000, "overlap-tile", standin=False, probs=True, cap_mib=1024)
    _check(r)
    print(f"\n10000x10000 overlap-tile, tiny UNet, labels + probabilities: peak "
          f"{r['peak'] / MiB:.0f} MiB above the input ({r['input'] / MiB:.0f} MiB), "
          f"{r['seconds']:.0f} s")


def _child(size, mode, standin, probs, cap_mib):
    import time

    import numpy as np
    import torch

    import fastunet
    from fastunet.inference import geometry
    from fastunet.models import apply_overrides

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {key} in /proc/self/status")

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)

    torch.set_num_threads(2)
    cfg = apply_overrides(fastunet.get_config("fcn_unet_s5-d16_64x64_40k_drive"), [
        "model.backbone.base_channels=2", "model.decode_head.in_channels=2",
        "model.decode_head.channels=2", "model.auxiliary_head.in_channels=4",
        "model.auxiliary_head.channels=2"])
    windows = (dict(crop_size=256, stride=256) if mode == "slide"
               else dict(tile_size=512, margin=16))
    predictor = fastunet.Predictor(cfg, None, device="cpu", mode=mode,
                                   max_buffer_bytes=cap_mib * MiB, **windows)
    if standin:
        weight = torch.randn(2, 3, 1, 1)
        predictor.engine.fn = lambda x: torch.nn.functional.conv2d(x, weight)
    # activations of one window batch (and the engine's own small buffers): one window's image
    window = 256 if mode == "slide" else 512 - 32
    small = np.zeros((window, window, 3), np.uint8)
    base = status("VmRSS")
    reset_peak()
    predictor.predict(small, return_probs=probs)
    activations = status("VmHWM") - base
    rgb = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    base = status("VmRSS")
    reset_peak()
    t0 = time.time()
    out = predictor.predict(rgb, return_probs=probs)
    seconds = time.time() - t0
    peak = status("VmHWM") - base
    labels = out[0] if probs else out
    assert labels.shape == (size, size) and labels.dtype == np.uint8
    sched = predictor.engine.last_schedule
    plan = predictor.engine.plan(size, size)
    per_row, overhang = geometry.band_bytes(plan, 1, 3, 2)
    print(json.dumps({"peak": peak, "activations": activations, "seconds": seconds,
                      "outputs": size * size * (5 if probs else 1), "input": rgb.nbytes,
                      "pixels": size * size, "cap": cap_mib * MiB,
                      "one_row": per_row + overhang, "buffer_bytes": sched.buffer_bytes,
                      "band_rows": sched.band_rows, "window_rows": sched.window_rows}))


if __name__ == "__main__":
    _child(int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1",
           int(sys.argv[5]))
