"""Training and evaluation helpers behind ``python -m fastunet.train`` and ``fastunet.test``.

step (one update, eager or replayed from a CUDA graph), schedule (SGD + poly lr), state
(checkpoints that resume exactly), distributed (torchrun, the sharded sampler), data (config ->
datasets and loader), evaluation (shared with test), log (progress, log.jsonl, TensorBoard),
curves (PNG), determinism (--deterministic), cli (errors).
"""
from .schedule import PolyLR, build_optimizer, poly_lr

__all__ = ["PolyLR", "build_optimizer", "poly_lr"]
