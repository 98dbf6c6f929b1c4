"""Helpers shared by the fused Conv-BN-ReLU tests: an unfused twin and saved-activation bytes."""
import copy

import torch

from fastunet.nn import ConvBNReLU


def unfused(model):
    """A deep copy of model whose ConvBNReLU blocks run the plain PyTorch modules."""
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, ConvBNReLU):
            m.fused = False
    return plain


def trained_looking_bn(model):
    """Give every BatchNorm2d of model non-trivial statistics and affine values (so that folding
    them is not the identity); returns model."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


def saved_bytes(fn, model=None):
    """(bytes of the distinct storages autograd saves while fn() runs, fn()); the parameters
    and buffers of `model`, if given, are not counted."""
    skip = set()
    if model is not None:
        skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out
