"""Tile aggregation on the CPU: the native op vs mmseg's pad-and-add loop and vs the
memory-bandwidth bound, measured in the same run (ratios in extra_info; printed with -s).

    pytest benchmarks/bench_tile.py --benchmark-only -s

(On a GPU, benchmarks/gpu_run.py's tiles section times the same cases in GPU time.)

Bound: the op must read every window element once and write the output once. The machine's
bandwidth is measured with a ``copy_`` of the window tensor into a preallocated buffer (reads and
writes the same number of bytes); bound_s = (window bytes + output bytes) / that bandwidth.

op_ms is the allocating call (a fresh output each time: on the CPU its page faults are part of
the cost); op_out_ms the same call writing into a reused buffer (``out=``), as a loop over
same-size images runs it, which is what the bound (a copy into a preallocated buffer) compares.
"""
import pytest
import torch
import torch.nn.functional as F

from fastunet import ops
from fastunet.ops import tile_reference as ref
# benchmarks/ is on sys.path under pytest
from _harness import best_of, interleaved_best  # noqa: E402

# (name, H, W, window, stride): the DRIVE and HRF grids of the mmseg configs, 2-class logits
CASES = [("drive", 584, 565, 64, 42), ("hrf", 2336, 3504, 256, 170)]
DEVICES = [pytest.param("cpu", id="cpu")]


def pad_and_add(tiles, height, width, stride):
    """mmseg's slide_inference accumulation: every window padded to the image and added."""
    th, tw = tiles.shape[-2:]
    preds = tiles.new_zeros((1, tiles.shape[1], height, width))
    count = tiles.new_zeros((1, 1, height, width))
    k = 0
    for y in ref.window_starts(height, th, stride):
        for x in ref.window_starts(width, tw, stride):
            preds += F.pad(tiles[k:k + 1], (x, width - x - tw, y, height - y - th))
            count[:, :, y:y + th, x:x + tw] += 1
            k += 1
    return preds / count


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, H, W, win, stride", CASES, ids=[c[0] for c in CASES])
def test_tile_aggregate(benchmark, device, name, H, W, win, stride):
    n = ref.window_count(H, win, stride) * ref.window_count(W, win, stride)
    tiles = torch.randn(n, 2, win, win, device=device)
    run = lambda: ops.tile_aggregate(tiles, 1, H, W, stride)
    out = run()
    torch.testing.assert_close(out, pad_and_add(tiles, H, W, stride), rtol=1e-5, atol=1e-6)
    benchmark.pedantic(run, rounds=7, warmup_rounds=2)
    t_op = benchmark.stats.stats.min
    buf, reused = torch.empty_like(tiles), torch.empty_like(out)
    ops.tile_aggregate(tiles, 1, H, W, stride, out=reused)
    assert torch.equal(reused, out)
    # interleaved: the reused-buffer op and the copy that defines the bound see the same load
    into = lambda: ops.tile_aggregate(tiles, 1, H, W, stride, out=reused)
    best = interleaved_best({"out": into, "copy": lambda: buf.copy_(tiles)}, 7, device)
    t_out, t_copy = best["out"], best["copy"]
    bandwidth = 2 * tiles.nbytes / t_copy
    bound = (tiles.nbytes + out.nbytes) / bandwidth
    t_pad = best_of(lambda: pad_and_add(tiles, H, W, stride), 1 if name == "hrf" else 3, device)
    t_loop = best_of(lambda: ref.tile_aggregate(tiles, 1, H, W, stride, stride), 2, device)
    t_softmax = best_of(lambda: ops.tile_aggregate(tiles, 1, H, W, stride, epilogue="softmax"),
                         5, device)
    t_argmax = best_of(lambda: ops.tile_aggregate(tiles, 1, H, W, stride, epilogue="argmax"),
                        5, device)
    info = dict(windows=n, threads=torch.get_num_threads(), op_ms=1e3 * t_op,
                copy_ms=1e3 * t_copy, bandwidth_GBps=bandwidth / 1e9, bound_ms=1e3 * bound,
                op_over_bound=t_op / bound, op_over_copy=t_op / t_copy,
                op_out_ms=1e3 * t_out, op_out_over_bound=t_out / bound,
                pad_and_add_ms=1e3 * t_pad, speedup_vs_pad_and_add=t_pad / t_op,
                speedup_out_vs_pad_and_add=t_pad / t_out,
                slice_loop_ms=1e3 * t_loop, speedup_vs_slice_loop=t_loop / t_op,
                softmax_ms=1e3 * t_softmax, argmax_ms=1e3 * t_argmax)
    benchmark.extra_info.update(info)
    print(f"\n[{device} {name}] " + ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))
