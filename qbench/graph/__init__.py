"""Graph facts: what an ONNX model is and what its QDQ graph quantizes (qdq), inner-tensor sessions (tap), the
YOLO detector's head and preparation tags (detector). Below quantize/ and analysis/: imports neither."""
