"""The baseline and AVX2 builds of the CPU kernels, run on this machine by capping the ISA with
FASTUNET_CPU_ISA (read once per process, so each ISA runs in its own subprocess). CPUs without
AVX-512 (or AVX2) take these paths; they must give the same results as the best one."""
import os
import subprocess
import sys

import pytest
import torch

from fastunet import _native

pytestmark = pytest.mark.skipif(not _native.LOADED, reason="needs the native extension")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Winograd F(4x4) and F(2x2) (forced through the private op), and the NHWC BatchNorm+ReLU
# training kernels forward and backward, on odd sizes and channel counts.
SCRIPT = r"""
import sys, torch
from fastunet import ops
g = torch.Generator().manual_seed(0)
cl = torch.channels_last
x = torch.randn(2, 37, 13, 11, generator=g).contiguous(memory_format=cl)
w = torch.randn(45, 37, 3, 3, generator=g) * 0.1
b = torch.randn(45, generator=g)
out = {f"wino{t}": torch.ops.fastunet._winograd_conv3x3(x, w, b, True, t, 0) for t in (2, 4)}
xb = (torch.randn(3, 40, 9, 7, generator=g) * 2 + 1).contiguous(memory_format=cl)
xb.requires_grad_()
bw = torch.rand(40, generator=g) + 0.5
bb = torch.randn(40, generator=g)
y = ops.batch_norm_relu(xb, bw, bb)
y.backward(torch.randn(y.shape, generator=g).contiguous(memory_format=cl))
out.update(bn_relu=y.detach(), bn_relu_grad=xb.grad)
# does conv_bias_relu take Winograd for a shape its plan dispatches? (only with AVX-512)
xd = torch.randn(2, 32, 32, 32, generator=g).contiguous(memory_format=cl)
wd = torch.randn(48, 32, 3, 3, generator=g) * 0.1
fused = ops.conv_bias_relu(xd, wd, None, 1, 1, 1, 1)
out["dispatched"] = torch.equal(fused, torch.ops.fastunet._winograd_conv3x3(xd, wd, None, True,
                                                                          4, 0))
torch.save(out, sys.argv[1])
"""


def _run(isa, path):
    env = dict(os.environ, FASTUNET_CPU_ISA=isa, PYTHONPATH=ROOT + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], check=True, env=env, cwd=ROOT,
                   timeout=300)
    return torch.load(path)


def test_baseline_and_avx2_kernels_match_the_best_isa(tmp_path):
    best = _run("", tmp_path / "best.pt")
    if _native._C.winograd_fast_kernel():  # this process (uncapped or capped at avx512) has it
        assert best["dispatched"]
    for isa in ("avx2", "base"):
        got = _run(isa, tmp_path / f"{isa}.pt")
        for t in (2, 4):  # other FMA contraction and summation order: same tolerance as tests
            torch.testing.assert_close(got[f"wino{t}"], best[f"wino{t}"], rtol=1e-5, atol=1e-4,
                                       msg=f"Winograd F({t}x{t}) under FASTUNET_CPU_ISA={isa}")
        # the NHWC BN kernels are written to round identically in every build (FMA off)
        assert torch.equal(got["bn_relu"], best["bn_relu"]), isa
        assert torch.equal(got["bn_relu_grad"], best["bn_relu_grad"]), isa
        # Winograd without the AVX-512 matrix kernel is slower than oneDNN: not dispatched
        assert not got["dispatched"], isa
