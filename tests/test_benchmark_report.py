"""benchmarks/report.py: README.md's summary and docs/performance.md's tables regenerate from the
committed results; unmeasured figures stay blank; benchmarks/_harness.py's FLOP counter gives the
model's published FLOP figures."""
import json
import os

import pytest

from benchkit import BENCH, ROOT, load

report = load("report")


@pytest.mark.parametrize("path, make", [("README.md", "readme_section"),
                                        ("docs/performance.md", "performance_section")])
def test_generated_sections_are_up_to_date_with_the_committed_results(path, make):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert report.replace_section(text, getattr(report, make)()) == text, (
        f"{path}'s performance section is stale: run python benchmarks/report.py "
        "--write-readme")


def _bench(name, extra, seconds=0.5, file="bench_configs.py", func="test_inference"):
    return {"name": f"{func}[{name}]", "fullname": f"benchmarks/{file}::{func}[{name}]",
            "param": name, "extra_info": extra,
            "stats": {"min": seconds, "median": seconds}}


def _config_case(device, dataset, head, mode, precision, images_per_s, derived=False):
    return _bench(f"{device}-{dataset}-{head}-{mode}-{precision}", dict(
        device="Test GPU X900" if device == "cuda" else "Test CPU (2 cores)",
        dataset=dataset, head=head, mode=mode, precision=precision,
        images_per_s=images_per_s, derived=derived, speedup_vs_reference=3.0,
        reference_images_per_s=images_per_s / 3, gflop=100.0, tflops=1.0, peak_tflops=2.0,
        peak_dtype=precision, reference_s=3 / images_per_s, reference_gflop=100.0))


def _write_run(folder, benchmarks, machines):
    os.makedirs(folder)
    with open(os.path.join(folder, "bench.json"), "w", encoding="utf-8") as f:
        json.dump({"benchmarks": benchmarks, "datetime": "2030-01-02T00:00:00",
                   "fastunet": {"machines": machines, "peaks": {}}}, f)


def test_unmeasured_devices_and_modes_stay_blank(tmp_path):
    results = tmp_path / "results"
    _write_run(str(results / "gpu-1"), [
        _config_case("cuda", "drive", "fcn", "whole", "bf16", 123.4),
        _config_case("cuda", "hrf", "pspnet", "slide", "fp32", 2.5)],
        {"cuda": {"device": "Test GPU X900", "date": "2030-01-02", "torch": "9.9"}})
    _write_run(str(results / "cpu-1"), [
        _config_case("cpu", "stare", "deeplabv3", "slide", "fp32", 0.0456, derived=True)],
        {"cpu": {"device": "Test CPU (2 cores)", "date": "2030-01-02", "torch": "9.9"}})
    os.makedirs(results / "empty")  # a folder without results is ignored
    section = report.performance_section(str(results))
    table = section.split("## Published configs")[1].split("\n\n")[1]
    header, _, *rows = table.splitlines()
    assert header.count("X900") == 2  # only the measured (mode, precision) pairs get a column
    assert "X900 whole bf16" in header and "X900 slide fp32" in header
    assert "overlap-tile" not in header and "Test CPU" not in header
    cells = {tuple(c[:2]): c for c in ([x.strip() for x in r.split("|")[1:-1]] for r in rows)}
    assert cells[("DRIVE", "FCN")][-2:] == ["", "123"]
    assert cells[("HRF", "PSPNet")][-2:] == ["2.50", ""]
    assert all(c[-2:] == ["", ""] for k, c in cells.items()
               if k not in (("DRIVE", "FCN"), ("HRF", "PSPNet")))
    assert len(rows) == 12  # every published row, measured or not
    cpu = section.split("## Inference per config on Test CPU (2 cores)")[1]
    assert "| STARE | DeepLabV3 | slide | fp32 | 0.0456" + report.DERIVED in cpu
    assert "| DRIVE |" not in cpu.split("##")[0]  # nothing invented for unmeasured configs
    short = report.readme_section(str(results))  # README.md's summary: the same figures
    assert "| Test GPU X900 | DRIVE | bf16 |  |  | 123 |" in short
    assert "| STARE |" not in short  # the summary shows the FCN head, not measured there


def test_newest_run_of_a_device_wins(tmp_path):
    results = tmp_path / "results"
    for name, date, fps in (("a-old", "2030-01-01", 1.0), ("b-new", "2030-02-01", 2.0)):
        _write_run(str(results / name), [_config_case("cuda", "drive", "fcn", "slide", "fp32",
                                                      fps)],
                   {"cuda": {"device": "Test GPU X900", "date": date}})
    section = report.readme_section(str(results))
    assert "b-new" in section and "a-old" not in section


def test_check_and_write_readme(tmp_path):
    readme, perf = tmp_path / "README.md", tmp_path / "performance.md"
    for f in (readme, perf):
        f.write_text(f"# x\n\n{report.BEGIN}\nhand-typed numbers\n{report.END}\n\nafter\n")
    args = ["--readme", str(readme), "--performance", str(perf)]
    assert report.main(args + ["--check"]) == 1
    assert report.main(args + ["--write-readme"]) == 0
    assert report.main(args + ["--check"]) == 0
    for f in (readme, perf):
        text = f.read_text()
        assert "hand-typed" not in text and text.endswith(f"{report.END}\n\nafter\n")
    assert "## Targets" in perf.read_text() and "## Targets" not in readme.read_text()
    perf.write_text(perf.read_text().replace("| met |", "| hand-typed |", 1))
    assert report.main(args + ["--check"]) == 1  # a stale docs/performance.md fails too
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="perf:begin"):
        report.main(args + ["--write-readme"])


def test_summary_of_the_committed_gpu_run():
    folder = os.path.join(BENCH, "results", "h100-20261127")
    text = report.summary(folder)
    assert text.startswith("# Results: NVIDIA H100 80GB HBM3")
    assert "| DRIVE | FCN | slide | fp32 | 18.4 | 1.58 | 11.6x faster |" in text
    assert ("| HRF slide bf16 >= 12 images/s under 4 GiB peak memory | H100 | 7.84 images/s, "
            "8.09 GiB | missed |") in text


def test_speed_ratio_wording():
    assert report.speed_ratio(2.5) == "2.50x faster"
    assert report.speed_ratio(1 / 1.6) == "1.60x slower"
    assert report.speed_span([0.9, 0.8]) == "1.11-1.25x slower"
    assert report.num(29729.4) == "29729" and report.num(0.04567) == "0.0457"


def test_flop_counter_reproduces_published_figures():
    harness = load("_harness")
    fcn = "fcn_unet_s5-d16_64x64_40k_drive"
    assert harness.window_flops(fcn, 64, 64) == pytest.approx(6.32e9, rel=0.01)
    assert harness.window_flops(fcn, 256, 256) == pytest.approx(101e9, rel=0.01)
    # a DRIVE image in slide mode: 182 windows, 1.15 TFLOP
    assert 182 * harness.window_flops(fcn, 64, 64) == pytest.approx(1.15e12, rel=0.01)


def test_peer_rows_show_monai_and_bf16(tmp_path):
    results = tmp_path / "results"
    cpu = "Test CPU (2 cores)"
    _write_run(str(results / "cpu-1"), [
        _bench("", dict(device=cpu, engine_s=3.0, monai32_s=3.3, speedup_vs_monai32=1.1,
                        speedup_vs_monai_same_batch=0.95, monai_max_rel_difference=4e-6,
                        bf16_speedup_vs_reference=3.25, bf16_speedup_vs_fp32=1.2,
                        bf16_label_agreement=0.9997, speedup_vs_reference=2.8),
               file="bench_inference.py", func="test_cpu_drive_slide_vs_peers"),
        _bench("", dict(device=cpu, speedup_vs_monai=0.8, engine_peak_rss_growth_GiB=0.48,
                        monai_peak_rss_growth_GiB=0.22),
               file="bench_inference.py", func="test_cpu_hrf_slide_vs_monai")],
        {"cpu": {"device": cpu, "date": "2030-01-02", "torch": "9.9"}})
    short = report.readme_section(str(results))
    assert "over the same fused network (batch 32), DRIVE, FCN, fp32 | Test CPU (2 cores) | " \
           "1.10x faster |" in short
    assert "bf16 (slide) vs mmseg's fp32 loop, DRIVE, FCN | Test CPU (2 cores) | 3.25x faster" \
        in short
    assert "HRF (quarter-width model), fp32 | Test CPU (2 cores) | 1.25x slower" in short
    targets = report.performance_section(str(results)).split("## Targets")[1]
    assert "| 1.10x MONAI, 2.80x mmseg | missed |" in targets
    assert "| 3.25x (bf16 is 1.20x the fp32 engine here) | missed |" in targets
