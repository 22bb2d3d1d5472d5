"""Per-layer analysis of an INT8 model against its FP32 original: statistics, error, LeakyReLU diagnostics."""

from .inspect import inspect_models, inspect_run, read_histograms

__all__ = ["inspect_models", "inspect_run", "read_histograms"]
