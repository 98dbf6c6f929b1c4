"""Custom ops of fastunet (``torch.ops.fastunet.*``) behind typed Python wrappers."""
from .tile import tile_aggregate, tile_extract
from .tile_reference import window_count, window_starts

__all__ = ["tile_aggregate", "tile_extract", "window_count", "window_starts"]
