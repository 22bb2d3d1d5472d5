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
from .constraints import ACTIVATIONS, pow2_ceil

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


# --------------------------------------------------------------------------- INT16 instead of FP32
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's Q/DQ with 16-bit types below opset 21


def _int16_grid(scale: np.ndarray, zp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 16-bit scale and zero point spanning the same real range as an 8-bit (scale, zero point): a symmetric
    int8 grid (zero point 0) stays symmetric with 256x finer steps (scale / 256, so a power-of-two scale stays one);
    an asymmetric one maps 0..255 onto 0..65535 (scale / 257, zero point x 257, as uint16 or int16)."""
    scale = np.asarray(scale, np.float32)
    if zp.dtype == np.int8 and not np.any(zp):
        return (scale / 256).astype(np.float32), np.zeros(zp.shape, np.int16)
    if zp.dtype == np.uint8:
        return (scale / 257).astype(np.float32), (zp.astype(np.int64) * 257).astype(np.uint16)
    return (scale / 257).astype(np.float32), (zp.astype(np.int64) * 257 + 128).astype(np.int16)


def _int16_range_grid(lo: float, hi: float, zp8: np.ndarray, scale8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 16-bit scale and zero point for a tensor's calibrated [lo, hi], the int8 grid's kind kept: symmetric
    int16 for a symmetric int8 tensor (a power of two where its int8 scale is one), uint16 for uint8, int16 with a
    zero point otherwise. The range always holds 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if zp8.dtype == np.int8 and not np.any(zp8):
        s = np.float32(max(abs(lo), abs(hi), 1e-12) / 32767)
        s8 = float(np.asarray(scale8).ravel()[0])
        if s8 > 0 and np.log2(s8) == np.round(np.log2(s8)):
            s = pow2_ceil(np.array(s))[()]
        return np.array(s, np.float32), np.zeros(zp8.shape, np.int16)
    s = np.float32(max(hi - lo, 1e-12) / 65535)
    if zp8.dtype == np.uint8:
        return np.array(s, np.float32), np.array(np.clip(np.round(-lo / s), 0, 65535), np.uint16).reshape(zp8.shape)
    return np.array(s, np.float32), np.array(np.clip(np.round(-32768 - lo / s), -32768, 32767),
                                             np.int16).reshape(zp8.shape)


def int16_activation_tensors(qmodel, layers) -> list[str]:
    """The float tensors whose Q/DQ `keep_int16` replaces for `layers` (names as in the FP32 graph)."""
    by_name = {layer.name: layer for layer in conv_layers(qmodel)}
    ix = _Index(qmodel.graph)
    nodes = {n.name: n for n in qmodel.graph.node}
    out = []
    for layer in layers:
        for name, k in by_name[layer.name if isinstance(layer, Layer) else layer].edges:
            dq = ix.dq_feeding(nodes[name], k)
            q = ix.producer.get(dq.input[0]) if dq is not None else None
            if q is not None and q.op_type == "QuantizeLinear":
                out.append(q.input[0])
    return list(dict.fromkeys(out))


def keep_int16(qmodel, fp32_model, layers, ranges: dict | None = None) -> object:
    """The INT8 model with `layers` (Layer objects or Conv names) in INT16, everything else unchanged.

    Each edge that quantizes such a layer reads a 16-bit Q/DQ instead: its activation input and its own output
    requantization on the tensor's calibrated [min, max] from `ranges` ({tensor: (lo, hi)}; `_int16_range_grid`:
    16 bits need no clipping), or without `ranges` on the int8 grid's range with finer steps (`_int16_grid`), its weight symmetric per output
    channel (max |w| / 32767, rounded up to a power of two where the int8 weight scales are), its bias
    in int32 on a scale of its own (max |b| / 2^30, as exact as float: at the 16-bit input x weight scale an int32
    bias can overflow, and ONNX Runtime's bias-quantization transformer would put a float bias on that scale).
    ONNX Runtime runs these Q/DQ pairs (com.microsoft domain) and the Conv in float: a simulation of the NPU's
    int16 arithmetic, not its kernel."""
    from onnx import helper, numpy_helper

    if fp32_model is not None and preparation_of(qmodel) != preparation_of(fp32_model):
        return bypass(qmodel, [], fp32_model)  # raises the same refusal as keep_float
    by_name = {layer.name: layer for layer in conv_layers(qmodel)}
    edges = []
    for layer in layers:
        name = layer.name if isinstance(layer, Layer) else layer
        if name not in by_name:
            raise KeyError(f"{name} is not a quantized Conv of this model")
        edges += by_name[name].edges
    m = copy.deepcopy(qmodel)
    g = m.graph
    ix = _Index(g)
    nodes = {n.name: n for n in g.node}
    fp32_init = {t.name: t for t in fp32_model.graph.initializer} if fp32_model is not None else {}
    made: dict[str, str] = {}
    new_nodes, new_inits = [], []

    def arr(name):
        return numpy_helper.to_array(ix.init[name])

    for name, k in edges:
        node = nodes[name]
        dq = ix.dq_feeding(node, k)
        if dq is None:
            continue
        if dq.output[0] in made:
            node.input[k] = made[dq.output[0]]
            continue
        q = ix.producer.get(dq.input[0])
        out = dq.output[0] + "_int16"
        if q is not None and q.op_type == "QuantizeLinear":  # an activation: same range, 16-bit grid
            zp8 = arr(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
            if ranges is not None and q.input[0] in ranges:
                s16, z16 = _int16_range_grid(*ranges[q.input[0]], zp8, arr(q.input[1]))
            else:
                s16, z16 = _int16_grid(arr(q.input[1]), zp8)
            new_inits += [numpy_helper.from_array(s16, out + "_scale"), numpy_helper.from_array(z16, out + "_zp")]
            new_nodes += [helper.make_node("QuantizeLinear", [q.input[0], out + "_scale", out + "_zp"], [out + "_q"],
                                           out + "_Q", domain=MS_DOMAIN),
                          helper.make_node("DequantizeLinear", [out + "_q", out + "_scale", out + "_zp"], [out],
                                           out + "_DQ", domain=MS_DOMAIN)]
        elif dq.input[0] in ix.init and node.op_type == "Conv" and k == 1:  # a weight: int16 per output channel
            w = _float_value(ix, dq, fp32_init).astype(np.float64)
            amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
            s16 = np.where(amax > 0, amax / 32767.0, 1.0).astype(np.float32)
            s8 = arr(dq.input[1])
            if np.all(s8 > 0) and np.all(np.log2(s8) == np.round(np.log2(s8))):  # a power-of-two target
                s16 = pow2_ceil(s16).astype(np.float32)
            wq = np.clip(np.round(w / s16.reshape(-1, *[1] * (w.ndim - 1))), -32767, 32767).astype(np.int16)
            new_inits += [numpy_helper.from_array(wq, out + "_w"), numpy_helper.from_array(s16, out + "_scale"),
                          numpy_helper.from_array(np.zeros(s16.shape, np.int16), out + "_zp")]
            new_nodes.append(helper.make_node("DequantizeLinear", [out + "_w", out + "_scale", out + "_zp"], [out],
                                              out + "_DQ", domain=MS_DOMAIN, axis=0))
        elif dq.input[0] in ix.init:  # a bias: int32 on its own fine grid (see the docstring)
            b = _float_value(ix, dq, fp32_init).astype(np.float64)
            bs = np.float32(max(float(np.abs(b).max()), 1e-30) / 2 ** 30)
            new_inits += [numpy_helper.from_array(np.round(b / bs).astype(np.int32), out + "_b"),
                          numpy_helper.from_array(np.array(bs, np.float32), out + "_scale")]
            new_nodes.append(helper.make_node("DequantizeLinear", [out + "_b", out + "_scale"], [out], out + "_DQ"))
        else:
            continue
        made[dq.output[0]] = out
        node.input[k] = out
    g.initializer.extend(new_inits)
    # a new Q/DQ goes right before the first node that reads it (topological order holds: its input is produced
    # earlier, since the int8 Q/DQ it replaces read the same tensor)
    first_reader = {}
    for i, n in enumerate(g.node):
        for t in n.input:
            first_reader.setdefault(t, i)
    by_out = {n.output[0]: n for n in new_nodes}
    ordered = list(g.node)
    inserts = sorted(((first_reader[t], t) for t in made.values() if t in by_out), reverse=True)
    for i, t in inserts:
        dq_node = by_out[t]
        chain = [by_out[dq_node.input[0]], dq_node] if dq_node.input[0] in by_out else [dq_node]
        ordered[i:i] = chain
    del g.node[:]
    g.node.extend(ordered)
    if not any(o.domain == MS_DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _prune(g)
    return m
