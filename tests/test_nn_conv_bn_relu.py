"""ConvBNReLU matches mmcv ConvModule's state_dict layout, init and conv->BN->ReLU numbers."""
import pytest
import torch
import torch.nn as nn

from fastunet.nn import ConvBNReLU


def test_state_dict_keys_match_convmodule():
    m = ConvBNReLU(3, 8, 3, padding=1)
    assert list(m.state_dict()) == ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean",
                                    "bn.running_var", "bn.num_batches_tracked"]
    assert list(ConvBNReLU(3, 8, 1, norm_cfg=None).state_dict()) == ["conv.weight", "conv.bias"]


def test_forward_equals_unfused_sequence():
    torch.manual_seed(0)
    m = ConvBNReLU(4, 6, 3, padding=2, dilation=2)
    ref = nn.Sequential(nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(6),
                        nn.ReLU())
    ref.load_state_dict({k.replace("conv.", "0.").replace("bn.", "1."): v
                         for k, v in m.state_dict().items()})
    x = torch.randn(2, 4, 17, 19)
    torch.testing.assert_close(m(x), ref(x))
    torch.testing.assert_close(m.bn.running_mean, ref[1].running_mean)
    m.eval(), ref.eval()
    torch.testing.assert_close(m(x), ref(x))


def test_init_like_convmodule():
    torch.manual_seed(0)
    m = ConvBNReLU(64, 128, 3, padding=1)
    std = (2.0 / (128 * 9)) ** 0.5  # kaiming normal, fan_out, relu gain
    assert abs(m.conv.weight.std().item() - std) / std < 0.05
    assert torch.all(m.bn.weight == 1) and torch.all(m.bn.bias == 0)


@pytest.mark.parametrize("kwargs", [dict(act_cfg=dict(type="GELU")),
                                    dict(norm_cfg=dict(type="GN")),
                                    dict(conv_cfg=dict(type="DCN"))])
def test_unsupported_configs_are_refused(kwargs):
    with pytest.raises(ValueError, match="unsupported"):
        ConvBNReLU(3, 4, 3, **kwargs)


# ------------------------------------------------------------------------------------------
# Fused paths: the same numbers as the plain modules, in training and in eval

import copy  # noqa: E402
import os  # noqa: E402

from fastunet import _native, settings  # noqa: E402
from fastunet.ops import recompute  # noqa: E402
from fused_helpers import saved_bytes  # noqa: E402

needs_native = pytest.mark.skipif(not _native.LOADED, reason="needs the native ops")


# fp32 comparisons on CUDA without TF32 (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("exact_fp32_on_cuda")

# (in, out, kernel, padding, dilation, stride): the model's conv geometries
GEOMS = [(3, 8, 3, 1, 1, 1), (8, 8, 1, 0, 1, 1), (8, 4, 3, 12, 12, 1), (8, 4, 3, 24, 24, 1),
         (8, 4, 3, 36, 36, 1), (8, 6, 3, 1, 1, 2)]
GEOM_IDS = ["k{2}p{3}d{4}s{5}".format(*g) for g in GEOMS]


def pair(*args, **kwargs):
    """A fused block (fastunet's kernels, also on CUDA where the default is the plain modules)
    and an identical unfused copy."""
    fused = ConvBNReLU(*args, **kwargs, fused=True)
    plain = copy.deepcopy(fused)
    plain.fused = False
    return fused.train(), plain.train()


def as_layout(t, kind):
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "permuted":
        return t.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    return t


def assert_same_state(a, b, **tol):
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, msg=k, **tol)


@needs_native
@pytest.mark.parametrize("geom", GEOMS, ids=GEOM_IDS)
@pytest.mark.parametrize("mem", ["contiguous", "channels_last", "permuted"])
def test_fused_training_matches_unfused(device, geom, mem):
    cin, cout, k, p, d, s = geom
    torch.manual_seed(0)
    fused, plain = pair(cin, cout, k, stride=s, padding=p, dilation=d)
    fused, plain = fused.to(device).double(), plain.to(device).double()
    for step in range(3):  # running statistics over several steps
        x = as_layout(torch.randn(2, cin, 29, 23, dtype=torch.float64, device=device), mem)
        xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        yf, yp = fused(xf), plain(xp)
        torch.testing.assert_close(yf, yp)
        g = torch.randn_like(yp)
        yf.backward(g)
        yp.backward(g)
        torch.testing.assert_close(xf.grad, xp.grad)
        for (name, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert_same_state(fused, plain)
    assert fused.bn.num_batches_tracked.item() == 3
    fused.eval(), plain.eval()
    with torch.no_grad():
        x = as_layout(torch.randn(3, cin, 17, 19, dtype=torch.float64, device=device), mem)
        yf = fused(x)
        torch.testing.assert_close(yf, plain(x))
        assert yf.is_contiguous(memory_format=torch.channels_last if mem == "channels_last"
                                else torch.contiguous_format)


@needs_native
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_running_statistics_follow_batchnorm(device, momentum):
    torch.manual_seed(1)
    fused, plain = pair(4, 6, 3, padding=1, norm_cfg=dict(type="BN", momentum=momentum))
    fused, plain = fused.to(device), plain.to(device)
    for _ in range(4):
        x = torch.randn(3, 4, 10, 12, device=device) * 3 + 1
        fused(x), plain(x)
    assert_same_state(fused, plain, rtol=1e-5, atol=1e-6)
    fused.eval(), plain.eval()
    x = torch.randn(2, 4, 10, 12, device=device)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


@needs_native
def test_eval_fold_matches_unfused_to_1e5_relative(device):
    torch.manual_seed(2)
    fused, plain = pair(16, 32, 3, padding=1)
    with torch.no_grad():  # realistic running statistics and affine parameters
        for m in (fused, plain):
            m.bn.running_mean.copy_(torch.linspace(-1, 1, 32))
            m.bn.running_var.copy_(torch.linspace(0.5, 2, 32))
            m.bn.weight.copy_(torch.linspace(0.5, 1.5, 32))
            m.bn.bias.copy_(torch.linspace(-0.2, 0.2, 32))
    fused.to(device).eval(), plain.to(device).eval()
    x = torch.randn(2, 16, 21, 18, device=device)
    with torch.no_grad():
        yf, yp = fused(x), plain(x)
    assert ((yf - yp).abs().max() / yp.abs().max()).item() < 1e-5


@needs_native
def test_fold_cache_is_invalidated_by_every_change(device):
    torch.manual_seed(3)
    fused, plain = pair(4, 5, 3, padding=1)
    fused.to(device).eval(), plain.to(device).eval()
    x = torch.randn(2, 4, 8, 8, device=device)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)

    check()
    with torch.no_grad():
        for m in (fused, plain):
            m.bn.running_mean.add_(0.5)  # a BN statistic, in place
    check()
    with torch.no_grad():
        for m in (fused, plain):
            m.conv.weight.mul_(-1.5)  # a weight, as an optimizer step would
    check()
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    state["bn.running_var"] = state["bn.running_var"] * 4
    state["bn.weight"] = state["bn.weight"] - 0.5
    fused.load_state_dict(state), plain.load_state_dict(state)
    check()
    for m in (fused, plain):  # a replaced parameter object
        m.bn.bias = nn.Parameter(torch.full_like(m.bn.bias, 0.25))
    check()
    for m in (fused, plain):  # a replaced buffer
        m.bn.running_mean = torch.full_like(m.bn.running_mean, -0.25)
    check()
    conv = nn.Conv2d(4, 5, 3, padding=1, bias=False).to(device)
    for m in (fused, plain):  # a replaced submodule
        m.conv = copy.deepcopy(conv)
    check()
    fused.double(), plain.double()  # dtype change through Module._apply
    x = x.double()
    check()
    with torch.no_grad():  # edits through .data are invisible to version counters ...
        fused.bn.running_mean.data.add_(1.0)
        plain.bn.running_mean.data.add_(1.0)
    fused.clear_fold_cache()  # ... so they need an explicit clear
    check()
    with torch.no_grad():  # nothing changed: the fold is reused, not recomputed
        first = fused._folded(x, x.dtype)
        assert fused._folded(x, x.dtype) is first


@needs_native
def test_eval_with_gradients_matches_unfused(device):
    # norm_eval: BN frozen in eval mode while the rest trains; gradients flow through the fold
    torch.manual_seed(4)
    fused, plain = pair(4, 6, 3, padding=1)
    fused.to(device).double(), plain.to(device).double()
    mean, var = torch.rand(6) * 2 - 1, torch.rand(6) * 1.5 + 0.5
    with torch.no_grad():
        for m in (fused, plain):
            m.bn.running_mean.copy_(mean)
            m.bn.running_var.copy_(var)
    fused.bn.eval(), plain.bn.eval()
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64, device=device)
    xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf, yp = fused(xf), plain(xp)
    torch.testing.assert_close(yf, yp)
    yf.square().sum().backward()
    yp.square().sum().backward()
    torch.testing.assert_close(xf.grad, xp.grad)
    for (name, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@needs_native
@pytest.mark.parametrize("kwargs", [dict(norm_cfg=None), dict(act_cfg=None),
                                    dict(norm_cfg=dict(type="SyncBN"))],
                         ids=["conv_relu", "conv_bn", "syncbn_single_process"])
def test_variants_match_unfused(device, kwargs):
    torch.manual_seed(5)
    fused, plain = pair(3, 4, 3, padding=1, **kwargs)
    fused.to(device), plain.to(device)
    x = torch.randn(2, 3, 7, 8, device=device)
    xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf, yp = fused(xf), plain(xp)
    torch.testing.assert_close(yf, yp, rtol=1e-5, atol=1e-5)
    yf.sum().backward()
    yp.sum().backward()
    torch.testing.assert_close(xf.grad, xp.grad, rtol=1e-5, atol=1e-5)
    fused.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


@needs_native
def test_cpu_autocast_bf16_matches_unfused():
    torch.manual_seed(6)
    fused, plain = pair(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yf, yp = fused(x), plain(x)
    assert yf.dtype == yp.dtype == torch.bfloat16
    torch.testing.assert_close(yf.float(), yp.float(), rtol=2e-2, atol=2e-2)
    assert_same_state(fused, plain, rtol=1e-3, atol=1e-3)


def test_batch_of_one_value_per_channel_is_refused():
    m = ConvBNReLU(3, 4, 1).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 3, 1, 1))


@needs_native
def test_environment_switch_forces_unfused():
    torch.manual_seed(7)
    m = ConvBNReLU(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    assert m.is_fused_for(x)
    with settings.override(fused=False):  # FASTUNET_FUSED=0
        assert not m.is_fused_for(x) and not ConvBNReLU(3, 4, 3, fused=True).is_fused_for(x)
        ref = nn.Sequential(m.conv, m.bn, nn.ReLU())
        ref_copy = copy.deepcopy(ref)
        torch.testing.assert_close(m(x), ref_copy(x), rtol=0, atol=0)  # the very same modules
    with settings.override(fused=True):  # FASTUNET_FUSED=1
        assert m.is_fused_for(x) and not ConvBNReLU(3, 4, 3, fused=False).is_fused_for(x)


def test_without_native_library_runs_unfused_silently(monkeypatch, recwarn):
    monkeypatch.setattr(_native, "LOADED", False)
    torch.manual_seed(8)
    fused, plain = pair(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    assert not fused.is_fused_for(x)
    torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)
    fused.eval(), plain.eval()
    torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)
    assert not [w for w in recwarn if "fastunet" in str(w.message)]


def test_state_dict_unchanged_by_fused_switch():
    keys = list(ConvBNReLU(3, 8, 3, padding=1).state_dict())
    assert list(ConvBNReLU(3, 8, 3, padding=1, fused=False).state_dict()) == keys
    m = ConvBNReLU(3, 8, 3, padding=1).eval()
    with torch.no_grad():
        m(torch.randn(1, 3, 8, 8))  # builds the fold cache, which is not state
    assert list(m.state_dict()) == keys
    copy.deepcopy(m)  # the cache (oneDNN tensors included) is not copied


# ------------------------------------------------------------------------------------------
# Memory: saved activations of fused vs unfused blocks


@needs_native
def test_chain_saves_one_activation_per_block():
    torch.manual_seed(9)
    chain = nn.Sequential(*[ConvBNReLU(16, 16, 3, padding=1) for _ in range(6)])
    plain = copy.deepcopy(chain)
    for m in plain:
        m.fused = False
    x = torch.randn(2, 16, 32, 32, requires_grad=True)
    fused_bytes, yf = saved_bytes(lambda: chain(x))
    plain_bytes, yp = saved_bytes(lambda: plain(x))
    act = x.numel() * x.element_size()
    # unfused: input + 6 x (conv output + ReLU output); fused: input + 6 x conv output
    assert plain_bytes >= 13 * act
    assert fused_bytes <= 7 * act + 64 * 1024  # + statistics and weights
    assert fused_bytes / plain_bytes < 0.6
    g = torch.randn_like(yf)
    gf = torch.autograd.grad(yf, [x, *chain.parameters()], g)
    gp = torch.autograd.grad(yp, [x, *plain.parameters()], g)
    for a, b in zip(gf, gp):  # fp32 sums in another order: compare relative to the scale
        assert ((a - b).norm() / b.norm()).item() < 1e-5


@needs_native
def test_recipe_is_dropped_after_in_place_change():
    torch.manual_seed(10)
    a, b = ConvBNReLU(3, 4, 3, padding=1), ConvBNReLU(4, 4, 3, padding=1)
    pa, pb = copy.deepcopy(a), copy.deepcopy(b)
    pa.fused = pb.fused = False
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = a(x)
    assert recompute.recipe_of(y) is not None
    y.mul_(2)  # the activation is no longer what the recipe rebuilds
    assert recompute.recipe_of(y) is None
    out = b(y)
    out.sum().backward()
    yp = pa(x.detach()).mul(2).requires_grad_()
    pb(yp).sum().backward()
    torch.testing.assert_close(b.conv.weight.grad, pb.conv.weight.grad, rtol=1e-4, atol=1e-5)


@needs_native
def test_torch_compile_fullgraph(device):
    torch.manual_seed(11)
    fused, plain = pair(4, 6, 3, padding=1)
    fused.to(device), plain.to(device)
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 4, 9, 11, device=device)
    xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf, yp = compiled(xf), plain(xp)
    torch.testing.assert_close(yf, yp, rtol=1e-5, atol=1e-5)
    yf.square().sum().backward()
    yp.square().sum().backward()
    torch.testing.assert_close(xf.grad, xp.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.conv.weight.grad, plain.conv.weight.grad, rtol=1e-4,
                               atol=1e-4)
    assert_same_state(fused, plain, rtol=1e-5, atol=1e-6)
    fused.eval(), plain.eval()
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-5)
