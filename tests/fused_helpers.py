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
