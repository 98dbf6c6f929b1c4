"""Custom ops of fastunet (``torch.ops.fastunet.*``) behind typed Python wrappers."""
from .tile import EPILOGUES, tile_aggregate, tile_extract
from .tile_reference import gaussian_weight, window_count, window_starts

__all__ = ["EPILOGUES", "gaussian_weight", "tile_aggregate", "tile_extract", "window_count",
           "window_starts"]
