"""FP32 ONNX export of a YOLO detector, ready for ONNX Runtime static INT8.

`export_onnx()` runs ultralytics' own exporter (so the file carries ultralytics'
metadata and `YOLO('model.onnx')` can validate and predict with it) and then
makes the graph what quantization wants:

* raw detector output without NMS: (B, 4 + nc, anchors), boxes xywh in input
  pixels, class scores after the sigmoid (ultralytics' standard ONNX output);
* input static in H and W (= imgsz) and, with `dynamic_batch`, dynamic only in
  the batch dimension. ultralytics' `dynamic=True` makes H and W dynamic too,
  so they are pinned afterwards and the graph is slimmed again, which folds the
  shape-dependent anchor computation back into constants;
* opset <= 20 (ONNX Runtime's static INT8 quantizer rejects newer opsets);
* qbench metadata next to ultralytics': qbench_version, qbench_source_sha256,
  qbench_imgsz, qbench_batch_dynamic.

ultralytics writes its export next to the weights, so the exporter runs on a copy
in a temporary folder; the result is checked (onnx.checker, an ONNX Runtime CPU
session and one inference) under a temporary name next to `out_path` and only
then renamed into place, so a failed export never leaves a file at `out_path`.

A note for callers that validate with ultralytics: for ONNX, ultralytics decides
"dynamic" from the output's batch dimension, and a dynamic model gets the *user's*
imgsz (default 640) and rect batches. A batch-dynamic export therefore needs
`YOLO(onnx).val(imgsz=<imgsz>, rect=False, ...)`; `read_onnx_meta()["val_args"]`
holds exactly those arguments.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .. import __version__
from ..errors import QbenchError
from ..files import check_writable, scratch, sha256_file
from .load import checkpoint_imgsz, load_checkpoint

LOG = logging.getLogger("qbench")

MIN_OPSET = 11  # ultralytics and the TorchScript ONNX exporter go lower, but nothing below 11 is worth quantizing
MAX_OPSET = 20  # ONNX Runtime's static INT8 quantization rejects opset >= 21
IR_VERSION_MAX = 10  # what ultralytics caps the IR version to, for ONNX Runtime compatibility


def _check_opset(opset, weights: Path) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise QbenchError(f"Cannot export '{weights}' at opset {opset!r}: ONNX Runtime's static INT8 quantization "
                          f"needs an opset from {MIN_OPSET} to {MAX_OPSET}, so pass one in that range (default 17).")
    return opset


def _check_imgsz(imgsz, weights: Path, stride: int) -> int:
    if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz <= 0 or imgsz % stride:
        raise QbenchError(f"Cannot export '{weights}' at imgsz {imgsz!r}: it must be a positive multiple of the "
                          f"model's stride {stride} (e.g. {stride * 10} or {stride * 20}).")
    return imgsz


@contextlib.contextmanager
def _quiet_ultralytics():
    """Let only ultralytics' warnings and errors through (its logger is 'ultralytics')."""
    logger = logging.getLogger("ultralytics")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _set_meta(proto, items: dict) -> None:
    """Set metadata_props entries, replacing any with the same key."""
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in items]
    del proto.metadata_props[:]
    for k, v in [*keep, *items.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, str(v)


def _pin_hw(proto, imgsz: int, n_anchors: int):
    """Fix the input's H and W (and the output's anchor count) left dynamic by ultralytics' dynamic=True, keep the
    batch dimension symbolic, and slim again so the shape-dependent anchor grid folds into constants."""
    import onnxslim

    graph = proto.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise RuntimeError(f"expected one input and one output from the ultralytics ONNX export, got "
                           f"{len(graph.input)} and {len(graph.output)}")
    dims = graph.input[0].type.tensor_type.shape.dim
    for d in dims[2:]:
        d.Clear()
        d.dim_value = imgsz
    out = graph.output[0].type.tensor_type.shape.dim
    out[2].Clear()
    out[2].dim_value = n_anchors
    del graph.value_info[:]  # stale symbolic shapes; shape inference in onnxslim redoes them
    try:
        return onnxslim.slim(proto)
    except Exception as e:  # as in ultralytics' exporter: an unslimmed graph is still a correct graph
        LOG.warning(f"onnxslim could not simplify the graph after fixing H and W ({e}); keeping it unslimmed.")
        return proto


def _verify_and_write(proto, out: Path, imgsz: int, dynamic_batch: bool, n_out: int, n_anchors: int) -> None:
    """Check the model, load it in ONNX Runtime under a temporary name next to `out`, run it once, rename it."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(proto, full_check=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        shape = sess.get_inputs()[0].shape
        batch_dim = shape[0]
        if list(shape[1:]) != [3, imgsz, imgsz] or isinstance(batch_dim, int) == dynamic_batch:
            raise RuntimeError(f"exported input shape {shape} is not [{'batch' if dynamic_batch else 1}, 3, "
                               f"{imgsz}, {imgsz}]")
        y = sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 3, imgsz, imgsz), np.float32)})[0]
        if y.shape != (1, n_out, n_anchors) or not np.isfinite(y).all():
            raise RuntimeError(f"exported model gives output {y.shape} (finite: {np.isfinite(y).all()}), expected "
                               f"(1, {n_out}, {n_anchors})")
        del sess
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it normal file permissions
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_onnx(weights: str | os.PathLike, out_path: str | os.PathLike, imgsz: int | None = None,
                opset: int = 17, dynamic_batch: bool = True) -> Path:
    """Export a YOLO detection .pt to an FP32 ONNX without NMS; returns `out_path`.

    imgsz defaults to the training image size stored in the checkpoint. With dynamic_batch the input is
    (batch, 3, imgsz, imgsz) with a symbolic batch; without it (1, 3, imgsz, imgsz).
    """
    weights, out = Path(weights), Path(out_path)
    opset = _check_opset(opset, weights)
    if out.suffix.lower() != ".onnx":
        raise QbenchError(f"Output '{out}' does not end in .onnx; pass an output path like model.onnx.")
    if out.is_dir():
        raise QbenchError(f"Output '{out}' is a directory; pass a file path like {out / 'model.onnx'}.")
    if out.parent.exists() and not out.parent.is_dir():
        raise QbenchError(f"Output folder '{out.parent}' is a file; pass an output path inside a folder.")

    check_writable(out.parent, "the exported model")
    yolo = load_checkpoint(weights)  # QbenchError for anything that is not a YOLO detection checkpoint
    model = yolo.model
    strides = [int(s) for s in model.stride.tolist()]
    if imgsz is None:
        imgsz = checkpoint_imgsz(yolo)
        if imgsz is None:
            raise QbenchError(f"'{weights}' does not record the image size it was trained at; pass imgsz explicitly.")
    imgsz = _check_imgsz(imgsz, weights, max(strides))
    nc = int(model.model[-1].nc)
    n_anchors = sum((imgsz // s) ** 2 for s in strides)
    del yolo, model
    out.parent.mkdir(parents=True, exist_ok=True)

    import onnx

    from ..ultra import YOLO

    # ultralytics writes <weights stem>.onnx next to the weights it loaded: give it a private copy.
    with scratch("export") as td:
        src = Path(td) / weights.name
        shutil.copyfile(weights, src)
        source_sha = sha256_file(src)  # of exactly the bytes exported
        with _quiet_ultralytics():  # its INFO lines name the temporary files, which are gone afterwards
            f = YOLO(str(src), task="detect").export(
                format="onnx", imgsz=imgsz, opset=opset, dynamic=bool(dynamic_batch), batch=1, simplify=True,
                device="cpu")
        f = Path(f)
        if f.parent.resolve() != Path(td).resolve():
            raise RuntimeError(f"ultralytics wrote the ONNX export to {f}, outside its temporary folder {td}")
        proto = onnx.load(str(f))

    if dynamic_batch:
        proto = _pin_hw(proto, imgsz, n_anchors)
    if proto.ir_version > IR_VERSION_MAX:
        proto.ir_version = IR_VERSION_MAX
    _set_meta(proto, {
        "qbench_version": __version__,
        "qbench_source_sha256": source_sha,
        "qbench_imgsz": imgsz,
        "qbench_batch_dynamic": bool(dynamic_batch),
    })
    _verify_and_write(proto, out, imgsz, bool(dynamic_batch), 4 + nc, n_anchors)
    return out


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


def read_onnx_meta(path: str | os.PathLike) -> dict:
    """What qbench needs to know about an exported ONNX detector, from its metadata_props and graph I/O.

    Returns names (list), imgsz (int), stride (max stride, int), batch_dynamic, hw_dynamic, opset, task,
    input_name, input_shape, output_shape, qbench_version and source_sha256 (None for a plain ultralytics
    export), val_args (the arguments `YOLO(path).val()` needs, see the module doc) and the raw metadata.
    """
    p = Path(path)
    if not p.exists():
        raise QbenchError(f"ONNX model '{p}' does not exist; export one with `qbench export`.")
    if p.is_dir():
        raise QbenchError(f"ONNX model '{p}' is a directory; pass the .onnx file inside it.")

    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(p), load_external_data=False)
    except DecodeError as e:
        raise QbenchError(f"'{p}' is not an ONNX model ({type(e).__name__}); export one with `qbench export`.") from e
    if not proto.graph.node or not proto.opset_import or not proto.graph.input:
        raise QbenchError(f"'{p}' is not an ONNX model (no graph in it); export one with `qbench export`.")

    meta = {e.key: e.value for e in proto.metadata_props}
    hint = "export it with `qbench export`"
    if "names" not in meta:
        raise QbenchError(f"'{p}' has no class-names metadata, so it was not exported by ultralytics/qbench; {hint}.")
    try:
        names = ast.literal_eval(meta["names"])
        names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    except (ValueError, SyntaxError, TypeError) as e:
        raise QbenchError(f"'{p}' has malformed class-names metadata ({meta['names'][:60]!r}); {hint}.") from e

    inp = _dims(proto.graph.input[0])
    if len(inp) != 4:
        raise QbenchError(f"'{p}' takes a {len(inp)}-D input, not a (batch, 3, H, W) image; {hint}.")
    if "qbench_imgsz" in meta:
        imgsz = int(meta["qbench_imgsz"])
    else:
        try:
            size = ast.literal_eval(meta["imgsz"]) if "imgsz" in meta else inp[2:]
        except (ValueError, SyntaxError) as e:
            raise QbenchError(f"'{p}' has malformed imgsz metadata ({meta['imgsz']!r}); {hint}.") from e
        size = list(size) if isinstance(size, (list, tuple)) else [size, size]
        if len(size) != 2 or not all(isinstance(s, int) for s in size) or size[0] != size[1]:
            raise QbenchError(f"'{p}' has a non-square or unknown input size {size}; qbench works with square "
                              f"inputs, so {hint}.")
        imgsz = size[0]

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "names": names,
        "imgsz": imgsz,
        "stride": int(meta["stride"]) if "stride" in meta else None,
        "batch_dynamic": not isinstance(inp[0], int),
        "hw_dynamic": not all(isinstance(d, int) for d in inp[2:]),
        "opset": opset,
        "task": meta.get("task"),
        "input_name": proto.graph.input[0].name,
        "input_shape": inp,
        "output_shape": _dims(proto.graph.output[0]) if proto.graph.output else None,
        "qbench_version": meta.get("qbench_version"),
        "source_sha256": meta.get("qbench_source_sha256"),
        "val_args": {"imgsz": imgsz, "rect": False},
        "metadata": meta,
    }
