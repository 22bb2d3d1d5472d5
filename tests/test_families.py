"""Every flow on every YOLO family qbench accepts: stock YOLO11n (SiLU, C3k2, C2PSA attention) and stock YOLOv8n
(SiLU, C2f), beside the level-3 LeakyReLU model the other tests use. The models are the committed synthetic-set
reference models (`results/training/synth-<family>-320`, trained by `qbench train <family>.yaml` on the embedded
set), run at imgsz 160 on a tiny synthetic split: run -> inspect -> report -> QAT, the recipes that do not apply
refused, and QAT's self-checks (a broken fake-quant placement refused, naming the tensor)."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from qbench.errors import QbenchError

pytestmark = pytest.mark.slow  # real quantization/training/evaluation: minutes; CI runs it, `-m "not slow"` skips it

IMGSZ = 160
FAMILIES = ("yolo11n", "yolov8n")


def weights_of(family: str):
    w = REPO / "results" / "training" / f"synth-{family}-320" / "weights" / "best.pt"
    assert w.is_file(), f"the committed {family} reference model is missing: {w}"
    return w


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, tmp_path_factory, synth_small):
    """A `qbench run` (recipe default + the npu-symmetric profile, both fusions) of a stock family, inspected."""
    from qbench.analysis import inspect_run
    from qbench.pipeline import run

    out = run(weights=weights_of(request.param), data=synth_small, imgsz=IMGSZ,
              out=tmp_path_factory.mktemp(request.param) / "run", profiles=["npu-symmetric"],
              fusions=["fused", "unfused"])
    inspect_run(out, images=8, error_images=4)
    return request.param, out


@pytest.mark.slow
def test_run_inspect_report_speak_of_the_models_own_activations(family_run):
    from qbench.report.render import report

    family, out = family_run
    ins = json.loads((out / "inspect.json").read_text())
    s = ins["summary"]
    assert s["activations"]["SiLU"] > 50 and "LeakyRelu" not in s["activations"]
    assert s["leaky_relus"] == 0 and s["silus"] == s["activations"]["SiLU"] and s["unfused_silus"] == s["silus"]
    assert (out / "silu.csv").is_file() and not (out / "leaky.csv").exists()
    assert all(r["sqnr_fused_db"] >= r["sqnr_actual_db"] - 0.5 for r in ins["silu"])  # fusing costs nothing
    assert (s["attention_tensors"] > 5) == (family == "yolo11n")  # C2PSA's MatMul/Softmax tensors
    report([out])
    md = (out / "summary.md").read_text()
    assert "## SiLU diagnostics" in md and "LeakyReLU diagnostics" not in md and "0 of 0" not in md
    assert ("## Attention blocks" in md) == (family == "yolo11n")
    todo = md.split("## What to do", 1)[1].split("\n## ", 1)[0]
    assert "fused Conv+activation layout" in todo and "int8[npu-symmetric,fused]: Δ mAP50-95" in todo
    assert "mixed precision (--max-drop)" in todo and "quantization-aware training" in todo
    assert "Not here: recipe equalize" in todo and "Not here: recipe shift-negative" in todo
    assert "**recipe equalize**" not in todo and "**recipe shift-negative**" not in todo
    assert "dots: SiLU outputs" not in md  # the chart's caption lives in the HTML only
    assert "SiLU" in (out / "report.html").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("recipe,needle", [("equalize", "Conv -> ReLU/LeakyReLU -> Conv chains"),
                                           ("shift-negative", "shifts LeakyReLU outputs")])
def test_recipes_that_change_nothing_are_refused(family_run, tmp_path, calib, recipe, needle):
    from qbench.quantization import apply_profile, quantize_ort

    _, out = family_run
    rec = apply_profile(recipe, "npu-symmetric" if recipe == "shift-negative" else None, None)
    with pytest.raises(QbenchError, match=needle) as e:
        quantize_ort(out / "fp32.onnx", tmp_path / "int8.onnx", rec, calib)
    assert "SiLU x" in str(e.value) and not (tmp_path / "int8.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_qat_holds_on_stock_families(family, tmp_path, synth_small):
    """One short QAT epoch: the fake-quant model computes what the PTQ ONNX computes before training (tensor by
    tensor), the exported QAT model what the trained fake-quant model computes, the first batches' loss is near the
    checkpoint's own, and QAT does not score below PTQ beyond what these images resolve."""
    from qbench.qatrain import qat

    r = qat(weights_of(family), synth_small, tmp_path / "qat", epochs=1, imgsz=IMGSZ, batch=4, workers=0)
    c = r["checks"]
    assert r["placement"]["unmapped"] == [] and r["placement"]["tapped"] > 50  # every SiLU's Sigmoid, attention
    # tensor by tensor (PyTorch continuing from ORT's value of each), every tensor and the output agree: a rare
    # one-code rounding step, never a tensor computed differently
    for k in ("before_training", "exported"):
        assert c[k]["min_tensor_db"] >= 40 and min(c[k]["output_per_tensor"].values()) >= 60, c[k]
    # free-running, such steps spread (free scales): PyTorch matches ORT's fused int8 kernels as closely as
    # ORT's QDQ simulation of the same ONNX does (measured 44.4 vs 44.3 dB on yolo11n, 47.5 vs 49.8 on yolov8n), and far closer than the
    # same weights without fake quantization
    m = r["onnx_vs_torch"]
    assert m["ort_optimized"]["sqnr_db"] >= m["ort_self"]["sqnr_db"] - 6 and m["ort_optimized"]["sqnr_db"] >= 30, m
    assert m["ort_optimized"]["sqnr_db"] > m["baseline_float_torch"]["sqnr_db"] + 3, m
    g = c["loss_guard"]
    assert g["first_batches"]["total"] < 2.5 * g["reference"]["total"], g
    assert c["int8_weight_codes"]["changed"] > 0
    lo, hi = r["compare"]["qat_minus_ptq_ci95"]
    assert hi >= 0, (r["compare"]["qat_minus_ptq"], lo, hi)  # not resolvably worse than PTQ
    assert (tmp_path / "qat" / "qat.json").is_file() and (tmp_path / "qat" / "summary.md").is_file()


@pytest.mark.slow
def test_a_broken_fake_quant_placement_is_refused_naming_the_tensor(tmp_path, synth_small, monkeypatch):
    """The placement that destroyed stock YOLO11n's QAT (each SiLU's Sigmoid quantizer, range [0, 1], hooked on its
    whole Conv block) is refused before training, naming the first tensor that differs; no qat.json."""
    import qbench.qatrain.run as qat_run
    from qbench.qatrain import OutputFakeQuant, qat

    prepare = qat_run.prepare_qat

    def broken(model, qmodel, recipe, **kw):
        p = prepare(model, qmodel, recipe, **kw)
        for t in p["taps"]:
            if t["role"] == "sigmoid":
                block = model.get_submodule(t["module"].rsplit(".", 1)[0])
                block.register_forward_hook(OutputFakeQuant((t["scale"], t["zero_point"], 0, 255), t["tensor"]))
        return p

    monkeypatch.setattr(qat_run, "prepare_qat", broken)
    with pytest.raises(QbenchError, match=r"'/model\.0/act/Sigmoid_output_0' \(made by /model\.0/act/Sigmoid\)"):
        qat(weights_of("yolo11n"), synth_small, tmp_path / "qat", epochs=1, imgsz=IMGSZ, batch=4, workers=0)
    assert not (tmp_path / "qat" / "qat.json").exists() and not (tmp_path / "qat" / "train").exists()


@pytest.mark.slow
def test_sensitivity_and_max_drop_on_a_stock_family(family_run, tmp_path, calib, synth_small):
    from qbench.analysis.sensitivity import layer_sensitivity
    from qbench.calibration import load_manifest
    from qbench.mixed import quantize_max_drop

    family, out = family_run
    if family != "yolov8n":
        pytest.skip("one family is enough for the search itself")
    _, paths = load_manifest(calib)
    s = layer_sensitivity(out / "fp32.onnx", out / "int8.onnx", paths[:4], None, out=tmp_path / "sens")
    assert s["proxy"]["layers"] > 50 and len(s["layers"]) == s["proxy"]["layers"]
    mix = quantize_max_drop(out / "fp32.onnx", tmp_path / "mixed" / "int8.onnx", "default", calib, synth_small,
                            max_drop=100.0)  # a budget the all-INT8 model meets: the search stops at once
    assert mix["met"] and mix["float_layers"] == [] and (tmp_path / "mixed" / "int8.onnx").is_file()


@pytest.mark.slow
def test_the_inc_engine_on_stock_yolo11n(tmp_path, calib, synth_small):
    """Intel Neural Compressor tunes stock YOLO11n (C2PSA attention included) to an ONNX ORT runs in int8."""
    import qbench

    q = qbench.quantize(weights_of("yolo11n"), tmp_path / "inc" / "int8.onnx", qbench.IncConfig(max_trials=1),
                        calib=calib, data=synth_small)
    assert q.engine == "inc" and q.model.is_file() and q.report["graph"]["qlinearconv"] > 50


@pytest.mark.slow
def test_mse_ranges_on_stock_families(family_run, tmp_path, calib):
    """The consumer-aware ranges know SiLU (Sigmoid·Mul) and leave attention's tensors plain; the INT8 model they
    make passes the output sanity check against FP32."""
    from qbench.quantization import quantize_ort

    family, out = family_run
    silus = json.loads((out / "inspect.json").read_text())["summary"]["silus"]
    rep = quantize_ort(out / "fp32.onnx", tmp_path / "int8.onnx", "mse", calib)
    found = rep["calibration"]["consumer_aware_ranges"]["by_consumer"]
    assert found["silu"] == silus and "leaky" not in found and found["identity"] > 20
    assert not rep["sanity"]["flagged"], rep["sanity"]
