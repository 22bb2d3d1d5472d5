"""Consumer-aware, error-minimising activation ranges (recipe `method: mse`).

Min/max gives each tensor the range of every value it ever took, so one rare value, or a negative tail that the
next op shrinks away, sets the step of all the others. Here each tensor's range [lo, hi] is the one that minimises
the expected squared error **after the op that consumes it**, over the calibration images' histogram of the tensor:

    E(lo, hi) = sum over values x of  n(x) * ( f(x) - f(clip(x, lo, hi)) )**2         (clipping)
              + step**2 / 12 * sum over x in [lo, hi] of  n(x) * f'(x)**2             (rounding)

with step = (hi - lo) / levels and f the consumer:
- LeakyRelu(alpha): the negative side's error is multiplied by alpha (0.1: by 1/100 in squared error), so a Conv
  output's negative tail can be clipped far harder than its positive side;
- Relu: the negative side costs nothing (the range starts at 0);
- SiLU (x -> Sigmoid(x) * x, as YOLO exports it): f'(x) = s(x) * (1 + x * (1 - s(x))), small for x < -2;
- anything else (a Conv, Add, Concat, several consumers): f(x) = x, plain MSE.

The candidates are lo in {min * k/K} (k = 0..K, so 0 when min < 0) and hi in {max * k/K} (k = 1..K); symmetric
activations search one threshold T (range [-T, T]). Cumulative sums make the search O(K^2) per tensor after one
pass over its bins. The histograms are ORT's "distribution" histograms (signed values, `num_bins` bins over
[-max|x|, max|x|]), seeded with each tensor's min/max so every chunk of images falls into the same bins
(ort_engine._seed_histograms).
"""

from __future__ import annotations

import numpy as np

CANDIDATES = 128  # K: candidate ends per side


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def consumer_functions(model) -> dict[str, tuple]:
    """tensor name -> ('leaky', alpha) | ('relu',) | ('silu',) | ('identity',), from the ops that read it."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
    kinds = {}
    for name, nodes in consumers.items():
        ops = sorted(n.op_type for n in nodes)
        if all(o == "LeakyRelu" for o in ops):
            alphas = {next((a.f for a in n.attribute if a.name == "alpha"), 0.01) for n in nodes}
            kinds[name] = ("leaky", alphas.pop()) if len(alphas) == 1 else ("identity",)
        elif all(o == "Relu" for o in ops):
            kinds[name] = ("relu",)
        elif ops == ["Mul", "Sigmoid"]:
            sig = next(n for n in nodes if n.op_type == "Sigmoid")
            mul = next(n for n in nodes if n.op_type == "Mul")
            kinds[name] = ("silu",) if sorted(mul.input) == sorted([name, sig.output[0]]) else ("identity",)
        else:
            kinds[name] = ("identity",)
    return kinds


def _function(kind: tuple):
    """(f, f') of a consumer kind, vectorised over float64 arrays."""
    if kind[0] in ("leaky", "relu"):
        a = kind[1] if kind[0] == "leaky" else 0.0
        return (lambda x: np.where(x < 0, a * x, x)), (lambda x: np.where(x < 0, a, 1.0))
    if kind[0] == "silu":
        return (lambda x: x * _sigmoid(x)), (lambda x: _sigmoid(x) * (1.0 + x * (1.0 - _sigmoid(x))))
    return (lambda x: x), (lambda x: np.ones_like(x))


def best_range(hist, edges, lo_obs: float, hi_obs: float, kind: tuple = ("identity",), symmetric: bool = False,
               levels: int = 255, candidates: int = CANDIDATES) -> tuple[float, float]:
    """The [lo, hi] within [lo_obs, hi_obs] (0 always inside) that minimises E(lo, hi) above for this histogram."""
    n = np.asarray(hist, np.float64)
    e = np.asarray(edges, np.float64)
    lo_obs, hi_obs = min(float(lo_obs), 0.0), max(float(hi_obs), 0.0)
    if n.sum() == 0 or hi_obs - lo_obs <= 0:
        return lo_obs, hi_obs
    keep = n > 0
    c, n = ((e[:-1] + e[1:]) / 2)[keep], n[keep]
    f, df = _function(kind)
    fc, w = f(c), n * df(c) ** 2
    cum_w = np.concatenate([[0.0], np.cumsum(w)])
    frac = np.arange(1, candidates + 1) / candidates
    if symmetric:
        t = max(-lo_obs, hi_obs) * frac
        los, his = -t, t
    else:
        los = lo_obs * np.concatenate([[0.0], frac])  # 0 .. min
        his = hi_obs * frac
    # clipping error of each candidate end (only values beyond it), K x bins at most
    clip_lo = ((c[None, :] < los[:, None]) * n * (fc[None, :] - f(los)[:, None]) ** 2).sum(1)
    clip_hi = ((c[None, :] > his[:, None]) * n * (fc[None, :] - f(his)[:, None]) ** 2).sum(1)
    i_lo = np.searchsorted(c, los, side="left")
    i_hi = np.searchsorted(c, his, side="right")
    if symmetric:
        step = (his - los) / levels
        err = clip_lo + clip_hi + step ** 2 / 12 * (cum_w[i_hi] - cum_w[i_lo])
        k = int(np.argmin(err))
        return float(los[k]), float(his[k])
    step = (his[None, :] - los[:, None]) / levels
    inside = np.maximum(cum_w[i_hi][None, :] - cum_w[i_lo][:, None], 0.0)
    err = clip_lo[:, None] + clip_hi[None, :] + step ** 2 / 12 * inside
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    return float(los[i]), float(his[j])


def mse_ranges(histograms: dict, kinds: dict[str, tuple], symmetric: bool, levels: int) -> tuple[dict, dict]:
    """{tensor: (lo, hi)} from ORT's collect_value histograms {tensor: (hist, edges, min, max, threshold)}, and a
    summary (tensors per consumer kind, how many ends moved inside the observed range)."""
    out, summary = {}, {"tensors": 0, "by_consumer": {}, "low_end_clipped": 0, "high_end_clipped": 0}
    for name, h in histograms.items():
        hist, edges, mn, mx = h[0], h[1], float(h[2]), float(h[3])
        kind = kinds.get(name, ("identity",))
        lo, hi = best_range(hist, edges, mn, mx, kind, symmetric=symmetric, levels=levels)
        out[name] = (lo, hi)
        summary["tensors"] += 1
        summary["by_consumer"][kind[0]] = summary["by_consumer"].get(kind[0], 0) + 1
        summary["low_end_clipped"] += int(mn < 0 and lo > mn * (1 - 1e-6))
        summary["high_end_clipped"] += int(mx > 0 and hi < mx * (1 - 1e-6))
    return out, summary
