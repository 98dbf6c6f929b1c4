"""The native extension loads, registers its ops, reports its build, and the fallback works."""
import os
import subprocess
import sys

import pytest
import torch

import fastunet
from fastunet import _native


def test_extension_loaded():
    # CI must not pass on the slow fallback by accident: a broken build fails here.
    if os.environ.get("FASTUNET_DISABLE_EXTENSION") == "1":
        pytest.skip("extension disabled on purpose")
    assert _native.LOADED, _native.LOAD_ERROR
    assert hasattr(torch.ops.fastunet, "tile_aggregate")
    assert hasattr(torch.ops.fastunet, "tile_extract")
    info = _native.BUILD_INFO
    assert info["torch_version"].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    assert isinstance(info["cuda"], bool)


def test_python_m_fastunet_describes_build():
    out = subprocess.run([sys.executable, "-m", "fastunet"], capture_output=True, text=True,
                         check=True).stdout
    assert f"fastunet {fastunet.__version__}" in out
    assert "torch.ops.fastunet.tile_aggregate" in out
    assert "CUDA kernels:" in out
    if _native.LOADED:  # which CPU convolution runs, and the switch that turns Winograd off
        off = subprocess.run([sys.executable, "-m", "fastunet"], capture_output=True, text=True,
                             check=True, env=dict(os.environ, FASTUNET_WINOGRAD="0")).stdout
        assert "CPU 3x3 convolutions: oneDNN" in off
        assert "CPU 3x3 convolutions:" in out
        assert "1024->1024 @4x4" in out and "fastunet/conv_plan.py" in out  # the plan per layer
        assert "CPU inference precision (vector ISA" in out and "fp32" in out


def test_python_m_fastunet_help():
    out = subprocess.run([sys.executable, "-m", "fastunet", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "usage: python -m fastunet" in out and "convolution" in out


def test_fallback_warns_once_and_matches_native():
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastunet\n"
        "    import fastunet.ops\n"
        "msgs = [str(x.message) for x in w if 'native extension not loaded' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert not fastunet._native.LOADED\n"
        "torch.manual_seed(0)\n"
        "img = torch.randn(2, 3, 50, 61, dtype=torch.float64)\n"
        "t = fastunet.ops.tile_extract(img, (32, 40), (20, 17))\n"
        "torch.save((img, t, fastunet.ops.tile_aggregate(t, 2, 50, 61, (20, 17))), "
        "__import__('sys').argv[1])\n"
    )
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fastunet_fallback_{os.getpid()}.pt")
    env = dict(os.environ, FASTUNET_DISABLE_EXTENSION="1")
    subprocess.run([sys.executable, "-c", code, path], env=env, check=True)
    img, tiles, agg = torch.load(path)
    os.remove(path)
    torch.testing.assert_close(fastunet.ops.tile_extract(img, (32, 40), (20, 17)), tiles)
    torch.testing.assert_close(fastunet.ops.tile_aggregate(tiles, 2, 50, 61, (20, 17)), agg)
    torch.testing.assert_close(agg, img)  # averaging the windows of an image gives it back
