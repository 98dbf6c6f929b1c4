"""benchmarks/gpu_run.py: every section runs (tiny sizes, on the CPU) and lands in one JSON that
benchmarks/report.py reads; time limits keep partial results; the memory snapshot summary."""
import copy
import json
import os
import time

import pytest
import torch

from fastunet import _native

from benchkit import ROOT, load

gpu_run = load("gpu_run")
report = load("report")
SECTIONS = ["environment", "blocks", "tiles", "training", "inference", "memory", "tests"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):  # about two minutes on 2 cores: the tests using it are slow
    if not _native.LOADED:
        pytest.skip("the dry run exercises the native ops")
    out = tmp_path_factory.mktemp("gpu_run")
    data = gpu_run.run(str(out), "cpu", dry=True, budget_s=900)
    with open(out / gpu_run.RESULT_FILE, encoding="utf-8") as f:
        assert json.load(f) == json.loads(json.dumps(data, default=str))  # what was written
    return out, data


@pytest.mark.slow
def test_dry_run_writes_every_section(dry_run):
    _, data = dry_run
    assert data["schema"] == gpu_run.SCHEMA and data["dry_run"] and data["device_type"] == "cpu"
    assert list(data["sections"]) == SECTIONS
    status = {name: r["status"] for name, r in data["sections"].items()}
    assert status == dict.fromkeys(SECTIONS, "ok"), {
        n: r.get("traceback") or r.get("error") for n, r in data["sections"].items()}
    assert all(r["seconds"] <= r["limit_s"] + 1 for r in data["sections"].values())


@pytest.mark.slow
def test_dry_run_blocks_time_every_variant(dry_run):
    blocks = dry_run[1]["sections"]["blocks"]["result"]
    cases = blocks["cases"]
    variants = {c["variant"] for c in cases}
    assert variants == {"conv", "conv_cin8", "conv_bias", "fastunet_op", "eager", "epilogue",
                        "module"}
    assert len(cases) == (len(variants) - 1) * len(blocks["shapes"]) + 1  # cin8: the stem
    for case in cases:
        assert "error" not in case, case
        assert case["loop_us"] > 0 and case["host_us"] > 0 and case["gpu_us"] is None
    # the fused variants compute relu(conv + bias): checked against it in the run
    assert all(c["max_rel_diff"] < 1e-5 for c in cases if "max_rel_diff" in c)
    assert set(blocks["kernels_per_call"]) == variants - {"conv_cin8"}  # counted: layer 2
    assert blocks["shapes"][0][:2] == [3, 64]  # the stem: 3 -> 64 channels


def test_unet_block_shapes_are_the_distinct_layers():
    shapes = gpu_run.unet_block_shapes(64, 2)
    assert len(shapes) == len(set(shapes)) > 10
    assert (64, 64, 3, 1, 1, 1, 1, 64, 64) in shapes  # first stage, full resolution
    assert (1024, 1024, 3, 1, 1, 1, 1, 4, 4) in shapes  # the deepest stage


@pytest.mark.slow
def test_dry_run_training_inference_tiles(dry_run):
    sections = dry_run[1]["sections"]
    train = sections["training"]["result"]["cases"]
    plain = [c for c in train if not c["captured"]]
    assert {c["fused"] for c in plain} == {False, True}
    for c in plain:
        assert c["step_ms"] > 0 and c["ops"] > 0 and "error" not in c, c
    assert all(c["skipped"] for c in train if c["captured"])  # CUDA graphs: GPU only
    cases = sections["inference"]["result"]["cases"]
    precisions = gpu_run.Sizes(dry=True).precisions
    assert {(c["dataset"], c["mode"], c["precision"], c["kernels"]) for c in cases} == {
        (d, m, p, "default") for d in ("drive", "hrf") for m in ("slide", "overlap-tile", "whole")
        for p in precisions} | {(d, "slide", p, "fastunet") for d in ("drive", "hrf")
                                for p in precisions}
    assert all(c["images_per_s"] > 0 and c["gflop"] > 0 for c in cases), cases
    assert sections["inference"]["result"]["reference"]["images_per_s"] > 0
    for case in sections["tiles"]["result"]["cases"]:
        assert case["max_abs_diff"] < 1e-5
        assert case["bound_us"] > 0 and case["aggregate_out"]["loop_us"] > 0
    assert sections["memory"]["result"]["skipped"]  # CUDA only
    assert sections["tests"]["result"]["exit_code"] == 0  # --collect-only of the CUDA tests


@pytest.mark.slow
def test_report_reads_a_gpu_run(dry_run, tmp_path):
    # the dry run's JSON relabelled as a GPU run: every table the report makes from it
    _, data = dry_run
    data = copy.deepcopy(data)
    data["dry_run"], data["device_type"] = False, "cuda"
    env = data["sections"]["environment"]["result"]
    env.update(device="Test GPU X900", torch="9.9", cuda="99.0", cudnn=99000)
    for case in data["sections"]["blocks"]["result"]["cases"]:
        case["gpu_us"] = case["loop_us"]
    folder = tmp_path / "results" / "x900-1"
    folder.mkdir(parents=True)
    with open(folder / gpu_run.RESULT_FILE, "w", encoding="utf-8") as f:
        json.dump(data, f)
    text = report.summary(str(folder))
    assert text.startswith("# Results: Test GPU X900 (torch 9.9, CUDA 99.0, cuDNN 99000")
    for title in ("Conv-BN-ReLU layer variants", "Training step", "Tile ops",
                  "Inference per config and mode", "Targets"):
        assert f"## {title}" in text
    assert "| DRIVE | FCN | slide | fp32 |" in text and "geometric mean" in text
    assert "Sections: environment ok" in text
    full = report.performance_section(str(tmp_path / "results"))
    assert "X900 slide fp32 (img/s)" in full and "## Training step on Test GPU X900" in full
    short = report.readme_section(str(tmp_path / "results"))
    assert "| Test GPU X900 | DRIVE | fp32 |" in short and "docs/performance.md" in short


def test_a_section_out_of_time_keeps_its_cases(tmp_path, monkeypatch):
    def slow(ctx, result):
        result["cases"] = []
        for i in range(100):
            result["cases"].append(i)
            time.sleep(0.1)

    def second(ctx, result):  # the first section's record is on disk before this one runs
        with open(os.path.join(ctx.out, gpu_run.RESULT_FILE), encoding="utf-8") as f:
            result["seen"] = json.load(f)["sections"]["slow"]["status"]

    monkeypatch.setattr(gpu_run, "SECTIONS", [("slow", slow), ("second", second)])
    data = gpu_run.run(str(tmp_path), "cpu", dry=True, budget_s=60,
                       limits={"slow": 1, "second": 5})
    slow_record = data["sections"]["slow"]
    assert slow_record["status"] == "timeout" and 3 <= len(slow_record["result"]["cases"]) < 20
    assert data["sections"]["second"]["result"]["seen"] == "timeout"


def test_sections_past_the_budget_are_skipped(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(gpu_run, "SECTIONS", [("a", lambda ctx, r: ran.append("a")),
                                              ("b", lambda ctx, r: ran.append("b"))])
    data = gpu_run.run(str(tmp_path), "cuda", dry=False, budget_s=gpu_run.MIN_SECTION_S - 1,
                       limits={"a": 100, "b": 100})
    assert ran == [] and {r["status"] for r in data["sections"].values()} == {"skipped"}
    assert "left of the budget" in data["sections"]["a"]["reason"]


def test_cli_refuses_unknown_sections_and_a_missing_gpu(capsys):
    assert gpu_run.main(["--out", "x", "--dry-run", "--only", "blocks,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu_run.main(["--out", "x"]) == 2
        assert "--dry-run" in capsys.readouterr().err


def test_summarize_snapshot_reports_what_is_live_at_the_peak():
    def ev(action, addr, size, where="fastunet/models/unet.py"):
        return {"action": action, "addr": addr, "size": size,
                "frames": [{"filename": os.path.join(ROOT, where), "line": 7, "name": "f"}]}

    trace = [ev("alloc", 1, 100), ev("alloc", 2, 300, "fastunet/nn/conv_bn_relu.py"),
             ev("alloc", 3, 50), ev("free_requested", 1, 100), ev("free_completed", 1, 100),
             ev("alloc", 4, 10), ev("free_requested", 2, 300)]
    summary = gpu_run._harness.summarize_snapshot({"device_traces": [trace]})
    assert summary["peak_live_bytes"] == 450 and summary["live_blocks_at_peak"] == 3
    top = summary["largest_at_peak"]
    assert top[0] == {"where": "fastunet/nn/conv_bn_relu.py:7 (f)", "bytes": 300, "blocks": 1}
    assert top[1]["bytes"] == 150 and top[1]["blocks"] == 2
