"""SyncBN through the fused block: two CPU ranks (gloo) equal one process on the whole batch."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastunet import _native
from fastunet.nn import ConvBNReLU

pytestmark = pytest.mark.skipif(not (_native.LOADED and dist.is_available()),
                                reason="needs the native ops and torch.distributed")

WORLD = 2


def make_block():
    torch.manual_seed(0)
    return ConvBNReLU(3, 5, 3, padding=1, norm_cfg=dict(type="SyncBN")).double().train()


def make_batch():
    torch.manual_seed(1)
    x = torch.randn(2 * WORLD, 3, 9, 8, dtype=torch.float64) * 2 + 1
    return x, torch.randn(2 * WORLD, 5, 9, 8, dtype=torch.float64)


def _rank(rank, init_file, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        block = make_block()
        x, g = make_batch()
        xs = x[2 * rank:2 * rank + 2].clone().requires_grad_()
        for _ in range(2):  # two steps: running statistics move twice
            xs.grad = None
            block.zero_grad()
            y = block(xs)
            y.backward(g[2 * rank:2 * rank + 2])
        torch.save({"y": y.detach(), "gx": xs.grad, "state": block.state_dict(),
                    "grads": {n: p.grad for n, p in block.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # reference: plain BatchNorm over the whole batch (what SyncBN computes)
    block = make_block()
    plain = ConvBNReLU(3, 5, 3, padding=1, fused=False).double().train()
    plain.load_state_dict(block.state_dict())
    x, g = make_batch()
    for _ in range(2):
        xr = x.clone().requires_grad_()
        plain.zero_grad()
        y = plain(xr)
        y.backward(g)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([r["gx"] for r in ranks]), xr.grad)
    for key, value in plain.state_dict().items():
        for r in ranks:
            torch.testing.assert_close(r["state"][key], value, msg=key)
    for name, p in plain.named_parameters():  # local gradients sum to the whole-batch gradient
        torch.testing.assert_close(sum(r["grads"][name] for r in ranks), p.grad, msg=name)
