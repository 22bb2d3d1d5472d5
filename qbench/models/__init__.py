"""YOLO checkpoints: validated loading, model facts and ONNX export."""

from .export import export_onnx, read_onnx_meta
from .load import load_checkpoint, model_facts

__all__ = ["export_onnx", "load_checkpoint", "model_facts", "read_onnx_meta"]
