"""qbench: INT8 quantization and validation workbench for YOLO detectors."""

__version__ = "0.1.0"
