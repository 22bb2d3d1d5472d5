"""ONNX Runtime sessions that expose a model's inner tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import scratch
from ..runtime import ort_session


class TensorTap:
    """An ONNX Runtime session over a copy of `model` whose outputs are the given inner tensors.

    `run(x)` returns {name: array} for those tensors (graph inputs among them are handed back from the feed).
    `optimize=False` runs the graph as written (a QDQ model then computes in simulated int8: float math on
    quantized values), which keeps every named tensor observable.
    """

    def __init__(self, model, names: list[str], threads: int | None = None, optimize: bool = True):
        import onnx
        from onnx import TensorProto, helper

        m = onnx.ModelProto()
        m.CopyFrom(model)
        inputs = {i.name for i in m.graph.input}
        existing = {o.name for o in m.graph.output}
        self.names = list(dict.fromkeys(names))
        self.fed = [t for t in self.names if t in inputs]
        wanted = [t for t in self.names if t not in inputs]
        for t in wanted:
            if t not in existing:
                m.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
        self.input_name = next(i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer})
        with scratch("tap") as td:
            path = Path(td) / "tap.onnx"
            onnx.save(m, str(path))
            self.session = ort_session(path, threads, optimize=optimize)
        self.outputs = wanted

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        vals = self.session.run(self.outputs, {self.input_name: x})
        out = dict(zip(self.outputs, vals))
        for t in self.fed:
            out[t] = x
        return out
