"""Custom ops of fastunet (``torch.ops.fastunet.*``) behind typed Python wrappers."""
from . import recompute
from .conv_bn_relu import (batch_norm_relu, bn_relu, bn_relu_backward_elemt,
                           bn_relu_backward_reduce, bn_stats, bn_update_running_stats,
                           conv_bias_relu, conv_bn_relu_train, fold_bn)
from .tile import EPILOGUES, tile_aggregate, tile_extract
from .tile_reference import gaussian_weight, window_count, window_starts

__all__ = ["EPILOGUES", "batch_norm_relu", "bn_relu", "bn_relu_backward_elemt",
           "bn_relu_backward_reduce", "bn_stats", "bn_update_running_stats", "conv_bias_relu",
           "conv_bn_relu_train", "fold_bn", "gaussian_weight", "recompute", "tile_aggregate",
           "tile_extract", "window_count", "window_starts"]
