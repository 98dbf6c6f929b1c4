"""Stateless glue modules that pass activation recipes on (see fastunet.ops.recompute).

``MaxPool2d`` is ``nn.MaxPool2d`` (same arguments, no state) except that, fed a fused block's
output, it saves nothing for backward: the pooled input and the argmax positions are rebuilt
from the block's saved conv output when the gradient arrives.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import recompute


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d that keeps no activation when its input carries a recipe."""

    def forward(self, x):
        if torch.jit.is_scripting():
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                self.ceil_mode)
        return self._forward_recipe(x)

    @torch.jit.unused
    def _forward_recipe(self, x: torch.Tensor) -> torch.Tensor:
        if self.return_indices:
            return super().forward(x)
        return recompute.max_pool2d(x, self.kernel_size, self.stride, self.padding,
                                    self.dilation, self.ceil_mode)
