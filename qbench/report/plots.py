"""Charts for the report, drawn with matplotlib (Agg, its bundled DejaVu font: nothing is downloaded).

Each function takes the JSON a run wrote (one entry per run, for side-by-side
reports) and returns PNG bytes, or None when there is nothing to draw.
"""

from __future__ import annotations

import io
import math

import numpy as np

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _palette(n: int) -> list:
    """n colours: COLORS, or matplotlib's tab20 cycled when there are more series than that."""
    return list(COLORS[:n]) if n <= len(COLORS) else [_plt().cm.tab20(i % 20) for i in range(n)]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _num(v) -> float:
    if isinstance(v, str):
        return {"inf": math.inf, "-inf": -math.inf}.get(v, math.nan)
    return float(v) if v is not None and v != "" else math.nan


def sqnr_along_depth(runs: dict[str, dict]) -> bytes | None:
    """Per quantized tensor, in graph order: isolated (dashed) and cumulative (solid) SQNR, one colour a run;
    activation outputs (LeakyReLU, SiLU) marked."""
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        return None
    marks = {k: _activation_outputs(v)[0] for k, v in runs.items()}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 4.2))
    few = len(runs) <= 2  # with more series, only the cumulative curves (one per run or variant)
    palette = _palette(len(runs))
    for (name, ins), color in zip(runs.items(), palette):
        rows = [r for r in ins["layers"] if r["role"] == "quantized" and r["producer"] != "input"]
        x = np.array([r["depth"] for r in rows])  # the producer's position in the FP32 graph: aligns variants
        cum = np.array([min(_num(r["sqnr_cumulative_db"]), 80.0) for r in rows])
        iso = np.array([min(_num(r["sqnr_isolated_db"]), 80.0) for r in rows])
        ax.plot(x, cum, "-", color=color, lw=1.6 if few else 1.2, label=f"{name}: cumulative" +
                (" (INT8 graph up to here)" if few else ""))
        if few:
            ax.plot(x, iso, "--", color=color, lw=1.0, alpha=0.8, label=f"{name}: isolated (this tensor alone)")
        act = [i for i, r in enumerate(rows) if r["tensor"] in marks.get(name, ())]
        if act:
            ax.plot(x[act], cum[act], "o", ms=3, color=color)
    kinds = sorted({k for v in runs.values() for k in _activation_outputs(v)[1]})
    ax.set_xlabel("depth: position of the tensor's producer in the FP32 graph (input → head)"
                  + (f"; dots: {' and '.join(kinds)} outputs" if kinds else ""))
    ax.set_ylabel("SQNR (dB), higher is better")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Per-layer quantization error along network depth")
    return _png(fig)


def _activation_outputs(ins: dict) -> tuple[set, list[str]]:
    """The output tensors of an inspection's LeakyReLU and SiLU layers, and which of the two it has."""
    leaky = {r["node"] for r in ins.get("leaky", [])}
    outs = {r["tensor"] for r in ins.get("layers", []) if r["producer"] == "LeakyRelu" and leaky}
    silu_layers = {r["layer"] for r in ins.get("silu", [])}
    outs |= {r["tensor"] for r in ins.get("layers", []) if r["producer"] == "Mul" and r["layer"] in silu_layers}
    return outs, [k for k, rows in (("LeakyReLU", ins.get("leaky")), ("SiLU", ins.get("silu"))) if rows]


def worst_histograms(ins: dict, hists: dict, k: int = 6) -> bytes | None:
    """Histograms (log counts) of the k tensors with the lowest isolated SQNR, with the INT8 range and zero."""
    rows = sorted((r for r in ins["layers"] if r["role"] == "quantized" and r["producer"] != "input"),
                  key=lambda r: _num(r["sqnr_isolated_db"]))[:k]
    rows = [r for r in rows if r["tensor"] in hists]
    if not rows:
        return None
    plt = _plt()
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(rows) / cols), cols, figsize=(12, 3.0 * math.ceil(len(rows) / cols)),
                             squeeze=False)
    for ax, r in zip(axes.ravel(), rows):
        h = hists[r["tensor"]]
        counts = np.asarray(h["counts"], np.float64)
        nz = np.nonzero(counts)[0]
        lo_i, hi_i = (nz[0], nz[-1] + 1) if nz.size else (0, counts.size)
        edges = h["lo"] + h["width"] * np.arange(lo_i, hi_i + 1)
        ax.stairs(counts[lo_i:hi_i], edges, fill=True, color="#7f9fbf")
        ax.set_yscale("log")
        ax.axvline(_num(r["q_lo"]), color="#d62728", lw=1, ls="--")
        ax.axvline(_num(r["q_hi"]), color="#d62728", lw=1, ls="--", label="INT8 range")
        ax.axvline(0, color="k", lw=0.6)
        ax.set_title(f"{r['layer']} ({r['producer']})\nSQNR {_num(r['sqnr_isolated_db']):.1f} dB, "
                     f"neg {100 * _num(r['negative_fraction']):.0f}%, clip {100 * _num(r['clip_fraction']):.3f}%",
                     fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(rows):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7)
    fig.suptitle("Activation histograms of the worst layers (dashed: the calibrated INT8 range)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def leaky_harm(runs: dict[str, dict], top: int = 20, kind: str = "leaky") -> bytes | None:
    """Harm (dB lost against a fused asymmetric 8-bit activation) of the most harmed layers, per run; `kind`:
    "leaky" (LeakyReLU) or "silu"."""
    label = {"leaky": "LeakyReLU", "silu": "SiLU"}[kind]
    runs = {k: v for k, v in runs.items() if v and v.get(kind)}
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 0.28 * top + 1.2), squeeze=False)
    for ax, ((name, ins), color) in zip(axes.ravel(), zip(runs.items(), _palette(len(runs)))):
        rows = ins[kind][:top][::-1]
        ax.barh([r["layer"] for r in rows], [_num(r["harm_db"]) for r in rows], color=color)
        ax.set_xlabel("harm (dB below fused asymmetric)")
        ax.set_title(f"{name}: {label} layers ranked by harm", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def delta_bars(rows: list[tuple[str, str, float]]) -> bytes | None:
    """Grouped bars of the mAP50-95 change against FP32: rows of (run, model variant, delta), labelled."""
    if not rows:
        return None
    plt = _plt()
    runs = list(dict.fromkeys(r[0] for r in rows))
    variants = list(dict.fromkeys(r[1] for r in rows))
    val = {(r[0], r[1]): r[2] for r in rows}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(variants) * len(runs) + 2), 3.6))
    w = 0.8 / len(runs)
    x = np.arange(len(variants))
    for i, (run, color) in enumerate(zip(runs, _palette(len(runs)))):
        ys = np.array([val.get((run, v), np.nan) for v in variants])
        bars = ax.bar(x + i * w - 0.4 + w / 2, ys, w, label=run, color=color)
        ax.bar_label(bars, labels=[("" if np.isnan(y) else f"{y:+.4f}") for y in ys], fontsize=7, padding=2)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, variants, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("Δ mAP50-95 vs FP32")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Accuracy change of each INT8 variant against FP32")
    return _png(fig)


def sensitivity_bars(sens: dict, top: int = 20) -> bytes | None:
    """Layers ranked by proxy recovery (dB gained with the layer alone in FP32), with the mAP recovery measured for
    the top-K on a second axis."""
    rows = (sens or {}).get("layers", [])[:top]
    if not rows:
        return None
    plt = _plt()
    rows = rows[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.4))
    y = list(range(len(rows)))
    ax.barh([v - 0.2 for v in y], [_num(r["proxy_recovery_db"]) for r in rows], height=0.4, color=COLORS[0],
            label="proxy: output error recovered (dB)")
    ax.set_yticks(y, [r["module"] for r in rows])
    ax.tick_params(labelsize=7)
    ax.set_xlabel("proxy recovery (dB)")
    ax.grid(axis="x", alpha=0.3)
    measured = [(v, r) for v, r in zip(y, rows) if r.get("map_recovery") is not None]
    if measured:
        ax2 = ax.twiny()
        ax2.barh([v + 0.2 for v, _ in measured], [100 * r["map_recovery"] for _, r in measured], height=0.4,
                 color=COLORS[1], label="measured: mAP50-95 recovered (points)")
        ax2.set_xlabel("mAP50-95 recovery (points)")
        ax2.axvline(0, color="grey", lw=0.5)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower right")
    ax.set_title("Layer sensitivity: recovery of keeping one layer in FP32", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def qat_curves(runs: dict[str, dict]) -> bytes | None:
    """ultralytics' validation mAP50-95 of the fake-quant EMA after each QAT epoch, one line a run; the FP32 and
    PTQ scores of the qbench evaluation as dotted levels (one pair per distinct baseline)."""
    runs = {k: v for k, v in runs.items() if v and v.get("train_results")}
    if not runs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    palette = _palette(len(runs))
    levels = {}
    for (name, q), color in zip(runs.items(), palette):
        rows = q["train_results"]
        ax.plot([r["epoch"] for r in rows], [r.get("metrics/mAP50-95(B)", np.nan) for r in rows], "o-", ms=3,
                color=color, label=name)
        t = (q.get("compare") or {}).get("table", {})
        for key, label in (("fp32", "FP32"), ("int8", "PTQ")):
            if key in t:
                levels.setdefault((label, round(t[key]["mAP50-95"], 4)), None)
    for label, v in levels:
        ax.axhline(v, color="k", lw=0.8, ls=":" if label == "FP32" else "--", alpha=0.7)
        ax.annotate(f"{label} {v:.4f}", (1.0, v), xycoords=("axes fraction", "data"), fontsize=7, va="bottom",
                    ha="right")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mAP50-95 (ultralytics, EMA)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the lines stay readable
    ax.grid(alpha=0.3)
    ax.set_title("QAT: validation after each epoch", fontsize=9)
    return _png(fig)
