"""Tile aggregation: native op vs the reference's pad-and-add loop (ratio in extra_info).

    pytest benchmarks/bench_tile.py --benchmark-only
"""
import time

import pytest
import torch

from fastunet import ops
from fastunet.ops import tile_reference as ref

# (name, H, W, window, stride): DRIVE and HRF grids of SPEC §1 with 2-class logits
CASES = [("drive", 584, 565, 64, 42), ("hrf", 2336, 3504, 256, 170)]


def _best_of(fn, rounds):
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("name, H, W, win, stride", CASES, ids=[c[0] for c in CASES])
def test_tile_aggregate(benchmark, name, H, W, win, stride):
    n = ref.window_count(H, win, stride) * ref.window_count(W, win, stride)
    tiles = torch.randn(n, 2, win, win)
    run = lambda: ops.tile_aggregate(tiles, 1, H, W, stride)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    t_ref = _best_of(lambda: ref.tile_aggregate(tiles, 1, H, W, stride, stride), 2)
    benchmark.extra_info.update(windows=n, reference_s=t_ref,
                                speedup_vs_reference=t_ref / benchmark.stats.stats.min)
