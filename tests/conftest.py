"""Shared fixtures: the device parameter (cuda cases are marked and skipped without a GPU)."""
import pytest
import torch

from fastunet import _native

HAS_CUDA = torch.cuda.is_available() and _native.has_cuda_kernels()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and fastunet's CUDA kernels")
    for item in items:
        # the marker, not item.keywords: keywords also hold the folder names of the path
        if item.get_closest_marker("cuda") is not None and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def exact_fp32_on_cuda():
    """fp32 comparisons on CUDA need real fp32 convolutions, not TF32 (the default for cuDNN)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
