"""LeakyReLU under INT8: where the 256 codes go, what requantizing the Conv output costs, and what fixes it.

A LeakyReLU(0.1) output spans [0.1 * min(conv), max(conv)]: a short negative
tail beside a long positive range. Three things hurt it at 8 bits:

- code space: an asymmetric uint8 range [min, max] gives the tail
  round(|min| / scale) codes, and the positive range keeps the rest; a
  symmetric int8 range (NPUs with zero point 0) reserves 128 codes for the
  tail whatever it uses, so the positive range keeps 127 (one bit lost);
- requantization: ONNX Runtime (and NPUs that cannot fuse the activation)
  quantize the Conv output before the LeakyReLU, on a range whose negative
  side is 1/alpha = 10x longer, then quantize the LeakyReLU output again;
- outliers: a few large values stretch the range for everything else.

`code_budget()` counts codes and the bits lost against a ReLU-like range
[0, max] that would give all 256 codes to the positive side.
`LeakyError` measures, on FP32 activations, the SQNR of the layer's output as
the INT8 model quantizes it and under each remedy, so every remedy comes with
its measured effect.
"""

from __future__ import annotations

import math

import numpy as np

from ..graph.qdq import QParams, fake_quant
from .stats import ErrorStats

REMEDIES = {
    "fused": "fuse Conv+LeakyReLU (quantize only the activation's output)",
    "asymmetric": "asymmetric activation range (zero point free)",
    "shift_negative": "shift-negative correction: shift the output by its mid-range before a symmetric int8 "
                      "quantizer and fold the shift into the next layer's bias (recipe shift-negative)",
    "percentile": "percentile clipping of the range (99.99th)",
    "fp32_fallback": "keep this layer in FP32",
}
FALLBACK_BELOW_DB = 15.0  # recommend FP32 fallback when even the best 8-bit remedy leaves less SQNR than this


def code_budget(lo: float, hi: float, q: QParams) -> dict:
    """How quantizer `q` spends its codes on data spanning [lo, hi] (lo < 0 < hi for a LeakyReLU output)."""
    step = q.scale
    neg_reserved = q.zero_point - q.qmin
    pos_reserved = q.qmax - q.zero_point
    neg_used = min(neg_reserved, int(round(abs(min(lo, 0.0)) / step)))
    pos_used = min(pos_reserved, int(round(max(hi, 0.0) / step)))
    relu_step = max(hi, 0.0) / 255.0
    bits_lost = math.log2(step / relu_step) if relu_step > 0 else 0.0
    return {"scheme": f"{q.dtype} zp={q.zero_point}", "scale": step, "neg_codes": neg_reserved,
            "neg_codes_used": neg_used, "pos_codes": pos_reserved, "pos_codes_used": pos_used,
            "bits_lost_vs_relu": bits_lost}


def leaky(x: np.ndarray, alpha: float) -> np.ndarray:
    return np.where(x >= 0, x, np.float32(alpha) * x).astype(np.float32)


class LeakyError:
    """SQNR of one LeakyReLU layer's output as deployed and under each remedy, accumulated over images.

    actual: `out_q` on the output, and `pre_q` on the Conv output when the model quantizes it (unfused).
    `lo, hi` (`pre_lo, pre_hi`) are the observed min/max of the output (the Conv output), `p_lo, p_hi` the
    output's 0.01th/99.99th percentiles. Remedies keep the model's own calibrated range where they do not change
    it: an asymmetric model's range is [out_q.lo, out_q.hi]; a symmetric one's is [-T, T], narrowed to the
    observed data for the asymmetric and shift-negative variants. "ideal" is the best 8 bits can do without
    clipping: fused and asymmetric on that range.
    """

    def __init__(self, alpha: float, out_q: QParams, pre_q: QParams | None, lo: float, hi: float,
                 pre_lo: float, pre_hi: float, p_lo: float, p_hi: float):
        self.alpha = alpha
        self.symmetric = out_q.dtype == "int8" and out_q.zero_point == 0
        dtype = out_q.dtype

        def span(q: QParams, obs_lo: float, obs_hi: float) -> tuple[float, float]:
            return (max(q.lo, obs_lo), min(q.hi, obs_hi)) if self.symmetric else (q.lo, q.hi)

        out_lo, out_hi = span(out_q, lo, hi)
        asym_out = QParams.from_range(out_lo, out_hi, "uint8")
        asym_pre = QParams.from_range(*span(pre_q, pre_lo, pre_hi), "uint8") if pre_q is not None else None
        self.variants: dict[str, tuple[QParams | None, QParams, float]] = {"actual": (pre_q, out_q, 0.0)}
        if pre_q is not None:
            self.variants["fused"] = (None, out_q, 0.0)
        if self.symmetric:
            self.variants["asymmetric"] = (asym_pre, asym_out, 0.0)
            shift = 0.5 * (out_lo + out_hi)
            self.variants["shift_negative"] = (pre_q, QParams.from_range(out_lo - shift, out_hi - shift, dtype,
                                                                         symmetric=True), shift)
        self.variants["percentile"] = (pre_q, QParams.from_range(p_lo, p_hi, dtype, symmetric=self.symmetric), 0.0)
        self.variants["ideal"] = (None, asym_out, 0.0)
        self.errors = {k: ErrorStats() for k in self.variants}

    def update(self, pre: np.ndarray) -> None:
        """`pre`: the FP32 Conv output feeding the LeakyReLU."""
        ref = leaky(pre, self.alpha)
        for k, (pq, oq, shift) in self.variants.items():
            x = leaky(fake_quant(pre, pq), self.alpha) if pq is not None else ref
            y = fake_quant(x - np.float32(shift), oq) + np.float32(shift) if shift else fake_quant(x, oq)
            self.errors[k].update(ref, y)

    def result(self) -> dict:
        db = {k: e.sqnr_db for k, e in self.errors.items()}
        actual = db["actual"]
        gains = {k: db[k] - actual for k in db if k not in ("actual", "ideal")}
        applicable = [k for k in gains if not (self.symmetric and k == "asymmetric")]  # the NPU cannot do it
        best = max(applicable, key=gains.get) if applicable else None
        best_db = db[best] if best else actual
        if best is None or gains[best] <= 0.05:
            best = None
        remedy = best
        if max(actual, best_db) < FALLBACK_BELOW_DB:  # no 8-bit variant is good enough: keep it float
            remedy = "fp32_fallback"
            gains["fp32_fallback"] = math.inf
        return {"sqnr_db": {k: round(v, 3) for k, v in db.items()},
                "remedy_gain_db": {k: round(v, 3) for k, v in gains.items()},
                "harm_db": round(db["ideal"] - actual, 3),
                "remedy": remedy, "remedy_text": REMEDIES.get(remedy, "none needed")}
