"""`qbench report`: summary.md and a self-contained report.html from the JSON that runs wrote.

A report covers one run folder, or several side by side (e.g. a LeakyReLU
model and its ReLU twin). From each it reads `run.json`, `model.json`,
`compare.json` (every scored model variant: FP32, INT8, baselines, profiles),
`qat.json` for a `qbench qat` folder (the training, its checks, per-epoch validation)
and, when `qbench inspect` has been run, `inspect.json` + `histograms.npz`
(also those of profile variants under `profiles/<name>/`). Nothing is
recomputed: the report only lays out numbers the runs measured, each section
naming the command that made them. Charts are PNGs embedded as data URIs and
the styling is inline, so the HTML opens offline from anywhere.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from pathlib import Path

from .. import __version__
from ..analysis import read_histograms
from ..analysis.inspect import CHANNEL_SPREAD_FLAG, TAIL_FLAG, is_attention, range_diagnosis
from ..comparison import ci_text
from ..errors import QbenchError
from ..quantization.recipe import recipe_label
from . import plots
from .advice import remedies

_NUMERIC = re.compile(r"^[-+]?(\d|—|inf)")  # numbers (and the "—" placeholder) are right-aligned
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1200px;color:#222;
padding:0 1rem;line-height:1.45}
h1{font-size:1.7rem;margin-bottom:.2rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
h3{margin-bottom:.4rem}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.88rem}
th,td{border:1px solid #ddd;padding:.25rem .55rem;text-align:right}th{background:#f4f6f8}
td:first-child,th:first-child,td.t{text-align:left}
.neg{color:#b00020}.pos{color:#1b7f3b}.muted{color:#666;font-size:.85rem}
code{background:#f4f6f8;padding:.05rem .3rem;border-radius:3px;font-size:.85rem}
img{max-width:100%;border:1px solid #eee;margin:.4rem 0}
.cards{display:flex;flex-wrap:wrap;gap:.8rem}.card{border:1px solid #ddd;border-radius:6px;padding:.6rem .9rem;
min-width:12rem}.card b{font-size:1.3rem;display:block}
"""


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def load_run(run_dir: str | os.PathLike, qat: dict | None = None) -> dict:
    """Everything a report needs from one run folder (`qbench run`, or `qbench qat`: then `qat` is its qat.json,
    read from the folder when not given)."""

    d = Path(run_dir)
    if not (d / "compare.json").is_file():
        raise QbenchError(f"'{d}' is not a finished qbench run folder (no compare.json); pass a folder written by "
                          "`qbench run` or `qbench qat`.")
    qat = qat if qat is not None else _read_json(d / "qat.json")
    info = _read_json(d / "run.json") or {}
    if qat and not info:
        info = {"weights": qat.get("weights"), "command": qat.get("command", ""),
                "recipe": qat.get("recipe")}
    run = {"dir": d, "name": d.name, "info": info, "qat": qat,
           "model": _read_json(d / "model.json") or {}, "compare": _read_json(d / "compare.json"),
           "inspect": {}, "hists": {}, "sensitivity": {}, "mixed": {}, "ops": _read_json(d / "ops.json")}
    for kind in ("sensitivity", "mixed"):  # `qbench sensitivity --out RUN[/SUB]`, `qbench quantize --max-drop`
        for p in [d / f"{kind}.json", *sorted(d.glob(f"*/{kind}.json"))]:
            obj = _read_json(p)
            if obj is not None:
                run[kind]["." if p.parent == d else p.parent.name] = obj
    for ins_path in [d / "inspect.json", d / "ptq" / "inspect.json", d / "qat" / "inspect.json",
                     *sorted(d.glob("profiles/*/inspect.json"))]:
        ins = _read_json(ins_path)
        if ins is None:
            continue
        folders = {v.get("folder"): row for row, v in run["compare"].get("variants", {}).items()}
        folders.update({"ptq": "int8", "qat": "qat"} if qat else {})  # a QAT run: its PTQ and QAT models
        key = "int8" if ins_path.parent == d else folders.get(ins_path.parent.name, f"int8[{ins_path.parent.name}]")
        run["inspect"][key] = ins
        if (ins_path.parent / "histograms.npz").is_file():
            run["hists"][key] = read_histograms(ins_path.parent / "histograms.npz")
    return run


# ----------------------------------------------------------------------------- tables (Markdown and HTML)
def _fmt(v, digits=4, signed=False):
    if v is None or v == "":
        return "—"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _accuracy_table(run: dict) -> tuple[list[str], list[list[str]]]:
    c = run["compare"]
    b = f"batch{c['settings']['batch']}_images_per_s"
    head = ["model", "P", "R", "mAP50", "mAP50-95", "Δ mAP50-95", "Δ 95% CI", "batch-1 ms", "speedup",
            f"batch-{c['settings']['batch']} img/s", "MB"]
    rows = []
    for k, r in c["models"].items():
        m, lat = r["metrics"], r["latency"]
        rows.append([k, _fmt(m["precision"], 3), _fmt(m["recall"], 3), _fmt(m["mAP50"]), _fmt(m["mAP50-95"]),
                     "—" if k == "fp32" else _fmt(r["delta"]["mAP50-95"], signed=True), ci_text(r),
                     _fmt(lat["batch1_median_ms"], 1), f"{r['speedup_batch1']:.2f}x", _fmt(lat.get(b), 1),
                     _fmt(r["size_mb"], 1)])
    return head, rows


def _matrix_table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Runs x INT8 variants: FP32 mAP50 and mAP50-95, then each variant's Δ mAP50-95 [95% CI] (the activation
    matrix)."""
    variants = list(dict.fromkeys(k for r in runs for k in r["compare"]["models"] if k != "fp32"))
    rows = []
    for r in runs:
        models = r["compare"]["models"]
        cells = [r["name"], _activations_text(next(iter(r["inspect"].values()))["summary"],
                                              r["model"].get("activations")) if r["inspect"]
                 else ", ".join(f"{k} x{v}" for k, v in (r["model"].get("activations") or {}).items()) or "—",
                 _fmt(models["fp32"]["metrics"]["mAP50"]), _fmt(models["fp32"]["metrics"]["mAP50-95"])]
        for v in variants:
            m = models.get(v)
            cells.append("—" if m is None else f"{_fmt(m['delta']['mAP50-95'], signed=True)} {ci_text(m)}")
        rows.append(cells)
    return ["run", "activations", "FP32 mAP50", "FP32 mAP50-95", *variants], rows


def _targets_table(run: dict) -> tuple[list[str], list[list[str]]]:
    """Per NPU target (`qbench run --target`): what of the graph it runs, next to the INT8 accuracy under its
    arithmetic (the run's variant quantized with that target, when its file sets the arithmetic)."""
    models = run["compare"]["models"]
    rows = []
    for t in run["ops"]["targets"]:
        variants = [k for k in models if k.startswith(f"int8[{t['target']},")]
        acc = "; ".join(f"{k}: {_fmt(models[k]['delta']['mAP50-95'], signed=True)} {ci_text(models[k])}"
                        for k in variants) or "not simulated: the target file sets no integer arithmetic"
        causes = "; ".join(f"{c['reason']} x{c['nodes']}" for c in t["causes"][:3]) or "none"
        rows.append([t["target"], _pct(t["body"]["share_nodes"]), _pct(t["body"]["share_macs"]),
                     str(t["cpu_partitions"]), str(t["transitions"]), f"{t['crossing_bytes_int8'] / 1e6:.2f}",
                     causes, acc])
    return ["target", "nodes on NPU (body)", "MACs on NPU (body)", "CPU partitions", "transitions",
            "MB crossing (int8)", "main fallback causes", "Δ mAP50-95 under its arithmetic [95% CI]"], rows


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _class_table(run: dict) -> tuple[list[str], list[list[str]]]:
    models = run["compare"]["models"]
    names = [p["class"] for p in models["fp32"]["per_class"]]
    head = ["class"] + [f"{k} mAP50-95" for k in models]
    rows = []
    for i, name in enumerate(names):
        cells = [name]
        for k, r in models.items():
            v = r["per_class"][i]
            cell = _fmt(v["mAP50-95"], 3)
            if k != "fp32" and v.get("delta_mAP50-95") is not None:
                cell += f" ({v['delta_mAP50-95']:+.3f})"
            cells.append(cell)
        rows.append(cells)
    return head, rows


DISPLAY_NAMES = {"LeakyRelu": "LeakyReLU", "Relu": "ReLU", "PRelu": "PReLU"}  # ONNX op type -> the name people use


def _activations_text(s: dict, model_census: dict | None = None) -> str:
    """'LeakyReLU x57 (57 unfused), SiLU x0' style census of an inspection summary. Inspections by older qbench
    versions counted LeakyReLU only: then the run's model.json census (`model_census`) says what the model has."""
    census = s.get("activations")
    if census is None:
        if model_census:
            census = {("LeakyRelu" if k in ("LeakyReLU", "LeakyRelu") else k): n for k, n in model_census.items()}
        elif s.get("leaky_relus"):
            return f"LeakyReLU x{s['leaky_relus']} ({s['unfused_leaky_relus']} unfused)"
        else:
            return "not recorded"
    parts = []
    for k, n in census.items():
        unf = {"LeakyRelu": s.get("unfused_leaky_relus"), "SiLU": s.get("unfused_silus")}.get(k)
        parts.append(f"{DISPLAY_NAMES.get(k, k)} x{n}" + (f" ({unf} unfused)" if unf else ""))
    return ", ".join(parts) or "none"


def _layer_summary(ins: dict, model_census: dict | None = None) -> tuple[list[str], list[list[str]]]:

    s = ins["summary"]
    causes = [range_diagnosis(r)[1] for r in ins["layers"] if r["role"] == "quantized" and r["producer"] != "input"]
    return (["tensors quantized", "activations", "output SQNR dB", "output cosine", "median isolated SQNR dB",
             "lowest cumulative SQNR dB", "range set by channels / rare values"],
            [[str(s["quantized_tensors"]), _activations_text(s, model_census),
              _fmt(s["output_sqnr_db"], 1), _fmt(s["output_cosine"], 5), _fmt(s["median_isolated_sqnr_db"], 1),
              _fmt(s["min_cumulative_sqnr_db"], 1),
              f"{causes.count('channels')} / {causes.count('rare values')}"]])


def _range_note() -> str:

    return (f"Range set by: 'channels' when a tensor's largest channel range is at least {CHANNEL_SPREAD_FLAG:g}x "
            f"its median one (per-channel equalization, recipe key equalize, can move it); 'rare values' when its "
            f"max |value| is at least {TAIL_FLAG:g}x its 99.9th percentile with the channels alike (no per-channel "
            f"rescaling can; only clipping, which trades their error for the bulk's, or more bits).")


def _worst_table(ins: dict, k: int = 10) -> tuple[list[str], list[list[str]]]:

    rows = sorted((r for r in ins["layers"] if r["role"] == "quantized" and r["producer"] != "input"),
                  key=lambda r: plots._num(r["sqnr_isolated_db"]))[:k]
    return (["tensor", "op", "min", "max", "neg %", "|min|/max", "clip %", "ch. spread", "max/p99.9", "range set by",
             "isolated dB", "cumulative dB"],
            [[r["layer"], r["producer"], _fmt(r["min"], 3), _fmt(r["max"], 3), _fmt(100 * r["negative_fraction"], 1),
              _fmt(r["neg_to_pos_ratio"], 3), _fmt(100 * plots._num(r["clip_fraction"]), 3),
              _fmt(r.get("channel_range_spread"), 1), _fmt(tail, 1), cause or "—",
              _fmt(plots._num(r["sqnr_isolated_db"]), 1), _fmt(plots._num(r["sqnr_cumulative_db"]), 1)]
             for r, (tail, cause) in ((r, range_diagnosis(r)) for r in rows)])


def _leaky_table(ins: dict, k: int = 15) -> tuple[list[str], list[list[str]]]:
    head = ["#", "layer", "unfused", "|min|/max", "codes neg/pos (deployed)", "bits lost (deployed)",
            "asym uint8 neg/pos", "sym int8 neg/pos", "SQNR dB", "ideal dB", "harm dB", "remedy", "gain dB"]
    rows = []
    for r in ins["leaky"][:k]:
        rows.append([str(r["rank"]), r["layer"], "yes" if r["unfused"] else "no", _fmt(r["neg_to_pos_ratio"], 3),
                     f"{r['neg_codes']}/{r['pos_codes']}", _fmt(r["bits_lost_vs_relu"], 2),
                     f"{r['asym_neg_codes']}/{r['asym_pos_codes']}", f"{r['sym_neg_codes']}/{r['sym_pos_codes']}",
                     _fmt(r["sqnr_actual_db"], 1), _fmt(r["sqnr_ideal_db"], 1), _fmt(r["harm_db"], 1), r["remedy"],
                     _fmt(plots._num(r["remedy_gain_db"]), 1)])
    return head, rows


def _most_harmed(ins: dict) -> tuple[str, str]:
    """('57/57', 'model.23.cv3.2.1 (LeakyReLU, 4.1 dB)'): unfused activations and the most harmed one."""
    rows = [("LeakyReLU", r) for r in ins.get("leaky", [])] + [("SiLU", r) for r in ins.get("silu", [])]
    if not rows:
        return "—", "—"
    unfused = sum(bool(r.get("unfused") or r.get("sigmoid_quantized")) for _, r in rows)
    kind, top = max(rows, key=lambda kr: plots._num(kr[1]["harm_db"]))
    return f"{unfused}/{len(rows)}", f"{top['layer']} ({kind}, {top['harm_db']:.1f} dB)"


def _variant_table(run: dict) -> tuple[list[str], list[list[str]]] | None:
    """One row per INT8 variant that was inspected: its accuracy change next to its per-layer error."""
    models = run["compare"]["models"]
    variants = run["compare"].get("variants", {})
    rows = []
    for key, ins in run["inspect"].items():
        if key not in models:
            continue
        m, s = models[key], ins["summary"]
        st = variants.get(key, {}).get("settings", {})
        acts = (f"{st['activation_type']} {'sym' if st['activation_symmetric'] else 'asym'}"
                f"{', pow2' if st.get('pow2_scales') else ''}") if st else "recipe"
        unfused, top = _most_harmed(ins)
        rows.append([key, acts, _fmt(m["delta"]["mAP50"], signed=True), _fmt(m["delta"]["mAP50-95"], signed=True),
                     _fmt(s["output_sqnr_db"], 1), _fmt(s["median_isolated_sqnr_db"], 1),
                     _fmt(s["min_cumulative_sqnr_db"], 1), unfused, top])
    if len(rows) < 2:
        return None
    return (["model", "activations", "Δ mAP50", "Δ mAP50-95", "output SQNR dB", "median isolated dB",
             "lowest cumulative dB", "activations unfused", "most harmed activation"], rows)


def _silu_table(ins: dict, k: int = 15) -> tuple[list[str], list[list[str]]]:
    head = ["#", "layer", "Conv out requantized", "Sigmoid requantized", "min / max", "codes neg/pos (deployed)",
            "SQNR dB", "fused dB", "ideal dB", "harm dB", "remedy"]
    rows = [[str(r["rank"]), r["layer"], "yes" if r["unfused"] else "no", "yes" if r["sigmoid_quantized"] else "no",
             f"{_fmt(r['out_min'], 3)} / {_fmt(r['out_max'], 2)}", f"{r['neg_codes']}/{r['pos_codes']}",
             _fmt(r["sqnr_actual_db"], 1), _fmt(r["sqnr_fused_db"], 1), _fmt(r["sqnr_ideal_db"], 1),
             _fmt(r["harm_db"], 1), r["remedy"]] for r in ins["silu"][:k]]
    return head, rows


def _attention_table(ins: dict) -> tuple[list[str], list[list[str]]]:

    rows = [r for r in ins["layers"] if r["role"] == "quantized" and is_attention(r)]
    return (["tensor", "op", "min", "max", "range set by", "isolated dB", "cumulative dB"],
            [[r["layer"], r["producer"], _fmt(r["min"], 3), _fmt(r["max"], 3), range_diagnosis(r)[1] or "—",
              _fmt(plots._num(r["sqnr_isolated_db"]), 1), _fmt(plots._num(r["sqnr_cumulative_db"]), 1)]
             for r in rows])


def _pts(v, signed=True):
    return "—" if v is None else (f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}")


def _sensitivity_table(sens: dict, k: int = 15) -> tuple[list[str], list[list[str]]]:
    head = ["rank", "layer", "proxy recovery dB", "alone dB", "mAP recovery (pts)", "mAP damage (pts)"]
    rows = [[str(r["rank"]), r["module"], _fmt(r["proxy_recovery_db"], 2, True), _fmt(r["proxy_damage_db"], 1),
             _pts(r["map_recovery"]), _pts(r["map_damage"])] for r in sens.get("layers", [])[:k]]
    return head, rows


def _sensitivity_note(sens: dict) -> str:
    p, m = sens.get("proxy", {}), sens.get("map") or {}
    note = (f"{p.get('layers')} quantized convs, INT8 output error {p.get('int8_db')} dB; proxy cost "
            f"{p.get('forward_passes')} forward passes on {len(p.get('images', []))} calibration images "
            f"({p.get('seconds')} s).")
    if m:
        rc = m.get("rank_correlation", {})
        note += (f" Top {m.get('top_k')} measured by mAP50-95 on {m.get('split')} ({m.get('evaluations')} "
                 f"evaluations, {m.get('seconds')} s): FP32 {m.get('fp32_mAP50-95')}, INT8 {m.get('int8_mAP50-95')}; "
                 f"Spearman rank correlation proxy vs mAP: recovery {rc.get('recovery')}, damage {rc.get('damage')}.")
    return note


def _mixed_table(mix: dict) -> tuple[list[str], list[list[str]]]:
    prec = "INT16" if mix.get("fallback") == "int16" else "FP32"
    head = ["model", "mAP50-95", "drop (pts)", f"{prec} convs", "batch-1 ms", "vs FP32"]
    lat = mix.get("latency", {})
    n = len(mix.get("float_layers", []))
    rows = []
    for key, label, m, convs in (("fp32", "FP32", mix.get("fp32_mAP50-95"), "all"),
                                 ("int8", "all INT8", mix.get("int8_mAP50-95"), "0"),
                                 ("mixed", "mixed", mix.get("mixed_mAP50-95"), f"{n} of {mix.get('quantized_convs')}")):
        lt = lat.get(key, {})
        drop = None if m is None else mix.get("fp32_mAP50-95", 0) - m
        rows.append([label, _fmt(m), _pts(drop, signed=False), convs, _fmt(lt.get("batch1_median_ms"), 1),
                     f"{lt['speedup_batch1']:.2f}x" if lt.get("speedup_batch1") else "—"])
    return head, rows


def _mixed_note(mix: dict) -> str:
    met = mix.get("met")
    prec = "INT16" if mix.get("fallback") == "int16" else "FP32"
    layers = "; ".join(f"{f['layer']} ({f['why']})" for f in mix.get("float_layers", [])) or "none"
    return (f"Budget {mix.get('max_drop_points')} mAP50-95 points on {mix.get('split')}: "
            f"{'met' if met else 'NOT met (no model written)'}, recipe {mix.get('recipe')}, "
            f"{len(mix.get('trials', [])) - 1} candidates tried. "
            f"{'' if met else 'Best found, '}{prec} layers: {layers}. Note: {mix.get('note', '')}."
            + _cost_note(mix.get("cost")))


def _cost_note(cost: dict | None) -> str:
    if not cost:
        return ""
    w = cost["weight_bytes"]
    note = f" Cost ({cost['model']}): weights {w['all_int8'] / 1e6:.2f} -> {w['mixed'] / 1e6:.2f} MB"
    if "int8_equivalent_macs" in cost:
        m = cost["int8_equivalent_macs"]
        return note + f", int8-equivalent MACs x{m['mixed'] / max(1, m['all_int8']):.3f}."
    return note + f", {cost['host_cpu_macs'] / 1e6:.0f} M MACs on the host CPU."


def _md(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _html_table(head, rows) -> str:
    """Deltas (columns named Δ, and '(+0.012)' suffixes) are coloured: red for a loss, green for a gain."""
    delta_cols = {i for i, h in enumerate(head) if "Δ" in h or "mAP50-95" in h and h != "mAP50-95"}

    def cell(i, v):
        d = v.rsplit("(", 1)[-1] if i in delta_cols else ""
        cls = "neg" if d.startswith("-") else ("pos" if d.startswith("+") else "")
        if not _NUMERIC.match(v):
            cls += " t"
        return f"<td class='{cls.strip()}'>{html.escape(v)}</td>" if cls else f"<td>{html.escape(v)}</td>"

    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(r)) + "</tr>" for r in rows) + "</table>")


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


# ----------------------------------------------------------------------------- the report
def _inspect_hint(run: dict) -> str:
    return f"qbench inspect {run['dir']}"  # a qbench qat folder too: its PTQ and QAT models, into ptq/ and qat/


def _qat_table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["run", "recipe + profile", "epochs", "device", "fine-tuning s", "activation ranges", "distill", "PTQ mAP50-95",
            "QAT mAP50-95", "QAT − PTQ [95% CI]", "PTQ loss recovered", "int8 convs", "ONNX vs fake-quant",
            "ORT vs itself"]
    rows = []
    for r in runs:
        q = r["qat"]
        c = q.get("compare") or {}
        t = c.get("table", {})
        lo, hi = c.get("qat_minus_ptq_ci95") or (None, None)
        rec = c.get("recovered_fraction")
        k, m = q.get("kernels", {}), (q.get("onnx_vs_torch") or {}).get("ort_optimized", {})
        own = (q.get("onnx_vs_torch") or {}).get("ort_self", {})
        rows.append([r["name"], recipe_label(q.get("recipe", "?")),
                     f"{q.get('epochs_run')} of {q.get('epochs')}", str(q.get("device")),
                     _fmt(q.get("train_seconds"), 0),
                     q.get("activation_ranges", {}).get("mode", "frozen at PTQ"),  # runs from before learned ones
                     _fmt(q.get("distill"), 1) if q.get("distill") else "—",
                     _fmt(t.get("int8", {}).get("mAP50-95")), _fmt(t.get("qat", {}).get("mAP50-95")),
                     f"{_fmt(c.get('qat_minus_ptq'), signed=True)} [{_fmt(lo, signed=True)}, {_fmt(hi, signed=True)}]",
                     "—" if rec is None else f"{100 * rec:.0f}%",
                     f"{k.get('QLinearConv')} of {k.get('quantized_convs')}",
                     f"{m['sqnr_db']:.1f} dB" if "sqnr_db" in m else "—",
                     f"{own['sqnr_db']:.1f} dB" if "sqnr_db" in own else "—"])
    return head, rows


def _epoch_table(q: dict) -> tuple[list[str], list[list[str]]]:
    head = ["epoch", "train box", "train cls", "train dfl", "val mAP50", "val mAP50-95"]
    rows = [[str(int(e.get("epoch", 0))), _fmt(e.get("train/box_loss"), 3), _fmt(e.get("train/cls_loss"), 3),
             _fmt(e.get("train/dfl_loss"), 3), _fmt(e.get("metrics/mAP50(B)")), _fmt(e.get("metrics/mAP50-95(B)"))]
            for e in q.get("train_results", [])]
    return head, rows


def build(runs: list[dict]) -> tuple[str, str]:
    """(summary.md, report.html) for one or more loaded runs."""
    title = "qbench report: " + " vs ".join(r["name"] for r in runs)
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="muted">qbench {__version__}. Every number below was measured by the command shown '
            "next to it; this page only lays them out.</p>"]

    # ---- overview cards
    body.append('<div class="cards">')
    for r in runs:
        c = r["compare"]["models"]
        if "int8" in c:
            body.append(f'<div class="card">{html.escape(r["name"])}<b>{c["int8"]["delta"]["mAP50-95"]:+.4f}</b>'
                        f'mAP50-95 INT8 vs FP32 ({c["fp32"]["metrics"]["mAP50-95"]:.4f} → '
                        f'{c["int8"]["metrics"]["mAP50-95"]:.4f}), {c["int8"]["speedup_batch1"]:.2f}x batch-1</div>')
        if "qat" in c:
            body.append(f'<div class="card">{html.escape(r["name"])}<b>{c["qat"]["delta"]["mAP50-95"]:+.4f}</b>'
                        f'mAP50-95 QAT vs FP32 ({c["fp32"]["metrics"]["mAP50-95"]:.4f} → '
                        f'{c["qat"]["metrics"]["mAP50-95"]:.4f}), {c["qat"]["speedup_batch1"]:.2f}x batch-1</div>')
    body.append("</div>")

    # ---- accuracy and speed
    md += ["## FP32 vs INT8: accuracy, speed, size", ""]
    body.append("<h2>FP32 vs INT8: accuracy, speed, size</h2>")
    bars = []
    for r in runs:
        c, info = r["compare"], r["info"]
        m = r["model"]
        params = f"{m['params'] / 1e6:.2f} M params, " if m.get("params") else ""
        desc = (f"model `{info.get('weights', '?')}` ({params}imgsz "
                f"{c['settings']['imgsz']}), data `{c['data'].get('yaml', '?')}` ({c['data']['split']}, "
                f"{c['data']['images']} images), recipe `{info.get('recipe', '?')}`, {c['threads']} threads")
        cmd = info.get("command", "")
        head, rows = _accuracy_table(r)
        md += [f"### {r['name']}", "", desc, ""] + ([f"Reproduce: `{cmd}`", ""] if cmd else []) + [_md(head, rows)]
        body += [f"<h3>{html.escape(r['name'])}</h3>", f"<p>{html.escape(desc)}" +
                 (f"<br>Reproduce: <code>{html.escape(cmd)}</code>" if cmd else "") + "</p>", _html_table(head, rows)]
        ch, cr = _class_table(r)
        md += [_md(ch, cr)]
        body.append(_html_table(ch, cr))
        bars += [(r["name"], k, v["delta"]["mAP50-95"]) for k, v in c["models"].items() if k != "fp32"]
    body.append(_img(plots.delta_bars(bars), "mAP50-95 change against FP32 per model variant"))
    if len(runs) > 1:
        head, rows = _matrix_table(runs)
        note = ("Side by side: each run's FP32 mAP50 and mAP50-95 and, per INT8 variant, its change against that run's own "
                "FP32 with the 95% interval (paired bootstrap over the scored images); — where a run has no such "
                "variant.")
        md += ["### All runs: Δ mAP50-95 per INT8 variant", "", note, "", _md(head, rows)]
        body += ["<h3>All runs: Δ mAP50-95 per INT8 variant</h3>", f"<p class='muted'>{html.escape(note)}</p>",
                 _html_table(head, rows)]
    for r in runs:
        vt = _variant_table(r)
        if vt:
            title = f"{r['name']}: accuracy and per-layer error per profile"
            note = ("Each INT8 variant of the run (recipe, NPU profiles, fused or unfused Conv+activation), scored "
                    "on the same images; SQNR from `qbench inspect`.")
            if r.get("qat"):
                note += (" The QAT model's SQNR is against its own FP32 weights (qat-fp32.onnx): fake quantization "
                         "passes no gradient for values past a frozen range, so the fine-tuned float model can reach "
                         "values its INT8 model clips (clip % in the tensor tables), and Δ mAP is against the "
                         "original FP32 model.")
            md += [f"### {title}", "", note, "", _md(*vt)]
            body += [f"<h3>{html.escape(title)}</h3><p class='muted'>{html.escape(note)}</p>", _html_table(*vt)]

    # ---- NPU targets (`qbench run --target`)
    truns = [r for r in runs if r.get("ops")]
    if truns:
        md += ["## NPU targets", ""]
        body.append("<h2>NPU targets</h2>")
        note = ("Per target: the share of the FP32 graph's nodes and multiply-accumulates its NPU runs (the body: "
                "the YOLO decode left out, as deployments cut it off), the CPU-fallback partitions, the NPU<->CPU "
                "transitions and the int8 bytes crossing them (batch 1), the main fallback causes; next to the "
                "INT8 accuracy under the target's own arithmetic (its variant in the table above). Sources: each "
                "target file in configs/npu/.")
        for r in truns:
            head, rows = _targets_table(r)
            cmd = r["ops"].get("command", "")
            md += [f"### {r['name']}", "", note, "", f"Reproduce: `{cmd}`", "", _md(head, rows)]
            body += [f"<h3>{html.escape(r['name'])}</h3><p class='muted'>{html.escape(note)}</p>",
                     f"<p>Reproduce: <code>{html.escape(cmd)}</code></p>", _html_table(head, rows)]

    # ---- quantization-aware training
    qruns = [r for r in runs if r.get("qat")]
    if qruns:
        md += ["## Quantization-aware training", ""]
        body.append("<h2>Quantization-aware training</h2>")
        expl = ("PTQ: the recipe + profile applied to the FP32 model; QAT: the same quantizers, fake-quantized "
                "during fine-tuning, exported and scored through the same path. QAT − PTQ: its 95% interval is a "
                "paired bootstrap over the scored images. Recovered: (QAT − PTQ) / (FP32 − PTQ). int8 convs: "
                "QLinearConv kernels in ORT's optimized graph, of the convs the recipe quantizes. ONNX vs fake-quant: "
                "SQNR of the INT8 ONNX outputs (ORT's fused kernels) against the PyTorch fake-quant model on a few val "
                "images; ORT vs itself: the same ONNX run by ORT's fused kernels against its own QDQ simulation, the "
                "scale to read the first on (with free scales one-code rounding steps spread through the model, ~35-50 "
                "dB; power-of-two scales requantize exactly, ~140 dB).")
        head, rows = _qat_table(qruns)
        md += [expl, "", _md(head, rows)]
        body += [f"<p class='muted'>{html.escape(expl)}</p>", _html_table(head, rows)]
        note = ("Per epoch: ultralytics' own validation of the fake-quant EMA after each epoch (its val pipeline, "
                "rectangular batches: close to, not the same as, the table above).")
        md += [note, ""]
        body.append(f"<p class='muted'>{html.escape(note)}</p>")
        for r in qruns:
            head, rows = _epoch_table(r["qat"])
            if rows:
                md += [f"### {r['name']}: per epoch", "", _md(head, rows)]
                body += [f"<h3>{html.escape(r['name'])}: per epoch</h3>", _html_table(head, rows)]
        body.append(_img(plots.qat_curves({r["name"]: r["qat"] for r in qruns}),
                         "validation mAP50-95 per QAT epoch"))

    # ---- per-layer error
    md += ["## Per-layer quantization error", ""]
    body.append("<h2>Per-layer quantization error</h2>")
    body.append('<p class="muted">Isolated: the FP32 activation quantized alone with the INT8 model\'s scale and '
                "zero point. Cumulative: the INT8 model's own tensor, every earlier layer quantized too (QDQ graph "
                "run as written). SQNR = 10·log10(signal power / error power). " + _range_note() + "</p>")
    md += [_range_note(), ""]
    depth = {}
    for r in runs:
        for key, ins in r["inspect"].items():
            label = r["name"] if key == "int8" else f"{r['name']} {key}"
            depth[label] = ins
            head, rows = _layer_summary(ins, r["model"].get("activations"))
            src = ins.get("source", {})
            note = (f"{ins['images']['statistics']} calibration images for statistics, {ins['images']['error']} "
                    f"val images for error ({src.get('data', '')}).")
            md += [f"### {label}", "", note, "", f"Reproduce: `{_inspect_hint(r)}`", "", _md(head, rows),
                   "Worst tensors (isolated SQNR):", "", _md(*_worst_table(ins))]
            section = [f"<p class='muted'>{html.escape(note)} Reproduce: <code>{html.escape(_inspect_hint(r))}"
                       "</code></p>", _html_table(head, rows), "<p>Worst tensors (isolated SQNR):</p>",
                       _html_table(*_worst_table(ins))]
            if key == "int8":
                body += [f"<h3>{html.escape(label)}</h3>", *section]
            else:  # profile variants: folded, the variant table above already compares them
                body += [f"<details><summary><b>{html.escape(label)}</b></summary>", *section, "</details>"]
        if not r["inspect"]:
            md += [f"No per-layer analysis for {r['name']}: run `{_inspect_hint(r)}`.", ""]
            body.append(f"<p>No per-layer analysis for {html.escape(r['name'])}: run "
                        f"<code>{html.escape(_inspect_hint(r))}</code>.</p>")
    body.append(_img(plots.sqnr_along_depth(depth), "SQNR along network depth"))
    for r in runs:
        if "int8" in r["inspect"] and "int8" in r["hists"]:
            body += [f"<h3>{html.escape(r['name'])}: ranges of the worst layers</h3>",
                     _img(plots.worst_histograms(r["inspect"]["int8"], r["hists"]["int8"]), "worst layer histograms")]

    # ---- LeakyReLU
    leaky_runs = {(r["name"] if k == "int8" else f"{r['name']} {k}"): ins for r in runs
                  for k, ins in r["inspect"].items() if ins.get("leaky")}
    if leaky_runs:
        md += ["## LeakyReLU diagnostics", ""]
        body.append("<h2>LeakyReLU diagnostics</h2>")
        expl = ("Codes: how many of the 256 int8 codes the negative tail gets and the positive range keeps, as "
                "deployed, under asymmetric uint8 and under symmetric int8 (zero point 0). Bits lost: against a "
                "ReLU-like range [0, max] that gives all 256 codes to the positive side. Unfused: the Conv output "
                "is quantized before the LeakyReLU, then its output again. Harm: SQNR lost against the same layer "
                "fused and asymmetric; gain: the SQNR the named remedy measured on the same images.")
        md += [expl, ""]
        body.append(f"<p class='muted'>{html.escape(expl)}</p>")
        main = {label: ins for label, ins in leaky_runs.items() if "[" not in label}
        for label, ins in leaky_runs.items():
            head, rows = _leaky_table(ins)
            md += [f"### {label}", "", _md(head, rows)]
            if label in main:
                body += [f"<h3>{html.escape(label)}</h3>", _html_table(head, rows)]
            else:
                body += [f"<details><summary><b>{html.escape(label)}</b></summary>", _html_table(head, rows),
                         "</details>"]
        body.append(_img(plots.leaky_harm(main or leaky_runs), "LeakyReLU harm ranking"))

    # ---- SiLU
    silu_runs = {(r["name"] if k == "int8" else f"{r['name']} {k}"): ins for r in runs
                 for k, ins in r["inspect"].items() if ins.get("silu")}
    if silu_runs:
        md += ["## SiLU diagnostics", ""]
        body.append("<h2>SiLU diagnostics</h2>")
        expl = ("SiLU is exported as x * Sigmoid(x). ONNX Runtime's layout requantizes the Conv output before the "
                "Sigmoid and the Mul read it, the Sigmoid output ([0, 1] in steps of 1/255: a small gate keeps few "
                "significant codes) and the product; a fused profile quantizes only the product. SQNR: the layer's "
                "output as deployed; fused: only the product quantized; ideal: an asymmetric range fitted to the "
                "output (min -0.28: a symmetric int8 range gives the negative tail 128 codes it barely uses). "
                "Harm: ideal − SQNR.")
        md += [expl, ""]
        body.append(f"<p class='muted'>{html.escape(expl)}</p>")
        main = {label: ins for label, ins in silu_runs.items() if "[" not in label}
        for label, ins in silu_runs.items():
            head, rows = _silu_table(ins)
            md += [f"### {label}", "", _md(head, rows)]
            if label in main:
                body += [f"<h3>{html.escape(label)}</h3>", _html_table(head, rows)]
            else:
                body += [f"<details><summary><b>{html.escape(label)}</b></summary>", _html_table(head, rows),
                         "</details>"]
        body.append(_img(plots.leaky_harm(main or silu_runs, kind="silu"), "SiLU harm ranking"))

    # ---- attention
    att_runs = {r["name"]: r["inspect"]["int8"] for r in runs
                if "int8" in r["inspect"] and r["inspect"]["int8"]["summary"].get("attention_tensors")}
    if att_runs:
        md += ["## Attention blocks", ""]
        body.append("<h2>Attention blocks</h2>")
        expl = ("The quantized tensors of the attention blocks (C2PSA): scaled queries, the query·key scores "
                "(MatMul), their Softmax, attention·values and the residual sums. Scores span a wide range, and "
                "Softmax concentrates on few values, so these often sit among the worst tensors.")
        md += [expl, ""]
        body.append(f"<p class='muted'>{html.escape(expl)}</p>")
        for label, ins in att_runs.items():
            head, rows = _attention_table(ins)
            md += [f"### {label}", "", _md(head, rows)]
            body += [f"<h3>{html.escape(label)}</h3>", _html_table(head, rows)]

    # ---- what to do
    md += ["## What to do", ""]
    body.append("<h2>What to do</h2>")
    expl = ("The remedies that change something on this model, each with what this run measured for it (or the "
            "command that measures it), and the shipped recipes that would change nothing here.")
    md += [expl, ""]
    body.append(f"<p class='muted'>{html.escape(expl)}</p>")
    for r in runs:
        adv = remedies(r)
        md += [f"### {r['name']}", ""]
        body.append(f"<h3>{html.escape(r['name'])}</h3><ul>")
        for a in adv["apply"]:
            line = f"**{a['remedy']}**: {a['why']}. Measured: {a['measured']}."
            line += f" {a['note']}" if a.get("note") else ""
            md.append(f"- {line} `{a['command']}`")
            body.append(f"<li><b>{html.escape(a['remedy'])}</b>: {html.escape(a['why'])}. Measured: "
                        f"{html.escape(a['measured'])}.{(' ' + html.escape(a['note'])) if a.get('note') else ''}"
                        f"<br><code>{html.escape(a['command'])}</code></li>")
        for a in adv["skip"]:
            md.append(f"- Not here: {a['remedy']}: {a['why']}.")
            body.append(f"<li class='muted'>Not here: {html.escape(a['remedy'])}: {html.escape(a['why'])}.</li>")
        md.append("")
        body.append("</ul>")

    # ---- sensitivity and mixed precision
    if any(r["sensitivity"] or r["mixed"] for r in runs):
        md += ["## Layer sensitivity and mixed precision", ""]
        body.append("<h2>Layer sensitivity and mixed precision</h2>")
        expl = ("Per quantized conv: proxy recovery = output error removed by keeping that layer alone in FP32 (dB), "
                "alone = output SQNR-like error with only that layer quantized (dB), on calibration images; the "
                "top-K are also measured by mAP50-95 on the val split (points: 1 = 0.01). Mixed precision keeps "
                "the fewest layers in FP32 for a mAP budget (`qbench quantize --max-drop`).")
        md += [expl, ""]
        body.append(f"<p class='muted'>{html.escape(expl)}</p>")
        sections = (("sensitivity", "sensitivity", _sensitivity_table, _sensitivity_note, plots.sensitivity_bars),
                    ("mixed", "mixed precision", _mixed_table, _mixed_note, None))
        for r in runs:
            for kind, title, table, describe, chart in sections:
                for sub, obj in r[kind].items():
                    label = f"{r['name'] if sub == '.' else r['name'] + ' / ' + sub}: {title}"
                    head, rows = table(obj)
                    note = describe(obj)
                    md += [f"### {label}", "", note, "", _md(head, rows)]
                    body += [f"<h3>{html.escape(label)}</h3>", f"<p>{html.escape(note)}</p>", _html_table(head, rows)]
                    if chart is not None:
                        body.append(_img(chart(obj), f"layer {title}"))

    commands = [r["info"].get("command", "") for r in runs] + [_inspect_hint(r) for r in runs if r["inspect"]]
    md += ["## Reproduce", ""] + [f"- `{c}`" for c in commands if c] + \
          [f"- `qbench report {' '.join(str(r['dir']) for r in runs)}`", ""]
    body.append("<h2>Reproduce</h2><ul>" + "".join(f"<li><code>{html.escape(c)}</code></li>" for c in commands if c)
                + f"<li><code>qbench report {html.escape(' '.join(str(r['dir']) for r in runs))}</code></li></ul>")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    return "\n".join(md), page


def report(run_dirs: list[str | os.PathLike], out: str | os.PathLike | None = None) -> Path:
    """Write summary.md and report.html for the runs into `out` (default: the single run's folder)."""
    if not run_dirs:
        raise QbenchError("pass at least one run folder written by `qbench run` or `qbench qat`.")
    runs = [load_run(d) for d in run_dirs]
    if out is None:
        if len(runs) > 1:
            raise QbenchError("a side-by-side report of several runs needs --out FOLDER.")
        out = runs[0]["dir"]
    return write_report(runs, out)


def write_report(runs: list[dict], out: str | os.PathLike) -> Path:
    """summary.md and report.html of loaded runs (`load_run`) into `out`, each written whole or not at all."""
    out = Path(out)
    md, page = build(runs)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("summary.md", md), ("report.html", page)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
    return out / "report.html"
