"""The baseline to beat: ultralytics' own INT8 ONNX export.

`YOLO(best.pt).export(format="onnx", quantize=8, data=...)` runs ONNX Runtime's
`quantize_static` with its defaults (MinMax, per-tensor weights, QInt8
activations), quantizes every Conv/Gemm/MatMul (the DFL conv and the last
branch convs included) and calibrates on the data's *val* split. qbench runs it
untouched, in a temporary folder (it writes next to the weights), and scores the
result through the same evaluation path as its own INT8 model.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..errors import QbenchError
from ..files import scratch
from ..models.load import checkpoint_imgsz, load_checkpoint


def ultralytics_int8(weights: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
                     imgsz: int | None = None) -> Path:
    """Export `weights` with ultralytics' `export(format="onnx", quantize=8)`; returns `out`."""
    from ..ultra import YOLO

    weights, out = Path(weights), Path(out)
    imgsz = imgsz or checkpoint_imgsz(load_checkpoint(weights))
    logger = logging.getLogger("ultralytics")
    level = logger.level
    with scratch("baseline") as tmp:
        copy = Path(tmp) / "model.pt"
        shutil.copyfile(weights, copy)
        logger.setLevel(logging.WARNING)
        try:
            produced = Path(YOLO(str(copy)).export(format="onnx", quantize=8, data=str(Path(data).resolve()),
                                                    imgsz=imgsz, batch=1, device="cpu"))
        except (AssertionError, RuntimeError, ValueError) as e:  # ultralytics' own argument and data checks
            raise QbenchError(f"ultralytics' INT8 export of '{weights}' failed ({str(e).splitlines()[0][:200]}).") from e
        finally:
            logger.setLevel(level)
        produced = produced if produced.is_absolute() else Path(tmp) / produced
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(produced), out)
    return out
