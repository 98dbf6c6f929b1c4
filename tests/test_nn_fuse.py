"""fastunet.fuse: folds exactly the provably safe conv -> BN (-> ReLU) chains, same outputs."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fastunet
from fastunet import _native, settings
from fastunet.nn import ConvBNReLU, FoldedConv2d, fuse


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: one ReLU module used twice, a downsample branch."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                        nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class Untraceable(nn.Module):
    """Control flow on tensor values defeats torch.fx; its Sequential is still fused."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.tail = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.body(x)
        if y.mean() > 100:  # data-dependent branch
            y = -y
        return self.tail(y)


class SharedConvOutput(nn.Module):
    """A conv output read by its BN and by something else: folding would change the result."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        c = self.conv(x)
        return self.bn(c) + c


def randomize_bn(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def check(model, x):
    model = randomize_bn(model).eval()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        expected = reference(x)
        fused = fuse(model)
        assert fused is model and not fused.training
        got = fused(x)
    assert rel_err(got, expected) < 1e-5
    return fused


@pytest.mark.parametrize("mem", ["contiguous", "channels_last"])
def test_resnet_basic_block(mem):
    torch.manual_seed(1)
    x = torch.randn(2, 8, 15, 17).contiguous(
        memory_format=torch.channels_last if mem == "channels_last" else torch.contiguous_format)
    block = check(BasicBlock(8, 16, stride=2), x)
    # every conv+BN folded; the shared ReLU stays (it also follows the residual sum)
    assert isinstance(block.conv1, FoldedConv2d) and not block.conv1.relu
    assert isinstance(block.conv2, FoldedConv2d) and isinstance(block.downsample[0], FoldedConv2d)
    assert all(isinstance(m, nn.Identity) for m in (block.bn1, block.bn2, block.downsample[1]))
    assert isinstance(block.relu, nn.ReLU)


def test_sequential_chain_takes_its_relu():
    torch.manual_seed(2)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 4, 3, padding=2, dilation=2), nn.BatchNorm2d(4))
    seq = check(seq, torch.randn(2, 3, 12, 13))
    assert isinstance(seq[0], FoldedConv2d) and seq[0].relu and isinstance(seq[2], nn.Identity)
    assert isinstance(seq[3], FoldedConv2d) and not seq[3].relu


def test_untraceable_model_falls_back_to_sequential_patterns():
    torch.manual_seed(3)
    model = check(Untraceable(), torch.randn(2, 3, 10, 11))
    assert isinstance(model.body[0], FoldedConv2d) and model.body[0].relu
    assert isinstance(model.body[3], FoldedConv2d) and isinstance(model.tail[0], FoldedConv2d)


def test_conv_output_used_twice_is_not_folded():
    torch.manual_seed(4)
    model = check(SharedConvOutput(), torch.randn(2, 3, 8, 9))
    assert type(model.conv) is nn.Conv2d and isinstance(model.bn, nn.BatchNorm2d)


@pytest.mark.skipif(not _native.LOADED, reason="needs the native ops")
def test_convbnrelu_blocks_are_fused_in_place():
    torch.manual_seed(5)
    net = nn.Sequential(ConvBNReLU(3, 8, 3, padding=1), ConvBNReLU(8, 8, 3, padding=12,
                                                                   dilation=12),
                        nn.Conv2d(8, 2, 1))
    keys = list(net.state_dict())
    x = torch.randn(2, 3, 32, 30)
    net = check(net, x)
    assert all(m.is_fused_for(x) for m in net if isinstance(m, ConvBNReLU))
    assert list(net.state_dict()) == keys  # ConvBNReLU keeps its structure


def test_training_model_is_refused():
    with pytest.raises(RuntimeError, match="eval"):
        fuse(BasicBlock(4, 4).train())


def test_bn_left_in_training_mode_is_skipped_with_a_warning():
    model = randomize_bn(BasicBlock(4, 4)).eval()
    model.bn2.train()
    with pytest.warns(UserWarning, match="not folded"):
        fuse(model)
    assert isinstance(model.conv1, FoldedConv2d) and type(model.conv2) is nn.Conv2d


def test_environment_switch_leaves_model_unfused():
    model = BasicBlock(4, 4).eval()
    with settings.override(fused=False), pytest.warns(UserWarning, match="FASTUNET_FUSED=0"):
        assert fuse(model) is model
    assert type(model.conv1) is nn.Conv2d


def test_fuse_is_the_public_entry_point():
    assert fastunet.fuse is fuse
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fuse(nn.Sequential(nn.Conv2d(2, 2, 1)).eval())  # nothing to fold: no complaint
