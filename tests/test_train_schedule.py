"""The published optimiser and poly learning-rate schedule."""
import math

import pytest
import torch

import fastunet
from fastunet.training.schedule import PolyLR, build_optimizer, poly_lr


def formula(it):
    # mmseg's poly schedule: lr = (0.01 - 1e-4) * (1 - it / 40000) ** 0.9 + 1e-4
    return (0.01 - 1e-4) * (1 - it / 40000) ** 0.9 + 1e-4


@pytest.mark.parametrize("it", [0, 1, 20000, 39999, 40000])
def test_poly_lr_matches_the_published_formula(it):
    assert poly_lr(it, 40000, 0.01, 1e-4, 0.9) == pytest.approx(formula(it), rel=1e-12)


def test_known_values():
    assert poly_lr(0, 40000) == 0.01                          # the first update: base rate
    assert poly_lr(40000, 40000) == pytest.approx(1e-4)       # after the last: min_lr
    assert poly_lr(20000, 40000) == pytest.approx(9.9e-3 * 0.5 ** 0.9 + 1e-4)
    assert poly_lr(39999, 40000) == pytest.approx(9.9e-3 * (1 / 40000) ** 0.9 + 1e-4)
    rates = [poly_lr(i, 40000) for i in range(0, 40001, 1000)]
    assert all(a > b for a, b in zip(rates, rates[1:]))      # strictly decreasing


def test_polylr_sets_every_group_and_stays_within_bounds():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    opt = torch.optim.SGD([{"params": model[0].parameters()},
                           {"params": model[1].parameters()}], lr=0.5)
    sched = PolyLR(opt, 100, 0.01, 1e-4, 0.9)
    for it in (0, 50, 99, 100, 150):
        lr = sched.step(it)
        assert [g["lr"] for g in opt.param_groups] == [lr, lr]
        assert 1e-4 <= lr <= 0.01
    assert sched.lr_at(150) == sched.lr_at(100) == pytest.approx(1e-4)


def test_optimizer_is_the_published_sgd_on_all_parameters():
    cfg = fastunet.get_config("fcn_unet_s5-d16_64x64_40k_drive")
    model = fastunet.build_segmentor(cfg)
    opt = build_optimizer(model, cfg["train"])
    assert isinstance(opt, torch.optim.SGD)
    (group,) = opt.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 5e-4)
    # weight decay on all parameters, BN weights and biases included (mmseg's default)
    assert sum(p.numel() for p in group["params"]) == sum(p.numel() for p in model.parameters())


def test_published_configs_carry_the_recipe():
    for name in fastunet.list_configs():
        if name == "synthetic":
            continue
        t = fastunet.get_config(name)["train"]
        assert (t["max_iters"], t["batch_size"], t["lr"], t["min_lr"], t["power"]) == \
            (40000, 16, 0.01, 1e-4, 0.9), name
        assert t["eval_interval"] == t["checkpoint_interval"] == 4000, name


def test_bad_horizon():
    with pytest.raises(ValueError, match="max_iters"):
        poly_lr(0, 0)
    assert math.isfinite(poly_lr(-5, 10))
