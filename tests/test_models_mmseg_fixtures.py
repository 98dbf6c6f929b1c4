"""Exactness against real mmseg 1.2.2 through fixtures it produced (tools/mmseg_parity.py).

The checkpoints under tests/data were saved by mmseg in mmengine's layout (meta, state_dict,
message_hub with HistoryBuffers, optimizer, param_schedulers); the expected outputs are mmseg's.
"""
import os

import pytest
import torch
import torch.nn as nn

import fastunet
from fastunet.models import apply_overrides, build_segmentor, get_config

DATA = os.path.join(os.path.dirname(__file__), "data")
RTOL = 1e-4


@pytest.fixture(scope="module")
def expected():
    return torch.load(os.path.join(DATA, "mmseg_expected.pt"), weights_only=True)


def close(actual, ref, what):
    err = ((actual.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    assert err <= RTOL, f"{what}: max relative error {err:.2e} > {RTOL}"


def build(rec, dice=False):
    name = rec["config"].replace("4xb4-", "4xb4-ce-1.0-dice-3.0-") if dice else rec["config"]
    model = build_segmentor(apply_overrides(get_config(name), rec["overrides"]))
    meta = fastunet.load_checkpoint(model, os.path.join(DATA, rec["checkpoint"]))
    assert meta["iter"] == 4000 and meta["dataset_meta"]["classes"] == ("background", "vessel")
    return model


@pytest.mark.parametrize("tag", ["fcn", "psp", "aspp"])
def test_encode_decode_equals_mmseg(expected, tag):
    rec = expected["models"][tag]
    model = build(rec).eval()
    with torch.no_grad():
        close(model.encode_decode(expected["x"].float()), rec["encode_decode"], "encode_decode")


def test_slide_inference_equals_mmseg(expected):
    rec = expected["models"]["fcn"]
    model = build(rec).eval()
    model.test_cfg.update(crop_size=expected["slide_crop"], stride=expected["slide_stride"])
    with torch.no_grad():
        for x, ref in zip(expected["slide_inputs"], rec["slide"]):
            close(model.inference(x.float()), ref, f"slide {tuple(x.shape)}")


@pytest.mark.parametrize("tag", ["fcn", "psp", "aspp"])
@pytest.mark.parametrize("variant", ["ce", "ce_ignore", "dice"])
def test_losses_gradients_and_bn_stats_equal_mmseg(expected, tag, variant):
    rec = expected["models"][tag]
    model = build(rec, dice=variant == "dice").train()
    for m in model.modules():  # the fixtures were made with dropout off
        if isinstance(m, nn.Dropout2d):
            m.eval()
    label = expected["label_ignore" if variant == "ce_ignore" else "label"].long()
    losses = model.loss(expected["x"].float(), label)
    ref = rec[variant]
    assert sorted(losses) == sorted(ref["losses"])
    for k, v in ref["losses"].items():
        assert losses[k].item() == pytest.approx(v, rel=RTOL), k
    sum(losses.values()).backward()
    params = dict(model.named_parameters())
    grads = torch.cat([params[k].grad.flatten() for k in expected["grad_keys"]])
    close(grads, ref["grads"], "gradients")
    means = torch.cat([v.flatten() for k, v in model.state_dict().items()
                       if k.endswith("running_mean")])
    close(means, ref["running_mean"], "BN running means")
