"""fastunet.export and the exporters on a fastunet model: standard ops only (BN folded into the
convolutions, no fastunet op), outputs equal to PyTorch's (onnxruntime for ONNX), dynamic batch
and spatial size; torch.onnx.export / torch.jit.trace on the model itself; the CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastunet
from fastunet.nn import ConvBNReLU, FoldedConv2d
from fastunet.nn.recompute import MaxPool2d
from fused_helpers import trained_looking_bn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# what a UNet graph may hold: convolutions (BN folded), ReLU, pooling, resizing, concatenation,
# and the shape arithmetic of the dynamic sizes
STANDARD = {"Conv", "Relu", "MaxPool", "Resize", "Concat", "Shape", "Reshape", "Squeeze",
            "Unsqueeze", "Mul", "Div", "Cast", "Gather", "Slice", "Add", "Constant",
            "GlobalAveragePool", "ReduceMean", "Identity"}
SIZES = [(1, 64, 64), (3, 96, 128)]  # batch, height, width: not the example's


def _model(name="synthetic"):
    torch.manual_seed(0)
    return trained_looking_bn(fastunet.build_segmentor(fastunet.get_config(name))).eval()


def _ops(path):
    return {n.op_type for n in onnx.load(path).graph.node}


def _check_onnx(model, path, sizes=SIZES):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n, h, w in sizes:
        x = torch.randn(n, 3, h, w)
        with torch.no_grad():
            ref = model(x).numpy()
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _model()
    path = str(tmp_path_factory.mktemp("export") / "unet.onnx")
    assert fastunet.export(model, path) == path
    return model, path


def test_onnx_matches_pytorch_at_any_batch_and_size(exported):
    _check_onnx(*exported)


def test_onnx_graph_is_standard_ops_with_bn_folded(exported):
    model, path = exported
    ops = _ops(path)
    assert "BatchNormalization" not in ops and ops <= STANDARD, ops - STANDARD
    graph = onnx.load(path).graph
    assert all(n.domain in ("", "ai.onnx") for n in graph.node)
    convs = sum(isinstance(m, torch.nn.Conv2d) for name, m in model.named_modules()
                if not name.startswith("auxiliary_head"))  # the training-only head
    assert sum(n.op_type == "Conv" for n in graph.node) == convs
    assert [i.name for i in graph.input] == ["image"] and graph.output[0].name == "logits"


def test_export_leaves_the_model_as_it_was(exported, tmp_path):
    model, _ = exported
    assert not any(isinstance(m, FoldedConv2d) for m in model.modules())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_torchscript_traced_matches_at_any_batch_and_size(tmp_path):
    model = _model()
    path = fastunet.export(model, tmp_path / "unet.pt", format="torchscript")
    loaded = torch.jit.load(path)
    assert not any(k.startswith("fastunet") for k in _script_ops(loaded))
    for n, h, w in SIZES:
        x = torch.randn(n, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)


def _script_ops(module):
    return {node.kind() for node in module.inlined_graph.nodes()}


def test_torch_onnx_export_of_the_model_itself(tmp_path):
    """No fastunet.export: the exporter sees standard ops by itself (the blocks notice it)."""
    model = _model()
    path = str(tmp_path / "direct.onnx")
    from torch.export import Dim
    torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), path, dynamo=True,
                      dynamic_shapes=({0: Dim("n"), 2: 16 * Dim("h"), 3: 16 * Dim("w")},))
    _check_onnx(model, path)
    assert "BatchNormalization" not in _ops(path)  # the fold's arithmetic became constants


def test_torch_jit_trace_of_the_model_itself():
    model = _model()
    traced = torch.jit.trace(model, torch.randn(2, 3, 64, 64), check_trace=True)
    assert not any(k.startswith("fastunet::") for k in _script_ops(traced))
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("train", [False, True])
def test_torch_jit_script_of_the_blocks(train):
    torch.manual_seed(1)
    net = torch.nn.Sequential(ConvBNReLU(3, 8, 3, padding=1), MaxPool2d(2),
                              ConvBNReLU(8, 4, 1, norm_cfg=None)).train(train)
    scripted = torch.jit.script(net)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(scripted(x), net(x), rtol=1e-5, atol=1e-5)
    assert not any(k.startswith("fastunet::") for k in _script_ops(scripted))
    folded = torch.jit.script(FoldedConv2d(net[0].conv, net[0].bn.eval(), True))
    torch.testing.assert_close(folded(x), net[0].eval()(x), rtol=1e-5, atol=1e-5)


def test_pspnet_exports_with_a_fixed_size(tmp_path):
    """Pyramid pooling to fixed grids has no dynamic ONNX form: batch stays free, size fixed."""
    model = _model("pspnet_unet_s5-d16_64x64_40k_drive")
    path = fastunet.export(model, str(tmp_path / "psp.onnx"), example=torch.randn(1, 3, 64, 64))
    _check_onnx(model, path, sizes=[(1, 64, 64), (3, 64, 64)])


def test_bad_arguments():
    with pytest.raises(ValueError, match="format"):
        fastunet.export(torch.nn.Identity(), "x.onnx", format="tflite")
    with pytest.raises(ValueError, match="multiples of 16"):
        fastunet.export(torch.nn.Identity(), "x.onnx", example=torch.randn(1, 3, 40, 40))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastunet.export", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_cli_writes_an_onnx_file_from_a_checkpoint(tmp_path):
    model = _model()
    ckpt = tmp_path / "m.pth"
    fastunet.models.save_checkpoint(str(ckpt), model, {})
    out = _cli("--config", "synthetic", "--checkpoint", str(ckpt), "-o", str(tmp_path / "m.onnx"))
    assert out.returncode == 0, out.stderr
    _check_onnx(model, str(tmp_path / "m.onnx"))


@pytest.mark.parametrize("args, message", [
    (["--config", "nope", "-o", "x.onnx"], "nope"),
    (["--config", "synthetic", "--checkpoint", "missing.pth", "-o", "x.onnx"], "not found"),
    (["--config", "synthetic", "-o", "x.onnx", "--size", "40", "64"], "multiples of 16"),
    (["--config", "synthetic", "-o", "no/such/folder/x.onnx"], "does not exist"),
    (["--config", "synthetic"], "required"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    out = _cli(*args, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert not os.listdir(tmp_path)


def test_cli_help():
    out = _cli("--help")
    assert out.returncode == 0 and "standard ops" in out.stdout and "--checkpoint" in out.stdout
