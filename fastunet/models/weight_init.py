"""``init_weights()`` as mmengine's ``BaseModule`` defines it: backbone, heads and segmentor.

mmseg code (and mmseg's own tests) build a model and then call ``model.init_weights()``. The
protocol: a module that was not initialised yet applies its own initialisation (mmseg's
``init_cfg``), then calls ``init_weights()`` on each direct child that has one and is not
initialised, and marks itself initialised (``is_init``); calling it again does nothing but warn,
as in mmengine. Children reached only through an ``nn.Sequential`` or ``nn.ModuleList`` are not
visited, as in mmengine (mmseg's ``ConvModule`` initialises itself when it is built, as
:class:`fastunet.nn.ConvBNReLU` does).
"""
import warnings

import torch.nn as nn

__all__ = ["InitWeights", "kaiming_conv_constant_norm"]


class InitWeights:
    """Mixin for ``nn.Module`` subclasses: mmengine's ``init_weights()`` / ``is_init``.
    Subclasses put their own initialisation in ``_init_own_weights``."""

    @property
    def is_init(self):
        """Whether :meth:`init_weights` ran."""
        return self.__dict__.get("_is_init", False)

    def _init_own_weights(self):
        """This module's own initialisation (mmseg's ``init_cfg``); none by default."""

    def init_weights(self):
        """Initialise as mmseg does (see the module docstring); a second call only warns."""
        if self.is_init:
            warnings.warn(f"init_weights of {type(self).__name__} has been called more than "
                          f"once.", RuntimeWarning, stacklevel=2)
            return
        self._init_own_weights()
        for child in self.children():
            if hasattr(child, "init_weights") and not getattr(child, "is_init", False):
                child.init_weights()
        self.__dict__["_is_init"] = True


def kaiming_conv_constant_norm(module):
    """mmseg UNet's ``init_cfg``: Kaiming normal (fan_out, relu, bias 0) on every ``Conv2d``
    (not ``ConvTranspose2d``: mmengine matches the class name), weight 1 and bias 0 on every
    BatchNorm and GroupNorm."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
