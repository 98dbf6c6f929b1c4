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
