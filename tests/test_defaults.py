"""fastunet/defaults.py against the committed benchmark results it cites: a row may pick
fastunet's kernel only where every cited case shows it ahead of plain PyTorch, and must pick the
plain path where they show it behind. Also: the defaults are what the modules run."""
import json
import os

import pytest
import torch

from fastunet import _native, defaults, settings
from fastunet.nn import ConvBNReLU, FoldedConv2d, fuse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _results(file):
    with open(os.path.join(ROOT, file)) as f:
        return {b["fullname"]: b.get("extra_info", {}) for b in json.load(f)["benchmarks"]}


@pytest.mark.parametrize("row", defaults.DEFAULTS, ids=lambda d: f"{d.device}-{d.choice}")
def test_each_default_follows_its_committed_results(row):
    assert row.evidence, "every default cites a measurement"
    for e in row.evidence:
        assert os.path.isfile(os.path.join(ROOT, e.file)), e.file
        assert f"/{row.device}-" in "/" + e.file.split("/")[2].replace("h100", "cuda"), \
            f"{e.file} is not a {row.device} result"
        results = _results(e.file)
        assert e.case in results, f"{e.case} not in {e.file}"
        value = results[e.case][e.metric]
        faster = value < 1 if e.faster_if == "below 1" else value > 1
        assert e.faster_if in ("below 1", "above 1")
        assert faster == row.custom, (f"{row.device}/{row.choice} says "
                                      f"{'fastunet' if row.custom else 'plain'} is the faster "
                                      f"path, but {e.case} has {e.metric}={value:.3g}")


def test_cuda_runs_the_plain_modules_by_default_and_tile_ops_native():
    assert not defaults.custom_default("fused_inference", "cuda")
    assert not defaults.custom_default("fused_training", "cuda")
    assert defaults.custom_default("tile_ops", "cuda")
    assert not defaults.custom_default("fused_inference", "mps")  # unmeasured: plain


def test_docs_table_is_the_generated_one():
    doc = open(os.path.join(ROOT, "docs", "performance-policy.md")).read()
    assert defaults.markdown_table() in doc, "regenerate: python -m fastunet.defaults"


@pytest.mark.skipif(not _native.LOADED, reason="needs the native extension")
def test_blocks_follow_the_device_defaults(monkeypatch):
    """A block with fused=None asks the table for its device; fused=True and FASTUNET_FUSED=1
    opt in; FASTUNET_FUSED=0 and fused=False opt out (checked on CPU with CUDA's row)."""
    x = torch.randn(2, 4, 8, 8)
    block = ConvBNReLU(4, 4, 3, padding=1)
    assert block.is_fused_for(x) and block.eval().is_fused_for(x)  # CPU: fused
    table = dict(defaults._TABLE)
    table[("cpu", "fused_inference")] = table[("cpu", "fused_training")] = False
    monkeypatch.setattr(defaults, "_TABLE", table)  # as on CUDA
    assert not block.is_fused_for(x) and not block.train().is_fused_for(x)
    assert ConvBNReLU(4, 4, 3, padding=1, fused=True).is_fused_for(x)
    with settings.override(fused=True):
        assert block.is_fused_for(x)
    with settings.override(fused=False):
        assert not ConvBNReLU(4, 4, 3, padding=1, fused=True).is_fused_for(x)
    # fuse() then leaves the blocks on the plain modules and folded convs on ATen's ops
    net = torch.nn.Sequential(block, torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    fuse(net)
    assert not net[0].is_fused_for(x) and isinstance(net[1], FoldedConv2d)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        net(x)
    assert not any(e.name.startswith("fastunet::") for e in prof.events())
