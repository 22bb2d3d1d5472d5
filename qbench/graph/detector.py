"""Facts of a YOLO detector's ONNX graph: is it one, where its float decode begins, what a QDQ graph quantizes
around it, and whether its float graph was transformed (prepared) by a recipe.

`check_detector` checks one 4-D image input and an output shaped (N, 4 + nc, anchors). `find_head` finds the
detect head FROM THE GRAPH: it walks back from the graph output through every non-Conv op until a Conv is reached.
Those Convs are the last conv of each detect branch (box and class, per scale); everything the walk passed
(reshapes and concats of the scales, the DFL softmax and its fixed arange(16) 1x1 Conv, the anchor/stride box
arithmetic, the class sigmoid, the final concat) is the decode, kept float. The DFL Conv is recognised by its
weight (1, c, 1, 1) = arange(c) fed by a Softmax, so the walk passes through it. Shape/Size ops end the walk.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import QbenchError

SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})  # read a tensor's shape, not its values: the head walk stops
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# metadata of a model whose float graph was transformed (recipe keys equalize, shift_negative), and the transformed
# float model written next to such an INT8 model (its reference)
PREPARED_META = "qbench_prepared"
PREPARED_FP32 = "fp32-prepared.onnx"


def _constants(graph) -> dict:
    """name -> TensorProto for initializers and Constant nodes."""
    out = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return out


def _dims(value_info) -> list:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _opset(model) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


@dataclass
class HeadInfo:
    """Where the YOLO detect head's float decode begins."""

    branch_convs: list[str]  # last Conv of each detect branch: quantized, the decode reads their (DQ) outputs
    dfl_convs: list[str]  # the fixed DFL Conv(s): part of the decode
    decode: list[str]  # every node after the branch convs, in graph order: kept float
    decode_op_types: dict[str, int]


def _is_dfl_conv(node, consts: dict, producers: dict) -> bool:
    """A Conv whose weight is (1, c, 1, 1) = arange(c), no (or zero) bias, fed by a Softmax through layout ops."""
    from onnx import numpy_helper

    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in consts:
        return False
    w = numpy_helper.to_array(consts[node.input[1]])
    if w.ndim != 4 or w.shape[0] != 1 or w.shape[2:] != (1, 1) or w.shape[1] < 2:
        return False
    if not np.allclose(w.reshape(-1), np.arange(w.shape[1]), atol=1e-5):
        return False
    if len(node.input) > 2 and node.input[2]:
        b = consts.get(node.input[2])
        if b is None or np.any(numpy_helper.to_array(b) != 0):
            return False
    t = node.input[0]
    for _ in range(6):
        p = producers.get(t)
        if p is None:
            return False
        if p.op_type == "Softmax":
            return True
        if p.op_type not in LAYOUT_OPS:
            return False
        t = p.input[0]
    return False


def find_head(model, path: str | os.PathLike = "model") -> HeadInfo:
    """The YOLO detect-head decode of an ONNX graph (see the module doc); QbenchError when there is none."""
    g = model.graph
    if not g.output:
        raise QbenchError(f"'{path}' is not a YOLO detector: the graph has no output; export one with `qbench export`.")
    producers = {o: n for n in g.node for o in n.output if o}
    consts = _constants(g)
    graph_inputs = {i.name for i in g.input} - set(consts)
    decode, branch, dfl, visited = set(), [], [], set()
    reached_input = False
    stack = [o.name for o in g.output]
    while stack:
        t = stack.pop()
        if not t or t in consts:
            continue
        node = producers.get(t)
        if node is None:
            reached_input |= t in graph_inputs
            continue
        if node.name in visited:
            continue
        visited.add(node.name)
        if node.op_type == "Conv" and not _is_dfl_conv(node, consts, producers):
            branch.append(node.name)
            continue
        decode.add(node.name)
        if node.op_type == "Conv":
            dfl.append(node.name)
        if node.op_type in SHAPE_ONLY_OPS:
            continue
        stack.extend(node.input)
    if reached_input:
        raise QbenchError(f"'{path}' is not a YOLO detector: its output is computed from the input without a "
                          "convolution in between; export a YOLO detector with `qbench export`.")
    if len(branch) < 2:
        raise QbenchError(f"'{path}' is not a YOLO detector: no detect-head convolutions feed its output; "
                          "export a YOLO detector with `qbench export`.")
    order = {n.name: i for i, n in enumerate(g.node)}
    decode_list = sorted(decode, key=order.__getitem__)
    ops = Counter(n.op_type for n in g.node if n.name in decode)
    return HeadInfo(sorted(branch, key=order.__getitem__), sorted(dfl, key=order.__getitem__), decode_list,
                    dict(sorted(ops.items())))


def check_detector(model, path: str | os.PathLike) -> dict:
    """Input name, imgsz (None if H/W are dynamic), nc and batch dynamism of a YOLO detector ONNX."""
    import ast

    g = model.graph
    init = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in init]
    hint = "export one with `qbench export`"
    if len(inputs) != 1 or len(_dims(inputs[0])) != 4:
        found = ", ".join(f"{i.name}{_dims(i)}" for i in inputs) or "none"
        raise QbenchError(f"'{path}' is not a YOLO detector: it needs one 4-D image input (N, 3, H, W), "
                          f"found {found}; {hint}.")
    dims = _dims(inputs[0])
    if isinstance(dims[1], int) and dims[1] != 3:
        raise QbenchError(f"'{path}' is not a YOLO detector: its input has {dims[1]} channels, not 3 (RGB); {hint}.")
    h, w = dims[2], dims[3]
    imgsz = h if isinstance(h, int) and h == w else None
    if isinstance(h, int) and isinstance(w, int) and h != w:
        raise QbenchError(f"'{path}' has a non-square input {h}x{w}; qbench works with square inputs, so {hint}.")
    out = _dims(g.output[0]) if g.output else []
    if len(out) != 3 or not isinstance(out[1], int) or out[1] < 5:
        raise QbenchError(f"'{path}' is not a YOLO detector: its output is shaped {out or 'unknown'}, not "
                          f"(N, 4 + classes, anchors); {hint}.")
    nc = out[1] - 4
    meta = {p.key: p.value for p in model.metadata_props}
    if "names" in meta:
        try:
            names = ast.literal_eval(meta["names"])
            if len(names) != nc:
                raise QbenchError(f"'{path}' has {len(names)} class names in its metadata but its output has "
                                  f"4 + {nc} rows; re-export it with `qbench export`.")
        except (ValueError, SyntaxError, TypeError):
            pass
    return {"input_name": inputs[0].name, "imgsz": imgsz, "nc": nc, "batch_dynamic": not isinstance(dims[0], int),
            "input_shape": dims, "output_shape": out}


def _qdq_neighbours(model) -> tuple[dict, dict]:
    """tensor -> producer op type, tensor -> consumer op types."""
    prod, cons = {}, {}
    for n in model.graph.node:
        for o in n.output:
            prod[o] = n.op_type
        for i in n.input:
            cons.setdefault(i, []).append(n.op_type)
    return prod, cons


def node_summary(qmodel, excluded: set[str]) -> dict:
    """Per op type: nodes that read a dequantized input (quantized) vs. the rest (float), Q/DQ counts."""
    prod, _ = _qdq_neighbours(qmodel)
    quant, flt = Counter(), Counter()
    quant_names = []
    for n in qmodel.graph.node:
        if n.op_type in QDQ_OPS:
            continue
        is_q = n.name not in excluded and any(prod.get(i) == "DequantizeLinear" for i in n.input)
        (quant if is_q else flt)[n.op_type] += 1
        if is_q:
            quant_names.append(n.name)
    ops = Counter(n.op_type for n in qmodel.graph.node)
    return {"quantized": dict(sorted(quant.items())), "float": dict(sorted(flt.items())),
            "quantized_total": sum(quant.values()), "float_total": sum(flt.values()),
            "QuantizeLinear": ops.get("QuantizeLinear", 0), "DequantizeLinear": ops.get("DequantizeLinear", 0)}


def head_qdq_violations(qmodel, head: HeadInfo) -> list[str]:
    """Decode nodes that touch Q/DQ where they should not: any output into a QuantizeLinear, or a dequantized
    input that does not come straight from a branch conv's output."""
    prod_node = {o: n for n in qmodel.graph.node for o in n.output}
    _, cons = _qdq_neighbours(qmodel)
    branch_outputs = {o for n in qmodel.graph.node if n.name in head.branch_convs for o in n.output}
    decode = set(head.decode)
    bad = []
    for n in qmodel.graph.node:
        if n.name not in decode:
            continue
        if any("QuantizeLinear" in cons.get(o, []) for o in n.output):
            bad.append(f"{n.name} ({n.op_type}) output is quantized")
        if n.op_type in SHAPE_ONLY_OPS:  # reads only the shape of a (possibly quantized) body tensor
            continue
        for i in n.input:
            p = prod_node.get(i)
            if p is not None and p.op_type == "DequantizeLinear":
                q = prod_node.get(p.input[0])
                src = prod_node.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
                if src is None or src.name not in head.branch_convs or q.input[0] not in branch_outputs:
                    bad.append(f"{n.name} ({n.op_type}) reads dequantized {i}")
    return bad


def preparation_of(model) -> str | None:
    """The PREPARED_META tag of an ONNX model (ModelProto); None for a model whose float graph was not transformed."""
    return next((p.value for p in model.metadata_props if p.key == PREPARED_META), None)


def load_onnx(path: Path, what: str):
    import onnx
    from google.protobuf.message import DecodeError

    if not Path(path).is_file():
        raise QbenchError(f"{what} '{path}' does not exist; pass the .onnx that `qbench run` or `qbench quantize` "
                          "wrote.")
    try:
        return onnx.load(str(path))
    except DecodeError as e:
        raise QbenchError(f"{what} '{path}' is not an ONNX model; pass the .onnx that `qbench run` wrote.") from e
