"""Activation recipes: outputs that backward rebuilds from tensors already saved, not stores.

A fused Conv-BN-ReLU block in training saves its conv output ``c`` (BN's backward needs it) and
registers its output ``y = relu(bn(c))`` here with a recipe that points at ``c`` and the batch
statistics. A consumer that would have saved ``y`` (the next block's convolution needs its input
for the weight gradient; a max-pool needs it to route gradients) keeps the recipe instead and
rebuilds ``y`` in backward with one elementwise pass, so each block keeps one activation alive
instead of two. ``max_pool2d``, ``interpolate`` and ``cat`` below extend recipes through the cheap
glue between blocks (U-Net pooling, upsampling, skip concatenation).

A recipe is valid only while its tensor is unmodified: an in-place change bumps the tensor's
version counter and the recipe is ignored from then on (the consumer saves the tensor as usual).
Recipes are kept in a weak dictionary, so they vanish with their tensors.
"""
import weakref

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

_RECIPES = WeakIdKeyDictionary()


class Recipe:
    """How to rebuild a tensor: ``fn(*args)``, args being tensors or other recipes."""

    __slots__ = ("fn", "args", "_versions", "_last")

    def __init__(self, fn, args):
        self.fn = fn
        self.args = tuple(args)
        self._versions = tuple(a._version if torch.is_tensor(a) else None for a in self.args)
        self._last = None  # weak reference to the last rebuilt tensor, reused while alive

    def materialize(self):
        """The tensor, rebuilt without autograd (bitwise what the forward produced)."""
        last = self._last() if self._last is not None else None
        if last is not None:
            return last
        for a, v in zip(self.args, self._versions):
            if v is not None and a._version != v:
                raise RuntimeError("a tensor needed to rebuild an activation for backward was "
                                   "modified in place after the forward; do not modify it before "
                                   "backward (as with any tensor autograd saves)")
        args = [a.materialize() if isinstance(a, Recipe) else a for a in self.args]
        with torch.no_grad():
            out = self.fn(*args)
        self._last = weakref.ref(out)
        return out


def register(tensor, fn, *args):
    """Record that ``tensor == fn(*args)`` (args: tensors that stay saved anyway, or recipes)."""
    _RECIPES[tensor] = (Recipe(fn, args), tensor._version)


def recipe_of(tensor):
    """The tensor's recipe if it has one and was not modified since, else None."""
    entry = _RECIPES.get(tensor)
    if entry is None or entry[1] != tensor._version:
        return None
    return entry[0]


def _tracking(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _MaxPool2dFromRecipe(torch.autograd.Function):
    """max_pool2d that saves nothing: backward rebuilds the input and the argmax positions."""

    @staticmethod
    def forward(ctx, x, recipe, kernel_size, stride, padding, dilation, ceil_mode):
        ctx.recipe = recipe
        ctx.args = (kernel_size, stride, padding, dilation, ceil_mode)
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        kernel_size, stride, padding, dilation, ceil_mode = ctx.args
        x = ctx.recipe.materialize()
        _, idx = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode,
                              return_indices=True)
        gx = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, x, kernel_size, stride, padding, dilation, ceil_mode, idx)
        return gx, None, None, None, None, None, None


def _pair(v):
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """F.max_pool2d; for an input with a recipe it saves nothing and gets a recipe itself."""
    recipe = recipe_of(x)
    if recipe is None or not _tracking(x):
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    k = _pair(kernel_size)
    s = k if stride is None else _pair(stride)
    args = (k, s, _pair(padding), _pair(dilation), bool(ceil_mode))
    out = _MaxPool2dFromRecipe.apply(x, recipe, *args)
    register(out, lambda t: F.max_pool2d(t, *args), recipe)
    return out


def interpolate(x, size=None, scale_factor=None, mode="nearest", align_corners=None):
    """F.interpolate (which saves nothing); the output gets a recipe when the input has one."""
    out = F.interpolate(x, size=size, scale_factor=scale_factor, mode=mode,
                        align_corners=align_corners)
    recipe = recipe_of(x)
    if recipe is not None and _tracking(x):
        register(out, lambda t: F.interpolate(t, size=size, scale_factor=scale_factor, mode=mode,
                                              align_corners=align_corners), recipe)
    return out


def cat(tensors, dim=0):
    """torch.cat (which saves nothing); the output gets a recipe when every input has one."""
    tensors = list(tensors)
    out = torch.cat(tensors, dim)
    recipes = [recipe_of(t) for t in tensors]
    if all(r is not None for r in recipes) and _tracking(*tensors):
        register(out, lambda *ts: torch.cat(ts, dim), *recipes)
    return out
