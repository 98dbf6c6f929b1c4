"""The training update: no host synchronisation inside it, the CUDA-graph replay logic (with a
stand-in graph on the CPU), channels_last from the loader to every convolution, the loss tracker."""
import types

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastunet
from fastunet.models import apply_overrides
from fastunet.training import data as tdata
from fastunet.training.schedule import PolyLR, build_optimizer, load_optimizer_state
from fastunet.training.step import GraphedUpdate, LossTracker, TrainStep, Update, set_fused

from trainkit import tiny_model

aten = torch.ops.aten
# ops whose result the host must wait for: a tensor read as a Python number, and outputs whose
# shape depends on the data
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.unique_consecutive.default, aten._unique2.default, aten.item.default}


class NoHostSync(TorchDispatchMode):
    """Fails on any op that makes the host wait for the device: the syncing ops above and copies
    between devices (a device-to-host copy waits for the device)."""

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING or (func is aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1])):
            raise AssertionError(f"{func} synchronises with the host")
        if func in (aten._to_copy.default, aten.copy_.default):
            devices = {t.device for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)}
            if "device" in kwargs and kwargs["device"] is not None:
                devices.add(torch.device(kwargs["device"]))
            if len(devices) > 1:
                raise AssertionError(f"{func} copies between {devices}")
        return func(*args, **kwargs)


def _model(width=4, dice=False, fused=False, device="cpu", options=()):
    cfg = apply_overrides(fastunet.get_config(
        "fcn_unet_s5-d16_ce-1.0-dice-3.0_64x64_40k_drive" if dice else "synthetic"),
        [*tiny_model(width), *options])
    torch.manual_seed(0)
    model = fastunet.build_segmentor(cfg).train().to(device)
    model.to(memory_format=torch.channels_last)
    set_fused(model, None if fused else False)
    return cfg, model


def _batch(seed, n=2, size=32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(n, size, size, generator=g) < 0.2).long()
    y[:, :3] = 255  # ignored pixels, as padding makes them
    return x.to(device), y.to(device)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("capturable", [False, True], ids=["foreach_sgd", "fused_sgd"])
@pytest.mark.parametrize("dice", [False, True], ids=["ce", "ce_dice"])
def test_an_update_never_waits_for_the_device(fused, capturable, dice, device):
    cfg, model = _model(fused=fused, dice=dice, device=device)
    opt = build_optimizer(model, cfg["train"], capturable=capturable)
    amp = torch.bfloat16 if device == "cuda" else None
    update = Update(TrainStep(model), opt, amp_dtype=amp)
    update(*_batch(0, device=device))  # first step: momentum buffers
    batch = _batch(1, device=device)
    PolyLR(opt, 10, 0.01).step(1)  # the schedule between updates: no sync either
    with NoHostSync():
        losses = update(*batch)
    assert losses.shape == (len(update.names),) and torch.isfinite(losses).all()


def test_the_sync_check_has_teeth():
    with pytest.raises(AssertionError, match="synchronises"), NoHostSync():
        torch.ones(2).sum().item()
    with pytest.raises(AssertionError, match="synchronises"), NoHostSync():
        torch.ones(3)[torch.ones(3) > 0]  # a boolean mask: the output size depends on the data
    with pytest.raises(AssertionError, match="synchronises"), NoHostSync():
        torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), 2)  # checks the range


class StandInGraph(GraphedUpdate):
    """GraphedUpdate with the CUDA graph replaced by a recording of the captured function: a
    "replay" runs it again on the input buffers, as the graph's kernels would."""

    def _capture(self, body):
        self.captures = getattr(self, "captures", 0) + 1
        return types.SimpleNamespace(replay=body)


def _eight_updates(kind, device="cpu", width=4, options=()):
    """Eight updates of ``kind`` (Update or a GraphedUpdate) on fixed batches, with a captured
    optimizer and the schedule; returns (weights, loss vectors, the update)."""
    cfg, model = _model(width=width, device=device, options=options)
    opt = build_optimizer(model, cfg["train"], capturable=True)
    schedule = PolyLR(opt, 8, 0.05)
    update = kind(TrainStep(model), opt)
    seen = []
    for it in range(8):
        schedule.step(it)
        seen.append(update(*_batch(it, device=device)).clone())
    return model.state_dict(), seen, update


def _assert_same_run(a, b):
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_graphed_update_replays_the_eager_update():
    # the same batches and learning rates through the eager update and the graphed one (3 eager
    # warm-ups, one capture, replays reading the copied batches): the same weights, bit for bit
    eager, graphed = _eight_updates(Update), _eight_updates(StandInGraph)
    assert graphed[2].captures == 1 and graphed[2].calls == 8
    _assert_same_run(eager, graphed)
    with pytest.raises(ValueError, match="warm-up"):
        GraphedUpdate(None, None, warmup=0)


@pytest.mark.cuda
def test_cuda_graph_replays_the_eager_update_bit_for_bit():
    # a real CUDA graph: deterministic kernels, fp32, no dropout (its masks come from the
    # generator's offsets, which a graph advances by the whole step at once)
    no_dropout = ["model.decode_head.dropout_ratio=0", "model.auxiliary_head.dropout_ratio=0"]
    undo = fastunet.set_deterministic(True)
    try:
        runs = [_eight_updates(kind, "cuda", 8, no_dropout) for kind in (Update, GraphedUpdate)]
        torch.cuda.synchronize()
    finally:
        undo()
    _assert_same_run(*runs)


def test_captured_optimizer_takes_the_schedule_in_place_and_resumes_either_way():
    cfg, model = _model()
    captured = build_optimizer(model, cfg["train"], capturable=True)
    lr = captured.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and captured.param_groups[0]["fused"]
    PolyLR(captured, 100, 0.05).step(50)
    assert captured.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(
        fastunet.training.poly_lr(50, 100, 0.05))
    Update(TrainStep(model), captured)(*_batch(0))
    # a captured run's state into an eager optimizer and back: momentum kept, own lr holder
    eager = build_optimizer(model, cfg["train"])
    load_optimizer_state(eager, captured.state_dict())
    assert isinstance(eager.param_groups[0]["lr"], float) and not eager.param_groups[0]["fused"]
    buffers = [s["momentum_buffer"] for s in eager.state.values()]
    assert buffers and all(b.abs().sum() > 0 for b in buffers)
    load_optimizer_state(captured, eager.state_dict())
    assert captured.param_groups[0]["lr"] is lr


def test_channels_last_from_the_loader_to_every_convolution():
    cfg, model = _model(width=4)
    dcfg = dict(cfg["data"], img_scale=(96, 96))
    items = [dict(fastunet.data.synthetic.generate(0, "training", i, (96, 96)), name=str(i))
             for i in range(2)]
    loader = tdata.build_train_loader(items, dcfg, 2, 2, seed=0, start_iter=0, workers=0,
                                      channels_last=True)
    x, y = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    plain = tdata.build_train_loader(items, dcfg, 2, 2, seed=0, start_iter=0, workers=0)
    x0, y0 = next(iter(plain))
    assert torch.equal(x, x0) and torch.equal(y, y0)  # the same batch, another layout
    layouts = []
    hooks = [m.register_forward_pre_hook(
        lambda m, a: layouts.append(a[0].is_contiguous(memory_format=torch.channels_last)))
        for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    opt = build_optimizer(model, cfg["train"])
    Update(TrainStep(model), opt)(x, y)
    for h in hooks:
        h.remove()
    assert len(layouts) > 20 and all(layouts)


def test_loss_tracker_means_and_first_bad_iteration():
    t = LossTracker(max_iters=10, device="cpu")
    t.add(torch.tensor([1.0, 2.0]), 0)
    t.add(torch.tensor([3.0, 4.0]), 1)
    assert int(t.first_bad) == 11  # none yet
    assert t.take_means() == [2.0, 3.0] and t.count == 0
    t.add(torch.tensor([np.nan, 1.0]), 2)
    t.add(torch.tensor([np.inf, 1.0]), 3)
    assert int(t.first_bad) == 3  # 1-based: the third update was the first bad one
    assert t.take_means(lambda s: s * 2, world_size=2) == [pytest.approx(np.nan, nan_ok=True),
                                                            1.0]
