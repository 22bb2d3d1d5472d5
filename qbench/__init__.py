"""qbench: INT8 quantization and validation workbench for YOLO detectors.

The Python API (qbench.api) is available from the package itself, loaded on first use so that `import qbench`
and its light modules stay quick:

    import qbench
    calib = qbench.CalibrationSet.sample("data.yaml", n=128)
    q = qbench.quantize("best.pt", "out/int8.onnx", "default", calib=calib)
    c = qbench.compare(q.fp32, q.model, "data.yaml")
"""

__version__ = "0.1.0"

API = ("CalibrationSet", "CompareResult", "EvalResult", "IncConfig", "InspectResult", "MixedResult", "QatResult",
       "QuantResult", "RunResult", "compare", "evaluate", "inspect", "qat", "quantize",
       "quantize_with_accuracy_control", "run")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    """The package facade: qbench.quantize & co. come from qbench.api (PEP 562), imported on first use."""
    if name in API:
        from . import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qbench' has no attribute {name!r}")
