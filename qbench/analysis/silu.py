"""SiLU under INT8: what its three requantizations cost and whether fusing it into the Conv gives that back.

ultralytics exports SiLU as x * Sigmoid(x). ONNX Runtime's QDQ quantizer then quantizes three tensors per SiLU:
the Conv output x (before the Sigmoid and the Mul read it), the Sigmoid output (QLinearSigmoid: [0, 1] on 255
steps of 1/255, so small gates lose their relative precision), and the product (QLinearMul). An NPU that computes
Conv + SiLU in one kernel (a "fused" profile) quantizes only the product. `SiluError` measures, on the FP32 Conv
outputs of held-out images, the SQNR of the layer's output as the INT8 model computes it, with only its output
quantized (fused), and with a range fitted to the data (asymmetric, "ideal"), so the report can say what the
Sigmoid/Mul requantization costs per layer and what fusing measured. SiLU's output min is -0.278: a symmetric
int8 range reserves 128 codes for a tail that needs a few, as for LeakyReLU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..graph.qdq import QParams, fake_quant
from .leaky import FALLBACK_BELOW_DB, REMEDIES
from .stats import ErrorStats


@dataclass
class SiluLayer:
    node: str  # the Mul that makes the SiLU's output
    pre: str  # the tensor the SiLU reads (a Conv output in YOLO blocks)
    sig: str  # the Sigmoid's output
    post: str  # the SiLU's output
    pre_quantized: bool  # the QDQ model quantizes `pre` on its own (unfused)
    sig_quantized: bool  # ... and the Sigmoid output


def silus(fp32_model, acts: dict) -> list[SiluLayer]:
    """SiLU (Sigmoid + Mul reading the same tensor) of a float graph, in graph order, with what the QDQ model
    quantizes around each (`acts`: graph.qdq.activation_quantizers)."""
    producers = {o: n for n in fp32_model.graph.node for o in n.output}
    out = []
    for n in fp32_model.graph.node:
        if n.op_type != "Mul" or len(n.input) != 2:
            continue
        for a, b in (n.input, n.input[::-1]):
            p = producers.get(b)
            if p is not None and p.op_type == "Sigmoid" and p.input[0] == a:
                out.append(SiluLayer(n.name, a, b, n.output[0], a in acts, b in acts))
                break
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return (x / (np.float32(1) + np.exp(-x))).astype(np.float32)


class SiluError:
    """SQNR of one SiLU layer's output as deployed ("actual"), with only its output quantized ("fused", the NPU
    layout), and on an asymmetric range fitted to the observed output [lo, hi] ("ideal")."""

    def __init__(self, out_q: QParams, pre_q: QParams | None, sig_q: QParams | None, lo: float, hi: float):
        self.out_q, self.pre_q, self.sig_q = out_q, pre_q, sig_q
        self.ideal_q = QParams.from_range(lo, hi, "uint8")
        self.errors = {"actual": ErrorStats(), "fused": ErrorStats(), "ideal": ErrorStats()}
        self.unfused = pre_q is not None or sig_q is not None

    def update(self, pre: np.ndarray) -> None:
        """`pre`: the FP32 tensor the SiLU reads."""
        pre = np.asarray(pre, np.float32)
        ref = silu(pre)
        xq = fake_quant(pre, self.pre_q) if self.pre_q is not None else pre
        gate = (np.float32(1) / (np.float32(1) + np.exp(-xq))).astype(np.float32)
        if self.sig_q is not None:
            gate = fake_quant(gate, self.sig_q)
        self.errors["actual"].update(ref, fake_quant(xq * gate, self.out_q))
        self.errors["fused"].update(ref, fake_quant(ref, self.out_q))
        self.errors["ideal"].update(ref, fake_quant(ref, self.ideal_q))

    def result(self) -> dict:
        db = {k: e.sqnr_db for k, e in self.errors.items()}
        gain = db["fused"] - db["actual"]
        remedy = "fused" if self.unfused and gain > 0.05 else None
        if max(db["actual"], db["fused"] if remedy else db["actual"]) < FALLBACK_BELOW_DB:
            remedy = "fp32_fallback"
        return {"sqnr_db": {k: round(v, 3) for k, v in db.items()}, "harm_db": round(db["ideal"] - db["actual"], 3),
                "fused_gain_db": round(gain, 3) if self.unfused else 0.0, "remedy": remedy,
                "remedy_text": REMEDIES.get(remedy, "none needed").replace("LeakyReLU", "SiLU")}
