"""What a QDQ model quantizes, read from its graph, and the quantization arithmetic it implies.

ONNX Runtime's QDQ format marks every quantized activation tensor T with a
QuantizeLinear (T, scale, zero_point) whose output feeds one or more
DequantizeLinear nodes; weights are int8 initializers behind a
DequantizeLinear. `activation_quantizers()` lists the former with their
per-tensor `QParams`, `weight_quantizers()` the latter, `leaky_relus()` the
LeakyRelu nodes of a float graph with, from the QDQ model, whether the Conv
output before each is quantized on its own ("unfused") or not ("fused"), and
`activation_census()` counts a float graph's activations (SiLU as Sigmoid*Mul).
`QParams` is a per-tensor affine quantizer; `fake_quant` applies it exactly as
ONNX Runtime's QuantizeLinear -> DequantizeLinear does (round half to even,
saturate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

INT_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}


@dataclass(frozen=True)
class QParams:
    """Per-tensor affine quantization: q = saturate(rint(x / scale) + zero_point) in [qmin, qmax]."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @property
    def dtype(self) -> str:
        return "uint8" if self.qmin == 0 else "int8"

    @property
    def lo(self) -> float:
        """Smallest representable value."""
        return (self.qmin - self.zero_point) * self.scale

    @property
    def hi(self) -> float:
        """Largest representable value."""
        return (self.qmax - self.zero_point) * self.scale

    @classmethod
    def from_range(cls, lo: float, hi: float, dtype: str = "uint8", symmetric: bool = False) -> "QParams":
        """The quantizer ONNX Runtime derives from a calibrated range (zero always representable)."""
        qmin, qmax = INT_RANGES[dtype]
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        if symmetric:
            t = max(abs(lo), abs(hi))
            span = 254 if dtype == "int8" else 255  # ORT scales symmetric int8 on [-127, 127]; -128 only saturates
            scale = (2 * t) / span if t > 0 else 1.0
            zp = (qmax + qmin + 1) // 2 if dtype == "uint8" else 0
            return cls(scale, int(zp), qmin, qmax)
        scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
        zp = int(round(qmin - lo / scale))
        return cls(scale, max(qmin, min(qmax, zp)), qmin, qmax)


def fake_quant(x: np.ndarray, q: QParams) -> np.ndarray:
    """QuantizeLinear then DequantizeLinear, as ONNX Runtime computes them (float32)."""
    scale = np.float32(q.scale)
    y = np.rint(x / scale) + np.float32(q.zero_point)
    np.clip(y, q.qmin, q.qmax, out=y)
    y -= np.float32(q.zero_point)
    y *= scale
    return y


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """10 log10(signal / noise); inf when there is no noise."""
    if noise_power <= 0:
        return math.inf
    if signal_power <= 0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


GRAPH_OUTPUT_SUFFIX = "_QuantizeLinear_Input"  # ORT's name for the float tensor of a quantized graph output


@dataclass
class ActQuant:
    """One quantized activation tensor of a QDQ model."""

    tensor: str  # the float tensor that is quantized (same name in the FP32 model)
    qparams: QParams
    dequantized: str  # a DequantizeLinear output carrying the quantized values
    producer: str  # op type that makes the tensor ('input' for a graph input)
    producer_node: str
    consumers: list[str] = field(default_factory=list)  # op types reading the dequantized tensor


@dataclass
class WeightQuant:
    """One quantized weight initializer (per-channel or per-tensor) and the node that reads it."""

    name: str  # the float initializer's name in the FP32 model (ORT stores it as <name>_quantized)
    node: str
    op_type: str
    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    def dequantized(self) -> np.ndarray:
        shape = [1] * self.q.ndim
        if self.scale.size > 1:
            shape[self.axis] = -1
        s = self.scale.reshape(shape).astype(np.float32)
        zp = self.zero_point.reshape(shape).astype(np.float32)
        return (self.q.astype(np.float32) - zp) * s


def _initializers(graph) -> dict:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def activation_quantizers(qmodel) -> dict[str, ActQuant]:
    """{float tensor name: ActQuant} for every per-tensor quantized activation of a QDQ model, in graph order."""
    g = qmodel.graph
    init = _initializers(g)
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_inputs = {i.name for i in g.input}
    out = {}
    for n in g.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in init:
            continue
        t = n.input[0]
        scale = np.asarray(init[n.input[1]], np.float32)
        zp_arr = init.get(n.input[2]) if len(n.input) > 2 else None
        if scale.size != 1:
            continue  # per-channel activations: not produced by ORT's static quantizer
        dtype = "int8" if zp_arr is not None and zp_arr.dtype == np.int8 else "uint8"
        if zp_arr is not None and zp_arr.dtype not in (np.int8, np.uint8):
            continue  # 16-bit or other types: not analysed
        zp = int(np.asarray(zp_arr).reshape(-1)[0]) if zp_arr is not None else 0
        qmin, qmax = INT_RANGES[dtype]
        dqs = [c for c in consumers.get(n.output[0], []) if c.op_type == "DequantizeLinear"]
        if not dqs:
            continue
        p = producers.get(t)
        readers = [c.op_type for dq in dqs for c in consumers.get(dq.output[0], [])]
        if t.endswith(GRAPH_OUTPUT_SUFFIX) and dqs[0].output[0] == t[: -len(GRAPH_OUTPUT_SUFFIX)]:
            t = dqs[0].output[0]  # a quantized graph output: ORT renamed the float tensor, the DQ took its name
        out[t] = ActQuant(t, QParams(float(scale.reshape(-1)[0]), zp, qmin, qmax), dqs[0].output[0],
                          "input" if t in graph_inputs else (p.op_type if p is not None else "?"),
                          p.name if p is not None else t, readers)
    return out


def weight_quantizers(qmodel) -> dict[str, WeightQuant]:
    """{node name: WeightQuant} for nodes (Conv, Gemm, MatMul) whose weight input is a dequantized initializer."""
    g = qmodel.graph
    init = _initializers(g)
    dq_of = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in init}
    out = {}
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2 or n.input[1] not in dq_of:
            continue
        dq = dq_of[n.input[1]]
        q = init[dq.input[0]]
        if q.dtype not in (np.int8, np.uint8):
            continue
        scale = np.asarray(init[dq.input[1]], np.float32)
        zp = np.asarray(init[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in init else np.zeros_like(scale)
        name = dq.input[0][: -len("_quantized")] if dq.input[0].endswith("_quantized") else dq.input[0]
        out[n.name] = WeightQuant(name, n.name, n.op_type, q, scale, zp, int(_attr(dq, "axis", 1)))
    return out


def quantize_nodes(path) -> int:
    """How many QuantizeLinear/DequantizeLinear/QLinear*/ConvInteger nodes an ONNX file holds (0: a float model);
    reads the graph only, not external weight data."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear", "ConvInteger", "MatMulInteger")
               or n.op_type.startswith("QLinear") for n in g.node)


ACTIVATION_OPS = ("LeakyRelu", "Relu", "PRelu", "HardSwish", "Clip", "Sigmoid", "Softmax")


def activation_census(model) -> dict[str, int]:
    """{activation: count} of a float graph: SiLU (a Sigmoid whose output a Mul multiplies by the Sigmoid's own
    input) counted as such, the others by op type."""
    producers = {o: n for n in model.graph.node for o in n.output}
    silu = 0
    for n in model.graph.node:
        if n.op_type == "Mul" and any(producers.get(b) is not None and producers[b].op_type == "Sigmoid"
                                      and producers[b].input[0] == a for a, b in (n.input, n.input[::-1])):
            silu += 1
    counts = {op: sum(n.op_type == op for n in model.graph.node) for op in ACTIVATION_OPS}
    counts["Sigmoid"] -= silu
    return {k: v for k, v in {"SiLU": silu, **counts}.items() if v > 0}


def census_text(census: dict[str, int]) -> str:
    """'SiLU x57, Softmax x1' (or 'no activations')."""
    return ", ".join(f"{k} x{v}" for k, v in census.items()) or "no activations"


@dataclass
class LeakyLayer:
    node: str
    alpha: float
    pre: str  # the tensor the LeakyRelu reads (a Conv output in YOLO blocks)
    post: str  # its output
    pre_op: str  # op type producing `pre`
    unfused: bool  # the QDQ model quantizes `pre` on its own before the LeakyRelu


def leaky_relus(fp32_model, acts: dict[str, ActQuant]) -> list[LeakyLayer]:
    """LeakyRelu nodes of the float graph, in graph order, with their fusion state in the QDQ model."""
    producers = {o: n for n in fp32_model.graph.node for o in n.output}
    out = []
    for n in fp32_model.graph.node:
        if n.op_type != "LeakyRelu":
            continue
        p = producers.get(n.input[0])
        out.append(LeakyLayer(n.name, float(_attr(n, "alpha", 0.01)), n.input[0], n.output[0],
                              p.op_type if p is not None else "input", n.input[0] in acts))
    return out


def tensor_order(model) -> dict[str, int]:
    """Tensor name -> position of its producer in the (topologically sorted) graph; graph inputs first."""
    order = {i.name: -1 for i in model.graph.input}
    for k, n in enumerate(model.graph.node):
        for o in n.output:
            order[o] = k
    return order
