"""Benchmark fixtures shared by every bench_*.py (helpers in benchmarks/_harness.py).

- ``machine_peaks``: session-scoped; ``machine_peaks(device)`` measures the device's matmul/conv
  TFLOP/s and memory bandwidth once per session (``_harness.probe``).
- CUDA cases (marked ``cuda``, ids containing ``cuda``) are skipped without a GPU and the CUDA
  kernels.
- Every CPU case gets ``peak_rss_GiB`` (the process's peak resident memory during the test) in
  its extra_info unless it recorded memory itself.
- The JSON written by ``--benchmark-json`` gets a ``fastunet`` block: each device's description
  (``_harness.describe``) and measured peaks, and the load average at start and end, so a
  results file says what it was measured on.
"""
import os

import pytest

import _harness

_SESSION = {"peaks": {}, "load_start": None}


def pytest_sessionstart(session):
    _SESSION["load_start"] = [round(v, 2) for v in os.getloadavg()]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and fastunet's CUDA kernels")
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if not str(item.path).startswith(here):
            continue
        # the marker or the case id, not item.keywords: those also hold the path's folder names
        cuda = item.get_closest_marker("cuda") is not None or "cuda" in item.name
        if cuda and not _harness.HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def machine_peaks():
    """peaks(device) -> the probe's dict for that device, measured on first use."""
    def peaks(device):
        kind = _harness.device_type(device)
        if kind not in _SESSION["peaks"]:
            _SESSION["peaks"][kind] = _harness.probe(kind)
        return _SESSION["peaks"][kind]

    return peaks


@pytest.fixture(autouse=True)
def _peak_rss(request):
    """Process peak RSS over a CPU benchmark (VmHWM, reset at the start of the test)."""
    cuda = _harness.device_type(request.node.name) == "cuda"
    if "benchmark" not in request.fixturenames or cuda:
        yield
        return
    with _harness.PeakMemory("cpu") as mem:
        yield
    bench = (getattr(request.node, "funcargs", None) or {}).get("benchmark")
    info = getattr(bench, "extra_info", None)
    if info is not None and mem.total is not None and not any("memory" in k or "rss" in k
                                                              for k in info):
        info["peak_rss_GiB"] = mem.total / 2**30


def pytest_benchmark_update_json(config, benchmarks, output_json):
    kinds = {_harness.device_type(b["name"]) for b in output_json.get("benchmarks", [])}
    kinds |= set(_SESSION["peaks"])
    output_json["fastunet"] = {
        "machines": {k: _harness.describe(k) for k in sorted(kinds)
                     if k == "cpu" or _harness.HAS_CUDA},
        "peaks": _SESSION["peaks"],
        "load_average_start": _SESSION["load_start"],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
    }


@pytest.hookimpl(wrapper=True)
def pytest_benchmark_generate_json(config, benchmarks, include_data, machine_info, commit_info):
    """Leave out benchmarks that never finished a round (a run cut off by a time limit and
    interrupted with SIGINT), so the JSON of the finished ones is still written."""
    for bench in benchmarks:
        if not getattr(bench.stats, "data", None):
            bench.fixture.has_error = True
    return (yield)
