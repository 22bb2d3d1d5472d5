"""Per-layer FP32 fallback by editing a QDQ INT8 graph: the mechanism behind sensitivity and mixed precision.

A "layer" is a quantized Conv of the QDQ graph ONNX Runtime wrote (the detect-head decode, DFL conv included,
is already float). What quantizes it is a set of EDGES, (consumer node, input index) pairs that read a
DequantizeLinear output:

- the Conv's own inputs: its activation (the producer's Q/DQ), its int8 weight and its int32 bias;
- after it, the requantization of its output that only exists for it: the Q/DQ between the Conv and its
  activation (an unfused profile's Conv -> Q/DQ -> LeakyRelu), or the Q/DQ a detect-branch conv's output gets
  before the float decode reads it.

Bypassing an edge makes the consumer read the float tensor instead: the Q's input for an activation, the FP32
model's weight (same initializer name without ORT's `_quantized` suffix) for a weight, the dequantized value for
an int32 bias (its error is far below anything int8 does). Nothing else changes: no re-calibration, the other
layers keep their exact scales. So

- `keep_float(q, fp32, layers)` is the INT8 model with those layers in FP32 (mixed precision, sensitivity
  "recovery"), and ONNX Runtime runs every other Conv as int8 as before;
- `quantize_only(q, fp32, layer)` is the FP32 model with only that layer's quantizers (sensitivity "damage").

Nodes and initializers left without readers are removed, so the edited model is a clean QDQ graph.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from ..errors import QbenchError
from ..graph.detector import PREPARED_FP32, preparation_of
from .constraints import ACTIVATIONS

QUANTIZED_SUFFIX = "_quantized"  # ORT names a quantized initializer <float name>_quantized


@dataclass
class Layer:
    """One quantized Conv and the edges that quantize it."""

    name: str  # the Conv node's name, e.g. /model.2/cv1/conv/Conv
    index: int  # position among the quantized convs, in graph order
    edges: list[tuple[str, int]] = field(default_factory=list)
    weight: str = ""  # the FP32 weight initializer's name
    macs: int = 0  # multiply-accumulates per image (0 when shapes are unknown)

    @property
    def module(self) -> str:
        """The ultralytics module path, e.g. model.2.cv1.conv, from the node name. The exporter names nested
        children by their path from the enclosing module: /model.23/cv2.0/cv2.0.0/conv/Conv is model.23.cv2.0.0.conv."""
        parts: list[str] = []
        for seg in self.name.strip("/").split("/")[:-1]:
            if parts and seg.startswith(parts[-1] + "."):
                parts[-1] = seg
            else:
                parts.append(seg)
        return ".".join(parts)


class _Index:
    def __init__(self, graph):
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for k, i in enumerate(n.input):
                self.consumers.setdefault(i, []).append((n, k))
        self.init = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}

    def dq_feeding(self, node, k: int):
        p = self.producer.get(node.input[k])
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    def output_quantized(self, node) -> bool:
        return any(c.op_type == "QuantizeLinear" for o in node.output for c, _ in self.consumers.get(o, []))


def conv_layers(qmodel) -> list[Layer]:
    """The quantized Convs of a QDQ model (a Conv reading at least one DequantizeLinear), in graph order."""
    g = qmodel.graph
    ix = _Index(g)
    layers = []
    for n in g.node:
        if n.op_type != "Conv":
            continue
        own = [(n.name, k) for k in range(len(n.input)) if n.input[k] and ix.dq_feeding(n, k) is not None]
        if not own:
            continue
        edges = list(own)
        for q, _ in ix.consumers.get(n.output[0], []):  # the requantization of its output that only it needs
            if q.op_type != "QuantizeLinear":
                continue
            for dq, _ in ix.consumers.get(q.output[0], []):
                if dq.op_type != "DequantizeLinear":
                    continue
                for c, k in ix.consumers.get(dq.output[0], []):
                    if c.op_type in ACTIVATIONS or not ix.output_quantized(c):
                        edges.append((c.name, k))
        wdq = ix.dq_feeding(n, 1) if len(n.input) > 1 else None
        weight = wdq.input[0].removesuffix(QUANTIZED_SUFFIX) if wdq is not None else ""
        layers.append(Layer(n.name, len(layers), edges, weight))
    _add_macs(qmodel, layers)
    return layers


def _add_macs(qmodel, layers: list[Layer]) -> None:
    """MACs per image from the weight shape and the output size ONNX shape inference gives (0 if unknown)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(qmodel)
    except Exception:  # noqa: BLE001 - MACs are informative only
        return
    dims = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        d = vi.type.tensor_type.shape.dim
        dims[vi.name] = [x.dim_value if x.HasField("dim_value") else 0 for x in d]
    ix = _Index(qmodel.graph)
    nodes = {n.name: n for n in qmodel.graph.node}
    for layer in layers:
        n = nodes[layer.name]
        wdq = ix.dq_feeding(n, 1)
        w = ix.init.get(wdq.input[0]) if wdq is not None else None
        out = dims.get(n.output[0], [])
        if w is not None and len(out) == 4 and out[2] and out[3]:
            layer.macs = int(np.prod(w.dims)) * out[2] * out[3]


def _float_value(ix: _Index, dq, fp32_init: dict) -> np.ndarray:
    """The float tensor a weight/bias DequantizeLinear stands for: the FP32 model's, or the dequantized one."""
    from onnx import numpy_helper

    src = dq.input[0]
    name = src.removesuffix(QUANTIZED_SUFFIX)
    if name in fp32_init:
        return numpy_helper.to_array(fp32_init[name])
    q = numpy_helper.to_array(ix.init[src]).astype(np.float64)
    scale = numpy_helper.to_array(ix.init[dq.input[1]]).astype(np.float64)
    zp = numpy_helper.to_array(ix.init[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    shape = [1] * q.ndim
    if np.ndim(scale) and scale.size > 1:
        shape[axis] = -1
    return ((q - np.reshape(zp, shape if np.ndim(zp) else ())) * scale.reshape(shape)).astype(np.float32)


def bypass(qmodel, edges, fp32_model=None):
    """A copy of `qmodel` whose `edges` ((node name, input index)) read float instead of a DequantizeLinear."""
    from onnx import numpy_helper

    if fp32_model is not None and preparation_of(qmodel) != preparation_of(fp32_model):
        raise QbenchError(f"this INT8 model and the FP32 model were not prepared alike (recipe keys 'equalize' and "
                          f"'shift_negative' transform the float weights), so its layers can only fall back to the "
                          f"FP32 model it was quantized from: for a prepared one, the {PREPARED_FP32} written next "
                          f"to it.")
    m = copy.deepcopy(qmodel)
    g = m.graph
    ix = _Index(g)
    nodes = {n.name: n for n in g.node}
    fp32_init = {t.name: t for t in fp32_model.graph.initializer} if fp32_model is not None else {}
    made: dict[str, str] = {}
    for name, k in edges:
        node = nodes[name]
        dq = ix.dq_feeding(node, k)
        if dq is None:
            continue
        q = ix.producer.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            node.input[k] = q.input[0]
        elif dq.input[0] in ix.init:
            if dq.output[0] not in made:
                fname = dq.output[0] + "_float"
                g.initializer.append(numpy_helper.from_array(_float_value(ix, dq, fp32_init).astype(np.float32),
                                                             fname))
                made[dq.output[0]] = fname
            node.input[k] = made[dq.output[0]]
    _prune(g)
    return m


def _prune(graph) -> None:
    """Remove nodes whose outputs nobody reads (repeatedly), then unread initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [k for k, n in enumerate(graph.node) if not any(o in read for o in n.output if o)]
        if not dead:
            break
        for k in reversed(dead):
            del graph.node[k]
    read = {i for n in graph.node for i in n.input} | outputs
    keep = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def all_edges(qmodel) -> list[tuple[str, int]]:
    """Every (node, input index) of the graph that reads a DequantizeLinear output."""
    ix = _Index(qmodel.graph)
    return [(n.name, k) for n in qmodel.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            for k in range(len(n.input)) if n.input[k] and ix.dq_feeding(n, k) is not None]


def keep_float(qmodel, fp32_model, layers) -> object:
    """The INT8 model with `layers` (Layer objects or Conv names) in FP32, everything else unchanged."""
    by_name = {layer.name: layer for layer in conv_layers(qmodel)}
    edges = []
    for layer in layers:
        name = layer.name if isinstance(layer, Layer) else layer
        if name not in by_name:
            raise KeyError(f"{name} is not a quantized Conv of this model")
        edges += by_name[name].edges
    return bypass(qmodel, edges, fp32_model)


def quantize_only(qmodel, fp32_model, layer: Layer | str) -> object:
    """The FP32 model with only `layer`'s quantizers (its activation input, weight, bias, own requantization)."""
    by_name = {x.name: x for x in conv_layers(qmodel)}
    name = layer.name if isinstance(layer, Layer) else layer
    own = set(by_name[name].edges)
    return bypass(qmodel, [e for e in all_edges(qmodel) if e not in own], fp32_model)
