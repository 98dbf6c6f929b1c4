"""Large-image inference: the model-agnostic window engine and the Predictor built on it."""
import importlib

from .engine import (MODES, PRECISIONS, InferenceEngine, TilePlan, cpu_has_native_bf16, infer,
                     resolve_precision)
from .planner import Schedule

__all__ = ["MODES", "PRECISIONS", "InferenceEngine", "Predictor", "Schedule", "TilePlan",
           "cpu_has_native_bf16", "infer", "resolve_precision"]


def __getattr__(name):
    # The Predictor needs the model package; the engine must not, so it loads lazily.
    if name == "Predictor":
        return importlib.import_module("fastunet.inference.predictor").Predictor
    raise AttributeError(f"module 'fastunet.inference' has no attribute {name!r}")
