"""Ad hoc (docs/runtimes.md, mse section): LeakyReLU-fed Conv outputs get only their negative end searched (hi = observed max); all else min/max.
Run from the repository root: python results/bench/mse-gtsdb4/negative-tail.py neg (it monkeypatches qbench's mse search; output: negative-tail.txt)."""
import sys, json
from pathlib import Path
import numpy as np
import qbench.quantization.ort_engine as oe
from qbench.quantization import ranges as R
from qbench.quantization import load_recipe, quantize_ort
from qbench.calibration import load_manifest
from qbench.evaluation import EvalSettings, delta_interval, evaluate

MODE = sys.argv[1]  # neg | negpos
def variant(histograms, kinds, symmetric, levels):
    out, summ = {}, {"tensors": 0, "moved": 0}
    for name, h in histograms.items():
        hist, edges, mn, mx = h[0], h[1], float(h[2]), float(h[3])
        kind = kinds.get(name, ("identity",))
        if kind[0] == "leaky" and mn < 0:
            n = np.asarray(hist, np.float64); e = np.asarray(edges, np.float64)
            keep = n > 0; c, n = ((e[:-1] + e[1:]) / 2)[keep], n[keep]
            f, df = R._function(kind); fc, w = f(c), n * df(c) ** 2
            cum_w = np.concatenate([[0.0], np.cumsum(w)])
            los = mn * np.concatenate([[0.0], np.arange(1, 129) / 128]); hi = mx
            clip = ((c[None, :] < los[:, None]) * n * (fc[None, :] - f(los)[:, None]) ** 2).sum(1)
            step = (hi - los) / levels
            inside = cum_w[np.searchsorted(c, hi, side="right")] - cum_w[np.searchsorted(c, los, side="left")]
            err = clip + step ** 2 / 12 * inside
            lo = float(los[int(np.argmin(err))])
            summ["moved"] += int(lo > mn * (1 - 1e-6))
            out[name] = (lo, mx)
        else:
            out[name] = (mn, mx)
        summ["tensors"] += 1
    print("variant summary", summ, flush=True)
    return out, summ
oe.mse_ranges = variant

fp32 = Path("results/runs/gtsdb4-l3-leaky-640/fp32.onnx")
_, paths = load_manifest("calibration/gtsdb4-train-512.json")
tmp = Path("/tmp/x/neg"); s = EvalSettings(batch=16)
q = {}
for m in ["minmax", "mse"]:
    rec = load_recipe("default").replace(method=m, calib_size=128)
    quantize_ort(fp32, tmp / m / "int8.onnx", rec, paths)
res = {}
for data in ["../shared/datasets/gtsdb4/data.yaml", "configs/data/gtsdb4-heldout.yaml"]:
    f = evaluate(fp32, data, s, keep_stats=True); fs = f.pop("image_stats")
    r = {}
    for m in ["minmax", "mse"]:
        x = evaluate(tmp / m / "int8.onnx", data, s, keep_stats=True); r[m] = (x["metrics"]["mAP50-95"], x.pop("image_stats"))
        print(data, m, "delta", r[m][0] - f["metrics"]["mAP50-95"], delta_interval(fs, r[m][1]), flush=True)
    print(data, "variant-minmax", r["mse"][0] - r["minmax"][0], delta_interval(r["minmax"][1], r["mse"][1]), flush=True)
