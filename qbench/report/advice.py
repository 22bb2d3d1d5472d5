"""What to do about a run's INT8 loss: the remedies that apply to THIS model, each with what it measured.

`remedies(run)` reads only what the run folder holds (compare.json and its profile variants, inspect.json,
mixed.json, qat.json) and the model's activations, and returns two lists:
- `apply`: {remedy, why, measured, command}: options that change something on this model; `measured` is the
  run's own number where it has one (a fused variant's Δ mAP50-95, a --max-drop result), else what the
  per-layer analysis measured for it, and `command` makes (or repeats) the measurement;
- `skip`: {remedy, why}: the shipped recipes that would change nothing here (e.g. equalize on a SiLU model,
  which has no Conv -> ReLU/LeakyReLU -> Conv chain; shift-negative without LeakyReLU), said once so that nobody
  tries them.
"""

from __future__ import annotations

import statistics

from ..analysis.inspect import is_attention
from ..files import display_path


def _fmt_delta(m: dict) -> str:
    d = m["delta"]["mAP50-95"]
    ci = m.get("delta_ci95", {}).get("mAP50-95")
    ci_txt = f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
    return f"Δ mAP50-95 {d:+.4f}{ci_txt} at {m['speedup_batch1']:.2f}x FP32 batch-1 speed"


def _activation_rows(ins: dict) -> list[tuple[str, dict]]:
    return [("LeakyReLU", r) for r in ins.get("leaky", [])] + [("SiLU", r) for r in ins.get("silu", [])]


def _fused_gain(row: dict) -> float | None:
    g = row.get("fused_gain_db")
    if g is None:
        g = (row.get("remedy_gains_db") or {}).get("fused")
    return g if isinstance(g, (int, float)) else None


NAMES = {"LeakyRelu": "LeakyReLU", "Relu": "ReLU", "PRelu": "PReLU", "HardSwish": "Hardswish"}


def _census(run: dict, ins: dict | None) -> dict:
    """{activation: count} with ultralytics' class names (LeakyReLU, ReLU, SiLU, ...): from the inspection's graph
    census (ONNX op names), else model.json's."""
    census = (ins or {}).get("summary", {}).get("activations") or run["model"].get("activations") or {}
    return {NAMES.get(k, k): v for k, v in census.items()} if isinstance(census, dict) else {}


def remedies(run: dict) -> dict:
    info, models = run["info"], run["compare"]["models"]
    variants = run["compare"].get("variants", {})
    ins = run["inspect"].get("int8") or next(iter(run["inspect"].values()), None)
    census = _census(run, ins)
    weights = info.get("weights") or "best.pt"
    data = run["compare"].get("data", {}).get("yaml") or info.get("data") or "data.yaml"
    calib = info.get("calibration") or "calibration.json"
    if (run["dir"] / calib).is_file():  # recorded relative to the run folder
        calib = display_path(run["dir"] / calib)
    fp32 = display_path(run["dir"] / "fp32.onnx")
    apply, skip = [], []

    # ---- the fused Conv + activation layout
    rows = _activation_rows(ins) if ins else []
    unfused = [(kind, r) for kind, r in rows if r.get("unfused") or r.get("sigmoid_quantized")]
    fused_variants = {k: v for k, v in variants.items() if v.get("settings", {}).get("activation_fusion") == "fused"
                      and k in models}
    if unfused or fused_variants:
        kinds = sorted({k for k, _ in unfused}) or sorted({k for k, _ in rows})
        gains = [g for _, r in unfused if (g := _fused_gain(r)) is not None]
        why = (f"the INT8 model requantizes the Conv output before {len(unfused)} {'/'.join(kinds)} activations "
               f"(ONNX Runtime's layout)" if unfused else "fused variants were scored")
        measured = [f"{k}: {_fmt_delta(models[k])}" for k in fused_variants]
        if gains:
            measured.append(f"per layer: +{statistics.median(gains):.1f} dB median output SQNR when fused "
                            f"(`qbench inspect`)")
        apply.append({"remedy": "fused Conv+activation layout (a profile with --fusion fused)", "why": why,
                      "measured": "; ".join(measured) or "not measured in this run",
                      "command": f"qbench compare {fp32} --data {data} --calib {calib} --profile cpu --fusion fused "
                                 f"--runtime openvino --out {display_path(run['dir'])}/fusion",
                      "note": "ONNX Runtime's x86 CPU EP has no int8 Conv+activation kernel and runs the fused model "
                              "at about float speed; OpenVINO (--runtime openvino) and NPUs run it in int8 "
                              "(docs/runtimes.md)."})

    # ---- mixed precision
    if run.get("mixed"):
        for sub, mix in run["mixed"].items():
            n = len(mix.get("float_layers", []))
            prec = "INT16" if mix.get("fallback") == "int16" else "FP32"
            drop = None if mix.get("mixed_mAP50-95") is None else mix["fp32_mAP50-95"] - mix["mixed_mAP50-95"]
            apply.append({"remedy": "mixed precision (--max-drop)", "why": "a few layers carry most of the loss",
                          "measured": (f"{'met' if mix.get('met') else 'NOT met'}: {n} of {mix.get('quantized_convs')} "
                                       f"convs in {prec}, drop {100 * drop:.2f} points" if drop is not None else
                                       "no model met the budget"),
                          "command": f"{display_path(run['dir'] / sub / 'mixed.json')} (recipe {mix.get('recipe')}, "
                                     f"budget {mix.get('max_drop_points')} points)"})
    else:
        apply.append({"remedy": "mixed precision (--max-drop)",
                      "why": "keeps the fewest convs in FP32 (ranked by sensitivity) for a mAP budget",
                      "measured": "not measured in this run",
                      "command": f"qbench quantize {fp32} --calib {calib} --data {data} --max-drop 0.3 "
                                 f"--out {display_path(run['dir'])}/mixed/int8.onnx"})

    # ---- attention blocks
    if ins:

        worst = sorted((r for r in ins.get("layers", []) if r.get("role") == "quantized"),
                       key=lambda r: r["sqnr_isolated_db"] if isinstance(r["sqnr_isolated_db"], (int, float))
                       else float("inf"))[:10]
        att = [r for r in worst if is_attention(r)]
        if att:
            t = att[0]["tensor"]
            block = t[:t.index("/attn/") + len("/attn/")] if "/attn/" in t else t.rsplit("/", 1)[0] + "/"
            apply.append({"remedy": "keep the attention block in float",
                          "why": f"{len(att)} of the 10 worst-quantized tensors are attention tensors "
                                 f"(worst: {att[0]['layer']} {att[0]['producer']}, "
                                 f"{att[0]['sqnr_isolated_db']:.1f} dB isolated)",
                          "measured": "not measured in this run",
                          "command": f"a recipe with exclude: ['{block}*'] "
                                     "(or --max-drop, which finds such layers itself)"})

    # ---- QAT
    if run.get("qat"):
        c = (run["qat"].get("compare") or {})
        apply.append({"remedy": "quantization-aware training", "why": "this run",
                      "measured": f"QAT − PTQ {c.get('qat_minus_ptq', 0):+.4f}",
                      "command": run["qat"].get("command", "")})
    else:
        apply.append({"remedy": "quantization-aware training", "why": "fine-tunes the weights under the same "
                      "quantizers (every YOLO family qbench accepts)", "measured": "not measured in this run",
                      "command": f"qbench qat --weights {weights} --data {data} --epochs 3 "
                                 f"--out {display_path(run['dir'])}-qat"})

    # ---- recipes that only apply to some models
    leaky, relu = census.get("LeakyReLU", 0), census.get("ReLU", 0)
    channels = (ins or {}).get("summary", {}).get("range_set_by", {}).get("channels", 0)
    if leaky or relu:
        if channels:
            apply.append({"remedy": "recipe equalize", "why": f"{channels} tensors' ranges are set by a few wide "
                          "channels", "measured": "not measured in this run",
                          "command": f"qbench run --weights {weights} --data {data} --recipe equalize"})
    else:
        skip.append({"remedy": "recipe equalize", "why": "it rescales Conv -> ReLU/LeakyReLU -> Conv chains and this "
                     f"model has none ({', '.join(f'{k} x{v}' for k, v in census.items()) or 'no activations'}); "
                     "SiLU is not scale-equivariant"})
    symmetric = [k for k, v in variants.items() if v.get("settings", {}).get("activation_symmetric")]
    if leaky and symmetric:
        apply.append({"remedy": "recipe shift-negative", "why": f"LeakyReLU outputs on the symmetric int8 grid of "
                      f"{', '.join(symmetric[:3])} waste the codes of the unused negative side",
                      "measured": "; ".join(f"{k}: {_fmt_delta(models[k])}" for k in symmetric[:3]) + " (without it)",
                      "command": f"qbench compare {fp32} --data {data} --calib {calib} --profile npu-symmetric "
                                 "--recipe shift-negative"})
    elif not leaky:
        skip.append({"remedy": "recipe shift-negative", "why": "it shifts LeakyReLU outputs; this model has none"})
    pow2 = [k for k, v in variants.items() if v.get("settings", {}).get("pow2_scales")]
    if pow2:
        apply.append({"remedy": "recipe percentile-9999 for power-of-two profiles", "why": "power-of-two scales "
                      "round every range up by up to 2x; clipping the 0.01% tail first keeps a bit",
                      "measured": "; ".join(f"{k}: {_fmt_delta(models[k])}" for k in pow2[:2]) + " (min/max ranges)",
                      "command": f"qbench compare {fp32} --data {data} --calib {calib} --profile npu-symmetric-pow2 "
                                 "--recipe percentile-9999"})
    return {"apply": apply, "skip": skip}
