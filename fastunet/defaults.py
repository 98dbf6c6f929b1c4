"""What runs by default on each kind of device, and the committed measurement behind each choice.

The policy (docs/performance-policy.md): a custom kernel is a default on a device only where a
committed benchmark result (``benchmarks/results/``) shows it ahead of plain PyTorch in the same
run on that device; everywhere else the default is the plain path, and the custom one stays
available on request (``fused=True``, ``--fused on``, ``FASTUNET_FUSED=1``). ``DEFAULTS`` is that
table; tests/test_defaults.py reads the cited result files and fails when a row claims a custom
path is faster than its results show (or slower, when it picks the plain path).

Choices:

- ``fused_inference``: an eval-mode ``ConvBNReLU`` (and ``fuse()``) runs BN folded into the conv
  and conv + bias + ReLU as fastunet's op, instead of the conv, BN and ReLU modules;
- ``fused_training``: a training-mode ``ConvBNReLU`` runs fastunet's fused training op
  (``--fused auto`` for full-width backbones);
- ``fused_training_narrow``: the same for backbones narrower than 64 base channels (CPU only);
- ``winograd``: fastunet's Winograd CPU convolutions where fastunet/conv_plan.py's rule applies;
- ``tile_ops``: ``tile_aggregate`` / ``tile_extract`` (the inference engine's window averaging)
  instead of a loop of pad-and-add.

    fastunet.defaults.custom_default("fused_inference", "cuda")   # False
"""
import dataclasses

__all__ = ["Evidence", "Default", "DEFAULTS", "custom_default", "markdown_table"]


@dataclasses.dataclass(frozen=True)
class Evidence:
    """One measured case: ``metric`` of benchmark ``case`` in ``file`` (under the repository).

    ``faster_if``: ``"below 1"`` for time ratios custom / plain, ``"above 1"`` for speedups
    plain / custom.
    """
    file: str
    case: str
    metric: str
    faster_if: str


@dataclasses.dataclass(frozen=True)
class Default:
    device: str  # "cpu" or "cuda"
    choice: str
    custom: bool  # True: fastunet's kernel is the default; False: plain PyTorch
    evidence: tuple


_CPU = "benchmarks/results/cpu-20261207/bench_cpu.json"
_GPU = "benchmarks/results/h100-20261127/bench_gpu.json"


def _cases(file, prefix, params, metric, faster_if):
    return tuple(Evidence(file, f"{prefix}[{p}]" if p else prefix, metric, faster_if)
                 for p in params)


DEFAULTS = (
    Default("cpu", "fused_inference", True, _cases(
        _CPU, "benchmarks/bench_conv_bn_relu.py::test_cpu_inference_unet",
        ("contiguous", "channels_last"), "fused_vs_unfused", "below 1")),
    Default("cpu", "fused_training", True, _cases(
        _CPU, "benchmarks/bench_train.py::test_cpu_fused_auto", ("",), "fcn_fused_speedup",
        "above 1")),
    Default("cpu", "fused_training_narrow", False, _cases(
        _CPU, "benchmarks/bench_train.py::test_cpu_fused_auto", ("",),
        "synthetic_fused_speedup", "above 1")),
    Default("cpu", "winograd", True, _cases(
        _CPU, "benchmarks/bench_winograd.py::test_cpu_drive_engine_winograd_ab",
        ("slide", "overlap-tile", "whole"), "speedup", "above 1")
        + _cases(_CPU, "benchmarks/bench_train.py::test_cpu_iteration", ("",), "winograd_speedup",
                 "above 1")),
    Default("cpu", "tile_ops", True, _cases(
        _CPU, "benchmarks/bench_tile.py::test_tile_aggregate", ("drive-cpu", "hrf-cpu"),
        "speedup_vs_pad_and_add", "above 1")),
    Default("cuda", "fused_inference", False, _cases(
        _GPU, "benchmarks/bench_conv_bn_relu.py::test_cuda_inference_block_vs_cudnn_conv",
        ("contiguous-fp16", "contiguous-bf16", "channels_last-fp16", "channels_last-bf16"),
        "fused_vs_unfused", "below 1")),
    Default("cuda", "fused_training", False, _cases(
        _GPU, "benchmarks/bench_conv_bn_relu.py::test_cuda_train_step_amp_bf16", ("4", "16"),
        "step_time_ratio", "below 1")),
    Default("cuda", "tile_ops", True, _cases(
        _GPU, "benchmarks/bench_tile.py::test_tile_aggregate", ("drive-cuda", "hrf-cuda"),
        "speedup_vs_pad_and_add", "above 1")),
)

_TABLE = {(d.device, d.choice): d.custom for d in DEFAULTS}


def custom_default(choice, device_type):
    """Whether fastunet's kernel is the default for ``choice`` on this kind of device (False for
    devices and choices the table has no measurement for: the plain path)."""
    return _TABLE.get((device_type, choice), False)


def markdown_table():
    """The table for docs/performance-policy.md."""
    rows = ["| device | choice | default | evidence (result file: case, metric) |",
            "|---|---|---|---|"]
    for d in DEFAULTS:
        cases = "; ".join(f"`{e.case.split('::')[-1]}` {e.metric}" for e in d.evidence)
        rows.append(f"| {d.device} | {d.choice} | {'fastunet' if d.custom else 'plain PyTorch'} "
                    f"| `{d.evidence[0].file}`: {cases} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
