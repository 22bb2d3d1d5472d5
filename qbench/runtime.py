"""Model backends behind one call: float32 NCHW batch in, raw YOLO head out.

`open_model(path)` gives a `Detector` for an `.onnx` file (ONNX Runtime, the
path every FP32/INT8 comparison goes through) or a `.pt` checkpoint (PyTorch,
for cross-checks). Both return the head's raw `(N, 4 + nc, anchors)` output
(boxes as cx, cy, w, h in input pixels; sigmoid class scores), which
`qbench.evaluate` decodes with ultralytics' NMS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import QbenchError


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ort_session(path: str | Path | bytes, threads: int | None = None, optimize: bool = True):
    """An ONNX Runtime CPU session with a fixed thread count (intra-op), sequential execution; `path` may also be
    a serialized model (bytes)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    # Idle worker threads must not spin: qbench keeps several sessions open (FP32, INT8, variants) and runs them in
    # turn, and a spinning pool of one session steals the cores of the next (on 2 cores that doubled latencies).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        src = path if isinstance(path, bytes) else str(path)
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        where = "the edited model" if isinstance(path, bytes) else path
        raise QbenchError(f"ONNX Runtime cannot load '{where}' ({str(e).splitlines()[0][:200]}); "
                          "re-export it with `qbench export`.") from e


@dataclass
class Detector:
    path: Path
    kind: str  # "onnx" or "pt"
    names: list[str]
    imgsz: int
    dynamic_batch: bool
    forward: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    threads: int = 1


def _open_onnx(path: Path, threads: int | None) -> Detector:
    from .models.export import read_onnx_meta

    meta = read_onnx_meta(path)
    sess = ort_session(path, threads)
    inp = sess.get_inputs()[0]
    shape = inp.shape
    if len(shape) != 4:
        raise QbenchError(f"'{path}' takes a {len(shape)}-D input, not an image batch (N, 3, H, W); "
                          "it is not a YOLO detector exported by ultralytics or qbench.")
    name = inp.name
    dynamic = not isinstance(shape[0], int)

    def forward(batch: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: batch})[0]

    return Detector(path, "onnx", meta["names"], meta["imgsz"], dynamic, forward, threads or default_threads())


def _open_pt(path: Path, threads: int | None) -> Detector:
    import torch

    from .models.load import checkpoint_imgsz, load_checkpoint

    yolo = load_checkpoint(path)
    model = yolo.model.float().eval()
    model = model.fuse() if hasattr(model, "fuse") else model
    imgsz = checkpoint_imgsz(yolo) or 640  # ultralytics' default when a checkpoint does not say
    names = [model.names[i] for i in range(len(model.names))]
    n_threads = threads or default_threads()

    def forward(batch: np.ndarray) -> np.ndarray:
        torch.set_num_threads(n_threads)
        with torch.inference_mode():
            out = model(torch.from_numpy(batch))
        out = out[0] if isinstance(out, (list, tuple)) else out
        return out.numpy()

    return Detector(path, "pt", names, imgsz, True, forward, n_threads)


def open_model(path: str | Path, threads: int | None = None) -> Detector:
    """A detector for a `.onnx` or `.pt` file."""
    p = Path(path)
    if not p.exists():
        raise QbenchError(f"Model file '{p}' does not exist; pass a trained .pt or an exported .onnx.")
    if p.suffix.lower() == ".onnx":
        return _open_onnx(p, threads)
    if p.suffix.lower() == ".pt":
        return _open_pt(p, threads)
    raise QbenchError(f"'{p}' is neither a .pt checkpoint nor an .onnx model; qbench evaluates those two formats.")
