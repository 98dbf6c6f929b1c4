"""Export a model as a graph of standard ops: ONNX (onnxruntime, TensorRT, ...) or TorchScript.

    fastunet.export(model, "unet.onnx")                         # dynamic batch and size
    fastunet.export(model, "unet.pt", format="torchscript")
    python -m fastunet.export --config fcn_unet_s5-d16_64x64_40k_drive --checkpoint drive.pth \\
        -o drive.onnx

The graph maps normalised images ``image`` (N, 3, H, W) to logits ``logits`` (N, C, H, W), the
model's ``forward`` (``encode_decode``: one pass over the whole input; slide windows are the
caller's). Every BatchNorm that follows a convolution is folded into it (so the graph holds
Conv, Relu, MaxPool, Resize, Concat and the like: also the fastest graph for onnxruntime and
TensorRT), and no fastunet op remains. With ``dynamic=True`` the batch and the spatial size
are free (H and W multiples of 16, as the UNet needs); heads that pool to fixed grids other than
1x1 (PSPNet's pyramid pooling) export with the example's spatial size, since ONNX has no
adaptive pooling for them. The export runs on a CPU copy of the model; the original is left as
it is.

ONNX export needs the ``onnx`` and ``onnxscript`` packages (PyTorch's exporter uses them).
"""
import argparse
import copy
import os
import sys
import types
import warnings

import torch
import torch.nn as nn

from .atomic import atomic_path

__all__ = ["export", "standard_model", "main"]

FORMATS = ("onnx", "torchscript")
PROG = "python -m fastunet.export"


def standard_model(model):
    """A CPU, eval-mode copy of ``model`` whose Conv-BN(-ReLU) blocks are single convolutions
    with BN folded in (float64 folding) and which runs standard ATen ops only."""
    from .nn import ConvBNReLU, FoldedConv2d
    from .nn.fuse import _fuse_module

    copied = copy.deepcopy(model).cpu().float().eval()
    for name, m in list(copied.named_modules()):
        if isinstance(m, ConvBNReLU) and m.with_norm and isinstance(
                m.bn, nn.modules.batchnorm._BatchNorm) and m.bn.running_mean is not None:
            parent, _, attr = name.rpartition(".")
            setattr(copied.get_submodule(parent) if parent else copied, attr,
                    FoldedConv2d(m.conv, m.bn, m.with_activation))
    with warnings.catch_warnings():  # chains that cannot be folded stay as they are
        warnings.simplefilter("ignore")
        _fuse_module(copied)  # other Conv2d -> BatchNorm2d (-> ReLU) chains
    return copied


def _fixed_grid_pooling(model):
    return any(isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size not in (1, (1, 1))
               for m in model.modules())


def _export_onnx(model, x, path, dynamic):
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"ONNX export needs the onnx and onnxscript packages ({e.name} is "
                           f"missing): pip install onnx onnxscript") from None
    from torch.export import Dim

    shapes = None
    if dynamic:
        if x.shape[0] == 1:  # a batch (and size) of 1 would be taken for a constant
            x = torch.cat([x, x])
        dims = {0: Dim("batch", min=1, max=4096)}
        if not _fixed_grid_pooling(model):
            dims.update({2: 16 * Dim("h16", min=1, max=1024), 3: 16 * Dim("w16", min=1, max=1024)})
        shapes = (dims,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=shapes,
                                    input_names=["image"], output_names=["logits"],
                                    optimize=True, verbose=False)
    program.save(path)


def _export_torchscript(model, x, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced once
        traced = torch.jit.trace(model, x)
    torch.jit.save(traced, path)


def export(model, path, format="onnx", dynamic=True, example=None):
    """Write ``model`` to ``path`` as standard ops (see the module docstring).

    format: ``"onnx"`` or ``"torchscript"`` (a traced ``torch.jit`` module). dynamic: free batch
    and spatial size (else those of ``example``). example: an input batch to trace with
    (default: one 64x64 image). The file is written to a temporary name and renamed, so ``path``
    is either the complete file or untouched. Returns ``path``.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    x = torch.randn(1, 3, 64, 64) if example is None else example.detach().cpu().float()
    if x.dim() != 4 or x.shape[2] % 16 or x.shape[3] % 16 or min(x.shape[2:]) < 32:
        raise ValueError(f"example must be (N, C, H, W) with H and W multiples of 16 from 32, "
                         f"got {tuple(x.shape)}")
    standard = standard_model(model)
    path = os.fspath(path)
    with atomic_path(path) as tmp, torch.no_grad():
        if format == "onnx":
            _export_onnx(standard, x, tmp, dynamic)
        else:
            _export_torchscript(standard, x, tmp)
    return path


def build_parser():
    """The argument parser of ``python -m fastunet.export``."""
    from ._cli import ArgumentParser

    p = ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a model as a graph of standard ops (BN folded into the convolutions, no\n"
                    "fastunet op): ONNX for onnxruntime/TensorRT, or TorchScript. The graph maps\n"
                    "normalised images 'image' (N, 3, H, W) to logits 'logits' (N, C, H, W);\n"
                    "batch and size are free (H, W multiples of 16) unless --static.",
        epilog="examples:\n"
               f"  {PROG} --config fcn_unet_s5-d16_64x64_40k_drive --checkpoint drive.pth "
               "-o drive.onnx\n"
               f"  {PROG} --config synthetic --checkpoint work_dirs/synthetic/latest.pth "
               "-o unet.pt --format torchscript")
    p.add_argument("--config", required=True, help="config name the model was trained with")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="checkpoint to load (fastunet's or mmseg's); without it the weights are "
                        "the config's initialisation")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="file to write")
    p.add_argument("--format", choices=FORMATS,
                   help="onnx or torchscript (default: from the file name; .pt/.ts/.jit = "
                        "torchscript, otherwise onnx)")
    p.add_argument("--static", action="store_true",
                   help="fix batch and size to the example's (--size, batch 1)")
    p.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"),
                   help="example input size to trace with (multiples of 16 from 32; default "
                        "64 64)")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config entries, e.g. model.decode_head.num_classes=3")
    return p


def _load_model(args):
    from .models.checkpoint import load_state
    from .training.cli import UserError, build_model, load_config, read_checkpoint

    cfg = load_config(args.config, args.cfg_options)
    ckpt = None if args.checkpoint is None else read_checkpoint(args.checkpoint)
    model = build_model(cfg)
    if ckpt is not None:
        try:
            load_state(model, ckpt, args.checkpoint)
        except (ValueError, RuntimeError) as e:
            raise UserError(str(e).splitlines()[0]) from None
    return model


def main(argv=None):
    """Entry point of ``python -m fastunet.export``; returns the exit code."""
    args = build_parser().parse_args(argv)
    from ._cli import one_line
    from .training.cli import UserError, fail

    fmt = args.format or ("torchscript" if args.output.endswith((".pt", ".ts", ".jit"))
                          else "onnx")
    try:
        if any(s < 32 or s % 16 for s in args.size):
            raise UserError(f"--size {args.size[0]} {args.size[1]}: both must be multiples of "
                            f"16 from 32")
        folder = os.path.dirname(os.path.abspath(args.output))
        if os.path.isdir(args.output) or not os.path.isdir(folder):
            raise UserError(f"-o {args.output}: " + ("is a folder" if os.path.isdir(args.output)
                                                     else f"folder {folder} does not exist"))
        model = _load_model(args)
        export(model, args.output, fmt, dynamic=not args.static,
               example=torch.randn(1, 3, *args.size))
    except UserError as e:
        return fail(PROG, e)
    except (RuntimeError, ValueError, OSError) as e:
        return fail(PROG, one_line(e), code=1)
    except KeyboardInterrupt:
        return fail(PROG, "interrupted", code=130)
    print(f"{fmt}: {args.output}")
    return 0


class _CallableModule(types.ModuleType):
    """``fastunet.export`` is this module (``python -m fastunet.export``) and the function."""

    def __call__(self, model, path, format="onnx", dynamic=True, example=None):
        return export(model, path, format, dynamic, example)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    raise SystemExit(main())
