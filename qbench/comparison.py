"""FP32 vs INT8 through the same evaluation path: accuracy deltas, latency, size.

Latency is measured in one process with the same thread count, each model as a
deployment serving a stream runs it, in steady-state blocks that take turns (so
every model sees the same machine state; `measure_latency`): batch-1 median and
p90 over repeated runs, and batched throughput in images/s.

`compare_profiles` quantizes one FP32 model once per NPU profile (and fusion)
and puts FP32 and every INT8 variant in one such table. Latency there is ORT's
x86 speed of the simulated graph, not the NPU's.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .calibration import scored_overlap
from .data.dataset import image_files, load_data_yaml, read_image
from .data.preprocess import letterbox, to_input
from .errors import QbenchError
from .evaluation import RESAMPLES, EvalSettings, delta_interval, evaluate
from .files import scratch, write_json
from .graph.qdq import quantize_nodes
from .quantization import apply_profile, load_profile, load_recipe, quantize_ort
from .runtime import RUNTIME_NAMES, Detector, check_runtime, default_threads, int8_host, open_model, runtime_versions

METRICS = ("precision", "recall", "mAP50", "mAP50-95")


def measure_latency(dets: dict[str, Detector], sample: np.ndarray, batch: int = 16, rounds: int = 20,
                    warmup: int = 3, block: int = 3) -> dict:
    """{name: {batch1_median_ms, batch1_p90_ms, batch{B}_images_per_s}} for each open model.

    Each model runs as a deployment serving a stream of images runs it (`Detector.timed_forward`: ONNX Runtime's
    worker threads spin between runs, its default) and is timed in steady state: about `rounds` timed runs each, in
    blocks of `block` that follow one untimed run (its threads wake, the previous model's settle), the models'
    blocks in turn, so slow drift of a shared machine hits every model alike. Timing single runs of sessions whose
    threads sleep between runs, as qbench did before, made ONNX Runtime slower than it serves a stream (paired, at
    640 on the 2-core Xeon: FP32 about 3%, INT8 about 11%; results/bench/ort-spinning), its speedups of other
    runtimes against it that much too high, and its own INT8's too low."""
    x1 = sample[:1]
    xb = np.repeat(sample[:1], batch, axis=0)
    fwd = {k: det.timed_forward() for k, det in dets.items()}

    def run_batch(k):  # a static batch-1 model (e.g. ultralytics' INT8 export) takes the batch image by image
        if dets[k].dynamic_batch:
            fwd[k](xb)
        else:
            for i in range(batch):
                fwd[k](xb[i:i + 1])

    for k in dets:
        for _ in range(warmup):
            fwd[k](x1)
        run_batch(k)
    t1 = {k: [] for k in dets}
    tb = {k: [] for k in dets}
    for _ in range(max(1, -(-rounds // block))):
        for k in dets:
            fwd[k](x1)
            for _ in range(block):
                t = time.perf_counter()
                fwd[k](x1)
                t1[k].append(time.perf_counter() - t)
    for _ in range(max(3, rounds // 5)):
        for k in dets:
            fwd[k](x1)
            t = time.perf_counter()
            run_batch(k)
            tb[k].append(time.perf_counter() - t)
    out = {}
    for k in dets:
        s = sorted(t1[k])
        out[k] = {"batch1_median_ms": round(1000 * statistics.median(s), 2),
                  "batch1_p90_ms": round(1000 * s[int(0.9 * (len(s) - 1))], 2),
                  f"batch{batch}_images_per_s": round(batch / statistics.median(tb[k]), 1)}
    return out


def compare(fp32: str | Path, int8: str | Path | None, data: str | Path, settings: EvalSettings = EvalSettings(),
            progress: bool = False, extra: dict[str, Path] | None = None, rounds: int = 20,
            keep_stats: bool = False, runtimes: dict[str, str] | None = None) -> dict:
    """Evaluate FP32, INT8 (and any `extra` models; int8 None: only those) the same way; deltas are against FP32.

    Each .onnx runs on `settings.runtime`, or on `runtimes[name]` (e.g. an INT8 model on OpenVINO against the
    FP32 model on ONNX Runtime); every row records its runtime, and accuracy and latency both come from it.
    keep_stats: also return every model's per-image matches under "image_stats" (not JSON; for `delta_interval`
    between two of the models)."""

    if Path(fp32).suffix.lower() == ".onnx" and Path(fp32).is_file() and (n := quantize_nodes(fp32)):
        raise QbenchError(f"'{fp32}' is already quantized ({n} quantization nodes), so it cannot be the FP32 "
                          "reference; pass the FP32 model first and the INT8 one second.")
    models = {"fp32": Path(fp32), **({"int8": Path(int8)} if int8 is not None else {}),
              **{k: Path(v) for k, v in (extra or {}).items()}}
    threads = settings.threads or default_threads()
    runtime_of = {k: check_runtime((runtimes or {}).get(k, settings.runtime)) for k in models}
    dets = {k: open_model(p, threads, runtime_of[k]) for k, p in models.items()}  # one session each, for both uses
    results = {k: evaluate(det, data, settings, progress=progress, keep_stats=True) for k, det in dets.items()}
    stats = {k: r.pop("image_stats") for k, r in results.items()}
    spec = load_data_yaml(data, require=(settings.split,))
    imgsz = results["fp32"]["settings"]["imgsz"]
    img, _ = letterbox(read_image(image_files(spec, settings.split)[0]), imgsz)
    latency = measure_latency(dets, to_input([img]), batch=settings.batch, rounds=rounds)
    base = results["fp32"]
    rows = {}
    for k, r in results.items():
        rows[k] = {
            "model": str(models[k]),
            "runtime": dets[k].runtime,
            "metrics": r["metrics"],
            "delta": {m: r["metrics"][m] - base["metrics"][m] for m in METRICS},
            # paired bootstrap over the images: what these images can resolve (see evaluate.delta_interval)
            "delta_ci95": {"mAP50-95": None if k == "fp32" else delta_interval(stats["fp32"], stats[k])},
            "per_class": [{"class": c["class"], "mAP50-95": c["mAP50-95"],
                           "delta_mAP50-95": (None if c["mAP50-95"] is None or b["mAP50-95"] is None
                                              else c["mAP50-95"] - b["mAP50-95"])}
                          for c, b in zip(r["per_class"], base["per_class"])],
            "latency": latency[k],
            "size_mb": round(models[k].stat().st_size / 2**20, 2),
            **({"runtime_caveat": dets[k].caveat} if dets[k].caveat else {}),
        }
    for k in rows:
        rows[k]["speedup_batch1"] = round(latency["fp32"]["batch1_median_ms"] / latency[k]["batch1_median_ms"], 3)
    out = {"data": base["data"], "settings": base["settings"], "threads": threads, "host": int8_host(),
           "runtimes": runtime_versions(d.runtime for d in dets.values()), "models": rows, "evaluations": results}
    if keep_stats:
        out["image_stats"] = stats
    return out


def compare_profiles(fp32: str | Path, data: str | Path, calib: str | os.PathLike | Sequence,
                     profiles: Sequence[str | os.PathLike], recipe: str | os.PathLike | None = None,
                     fusions: Sequence[str] | None = None, out: str | Path | None = None,
                     settings: EvalSettings = EvalSettings(), progress: bool = False,
                     allow_scored_calib: bool = False) -> dict:
    """Quantize `fp32` once per profile (x each of `fusions`; None: the profile's own activation_fusion), then
    evaluate FP32 and every variant with `compare`. Rows are named 'int8[PROFILE,FUSION]'.

    Each variant goes to out/PROFILE-FUSION/ (int8.onnx, recipe.yaml, quantize.json); without `out` to a temporary
    folder removed afterwards. The result is `compare`'s, plus 'variants': per row the recipe applied and what
    the constraints changed.
    """

    if not profiles:
        raise QbenchError("no profile to compare; pass at least one, e.g. --profile cpu --profile npu-symmetric.")

    variants = profile_variants(recipe, profiles, fusions)  # everything validated before the first quantization
    overlap = scored_overlap(calib, data, settings.split, allow_scored_calib,
                             max(r.calib_size for _, r in variants.values()))
    with scratch("profiles") as tmp:
        root = Path(out) if out is not None else Path(tmp)
        models, info = quantize_variants(fp32, calib, variants, root, progress=progress, keep=out is not None,
                                         u8_activations=settings.runtime == "openvino")
        c = compare(fp32, None, data, settings, progress=progress, extra=models)
    c["variants"] = info
    c["calibration_check"] = overlap
    return c


def profile_variants(recipe, profiles: Sequence[str | os.PathLike], fusions: Sequence[str] | None = None) -> dict:
    """{row name 'int8[PROFILE,FUSION]': (folder 'PROFILE-FUSION', Recipe)} for each profile x fusion."""

    base = load_recipe(recipe)
    variants = {}
    for p in profiles:
        prof = load_profile(p)
        for fusion in fusions or [None]:
            rec = apply_profile(base, prof, fusion)
            row = f"int8[{prof.name},{rec.activation_fusion}]"
            if row in variants:
                raise QbenchError(f"{row} is asked for twice; pass each profile once.")
            variants[row] = (f"{prof.name}-{rec.activation_fusion}", rec)
    return variants


def quantize_variants(fp32: str | Path, calib, variants: dict, root: Path, progress: bool = False,
                      keep: bool = True, u8_activations: bool = False) -> tuple[dict[str, Path], dict]:
    """Quantize `fp32` once per variant into root/FOLDER/ (int8.onnx, recipe.yaml, quantize.json); returns the
    models by row name and, per row, the recipe applied and what its constraints changed. u8_activations: int8
    activations stored as uint8 with zero point + 128 (the same values), as OpenVINO needs (runtime.openvino_caveat)."""

    models, info = {}, {}
    for row, (folder, rec) in variants.items():
        model = Path(root) / folder / "int8.onnx"
        report = quantize_ort(fp32, model, rec, calib, progress=progress, u8_activations=u8_activations)
        write_json(report, model.with_name("quantize.json"))
        models[row] = model
        info[row] = {"recipe": rec.name, "folder": folder if keep else None, "settings": rec.to_dict(),
                     "constraints": report["constraints"], "qlinear_ops": report["qlinear_ops"],
                     "sanity": report.get("sanity")}
    return models, info


def ci_text(row: dict) -> str:
    """'[-0.0246, +0.0021]' for a compare row with a bootstrap interval, '—' otherwise (FP32, older files)."""
    ci = (row.get("delta_ci95") or {}).get("mAP50-95")
    return "—" if not ci else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def compare_md(c: dict) -> str:
    s = c["settings"]
    b = f"batch{s['batch']}_images_per_s"
    lines = [f"{c['data']['images']} images of `{c['data']['yaml']}` ({c['data']['split']}), imgsz {s['imgsz']}, "
             f"conf {s['conf']}, iou {s['iou']}, {c['threads']} threads."]
    if c.get("host"):  # files written before qbench recorded it have none
        ort = "ort" in (c.get("runtimes") or {"ort": ""})
        kernels = f"; ONNX Runtime int8 kernels: {c['host']['int8_kernels']}." if ort else "."
        lines.append(f"CPU: {cpu_text(c['host'])}{kernels}")
    if c.get("runtimes"):
        lines.append(f"Runtime: {', '.join(c['runtimes'].values())}"
                     + ("; each model's in its row." if len(c["runtimes"]) > 1 else "."))
    lines += ["", f"| model | P | R | mAP50 | mAP50-95 | Δ mAP50-95 | Δ 95% CI | batch-1 ms (median) | speedup | "
              f"batch-{s['batch']} img/s | size MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in c["models"].items():
        m, lat = r["metrics"], r["latency"]
        d = "—" if k == "fp32" else f"{r['delta']['mAP50-95']:+.4f}"
        name = f"{k} ({r['runtime']})" if len(c.get("runtimes") or {}) > 1 else k
        lines.append(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['mAP50']:.4f} | {m['mAP50-95']:.4f} | "
                     f"{d} | {ci_text(r)} | {lat['batch1_median_ms']:.1f} | {r['speedup_batch1']:.2f}x | "
                     f"{lat[b]:.1f} | {r['size_mb']:.1f} |")
    lines += ["", f"Δ 95% CI: paired bootstrap over the images ({RESAMPLES} resamples); an interval holding 0 is a "
              "difference these images do not resolve."]
    lines += caveat_lines({k: r.get("runtime_caveat") for k, r in c["models"].items()})
    names = [p["class"] for p in c["models"]["fp32"]["per_class"]]
    lines += ["", "| class | " + " | ".join(f"{k} mAP50-95" for k in c["models"]) + " |",
              "|---|" + "---|" * len(c["models"])]
    for i, name in enumerate(names):
        cells = []
        for k, r in c["models"].items():
            v = r["per_class"][i]
            cell = "-" if v["mAP50-95"] is None else f"{v['mAP50-95']:.3f}"
            if k != "fp32" and v["delta_mAP50-95"] is not None:
                cell += f" ({v['delta_mAP50-95']:+.3f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if c.get("variants"):
        lines += ["", "| model | recipe | activations | pow2 scales | Conv->activation Q/DQ removed | QLinearConv "
                  "(ONNX Runtime, x86) |", "|---|---|---|---|---|---|"]
        for k, v in c["variants"].items():
            st, con = v["settings"], v["constraints"]
            acts = f"{st['activation_type']} {'symmetric' if st['activation_symmetric'] else 'asymmetric'}"
            acts += " (stored as uint8 + 128)" if (con.get("u8_activations") or {}).get("zero_points") else ""
            lines.append(f"| {k} | {v['recipe']} | {acts} | {'yes' if con['pow2_scales'] else 'no'} | "
                         f"{con.get('qdq_pairs_removed', 0)} | {v['qlinear_ops'].get('QLinearConv', 0)} |")
        ran = sorted({RUNTIME_NAMES.get(c["models"][k].get("runtime", "ort"), "ONNX Runtime")
                      for k in c["variants"] if k in c["models"]}) or ["ONNX Runtime (CPU EP)"]
        off = [k for k in c["variants"] if c["models"].get(k, {}).get("runtime_caveat")]
        lines += ["", f"Accuracy is the profile's{' (except ' + ', '.join(off) + ': see the warning)' if off else ''}; "
                  f"latency is {' and '.join(ran)} on this CPU running the QDQ graph, not an NPU's."]
    lines += sanity_lines({**({"int8": c["sanity"]} if c.get("sanity") else {}),
                           **{k: v.get("sanity") for k, v in c.get("variants", {}).items()}})
    return "\n".join(lines) + "\n"


def cpu_text(host: dict) -> str:
    """'Intel(R) Xeon(R) Processor (AVX-512, VNNI, bf16)': the CPU of a host record (`runtime.int8_host`) with its
    int8-relevant extensions where it names them (records written before qbench did, do not)."""
    return host["cpu"] + (f" ({host['isa']})" if host.get("isa") else "")


def caveat_lines(caveats: dict) -> list[str]:
    """Warnings for models whose runtime's numbers are not the model's (runtime.openvino_caveat; ONNX Runtime's exact
    int8 mode refusing a model on a CPU without VNNI: runtime.ort_session), one line each."""
    return [line for k, v in caveats.items() if v for line in ("", f"**Warning: {k}'s numbers are its runtime's, not "
                                                                   f"the model's**: {v}")]


def sanity_lines(sanity: dict) -> list[str]:
    """Warnings for INT8 models whose output quantize_ort found broken (its 'sanity' check), one line each."""
    out = []
    for k, v in sanity.items():
        if v and v.get("flagged"):
            out += ["", f"**Warning: {k} is broken, not merely imprecise**: on {v['images']} calibration images its "
                    f"output is {v['box_sqnr_db']:.1f} dB (boxes) and {v['score_sqnr_db']:.1f} dB (class scores) "
                    "from FP32's; its accuracy above is a failure of this recipe/profile on this model."]
    return out
