"""Per-layer FP32 fallback (graph edits), sensitivity and accuracy-aware mixed precision: the committed default
model, real ONNX Runtime quantization, sessions and evaluation, the real CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import run_cli

from qbench.analysis.sensitivity import layer_sensitivity, output_error, ranking, spearman
from qbench.calibration import load_manifest
from qbench.errors import QbenchError
from qbench.evaluation import EvalSettings, evaluate
from qbench.mixed import quantize_max_drop
from qbench.quantization import recipe_from_dict
from qbench.quantization.fallback import all_edges, bypass, conv_layers, keep_float, keep_int16, quantize_only
from qbench.quantization.inc_engine import optimized_op_counts
from qbench.runtime import ort_session

pytestmark = pytest.mark.slow  # real quantization/training/evaluation: minutes; CI runs it, `-m "not slow"` skips it

# percentile 90 clips every activation hard: a drop large enough to test budgets with
CLIPPING = {"method": "percentile", "percentile": 90.0, "calib_size": 12}


def _run(model, x):
    sess = ort_session(model.SerializeToString() if not isinstance(model, bytes) else model, threads=2)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def models(small_run):
    from qbench.data.preprocess import to_input

    fp32, int8 = onnx.load(str(small_run / "fp32.onnx")), onnx.load(str(small_run / "int8.onnx"))
    rng = np.random.default_rng(0)
    x = to_input([rng.integers(0, 255, (320, 320, 3), dtype=np.uint8) for _ in range(2)])
    return fp32, int8, x


def test_bypassing_every_quantizer_gives_the_fp32_model_exactly(models):
    fp32, int8, x = models
    ref = _run(fp32, x)
    assert np.array_equal(_run(bypass(int8, all_edges(int8), fp32), x), ref)
    assert not np.array_equal(_run(int8, x), ref)


def test_keep_float_turns_exactly_those_convs_back_to_float(models, tmp_path):
    fp32, int8, x = models
    layers = conv_layers(int8)
    assert len(layers) == 63  # every Conv of the level-3 model but the DFL's fixed one
    assert all(layer.macs > 0 for layer in layers)
    p = tmp_path / "int8.onnx"
    onnx.save(int8, str(p))
    before = optimized_op_counts(p)
    picked = [layers[3], layers[20]]  # two backbone/neck convs ORT runs as QLinearConv
    edited = keep_float(int8, fp32, picked)
    q = tmp_path / "mixed.onnx"
    onnx.save(edited, str(q))
    after = optimized_op_counts(q)
    assert after["QLinearConv"] == before["QLinearConv"] - 2
    assert {layer.name for layer in conv_layers(edited)} == {layer.name for layer in layers} - {x.name for x in picked}
    # the float convs read the FP32 model's own weights
    w = {t.name: t for t in edited.graph.initializer}
    f = {t.name: t for t in fp32.graph.initializer}
    conv = next(n for n in edited.graph.node if n.name == picked[0].name)
    assert np.array_equal(onnx.numpy_helper.to_array(w[conv.input[1]]),
                          onnx.numpy_helper.to_array(f[picked[0].weight]))
    # fewer quantizers, less error than all-INT8; quantizing one layer alone is far closer to FP32 than all of them
    ref = _run(fp32, x)
    e_all = output_error(_run(int8, x), ref)
    assert output_error(_run(keep_float(int8, fp32, layers), x), ref) < e_all
    assert 0 < output_error(_run(quantize_only(int8, fp32, layers[3]), x), ref) < e_all
    with pytest.raises(KeyError):
        keep_float(int8, fp32, ["/not/a/conv"])


def _dq_of(model, node_name: str, k: int):
    producer = {o: n for n in model.graph.node for o in n.output}
    conv = next(n for n in model.graph.node if n.name == node_name)
    return producer[conv.input[k]]


@pytest.mark.parametrize("variant", ["int8.onnx", "profiles/npu-symmetric-fused/int8.onnx"])
def test_keep_int16_puts_exactly_those_convs_on_a_16_bit_grid(small_run, models, tmp_path, variant):
    fp32, _, x = models
    int8 = onnx.load(str(small_run / variant))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in int8.graph.initializer}
    layers = conv_layers(int8)
    picked = [layers[3], layers[20]]
    edited = keep_int16(int8, fp32, picked)
    p, q = tmp_path / "int8.onnx", tmp_path / "int16.onnx"
    onnx.save(int8, str(p))
    onnx.save(edited, str(q))
    if variant == "int8.onnx":  # (ORT runs few s8s8 convs as QLinearConv: the count says little there)
        assert optimized_op_counts(q)["QLinearConv"] == optimized_op_counts(p)["QLinearConv"] - 2
    new = {t.name: onnx.numpy_helper.to_array(t) for t in edited.graph.initializer}
    for layer in picked:
        a8, a16 = _dq_of(int8, layer.name, 0), _dq_of(edited, layer.name, 0)
        assert a16.domain == "com.microsoft"
        s8, z8, s16, z16 = inits[a8.input[1]], inits[a8.input[2]], new[a16.input[1]], new[a16.input[2]]
        if variant == "int8.onnx":  # asymmetric uint8 -> uint16 over the same range
            assert z8.dtype == np.uint8 and z16.dtype == np.uint16 and int(z16) == 257 * int(z8)
            assert np.isclose(s16 * 257, s8, rtol=1e-6)
        else:  # symmetric int8 -> symmetric int16, zero point still 0
            assert z8.dtype == np.int8 and z16.dtype == np.int16 and int(z16) == 0 == int(z8)
            assert s16 * 256 == s8
        w16 = _dq_of(edited, layer.name, 1)
        wq, ws = new[w16.input[0]], new[w16.input[1]]
        assert wq.dtype == np.int16 and np.abs(wq).max() == 32767 and ws.shape == (wq.shape[0],)
        f = {t.name: t for t in fp32.graph.initializer}
        w = onnx.numpy_helper.to_array(f[layer.weight])
        err = np.abs(wq * ws.reshape(-1, 1, 1, 1) - w).reshape(len(ws), -1).max(axis=1)
        assert np.all(err <= ws / 2 + 1e-7)  # rounding only, per channel
    # the other convs are untouched; 16-bit layers are far closer to FP32 than 8-bit ones, not exact
    assert {x.name for x in conv_layers(edited)} == {x.name for x in layers}
    ref = _run(fp32, x)
    e8 = output_error(_run(int8, x), ref)
    e16 = output_error(_run(keep_int16(int8, fp32, layers), x), ref)
    e_float = output_error(_run(keep_float(int8, fp32, layers), x), ref)
    assert e_float < e16 < 0.5 * e8, (e_float, e16, e8)  # (the non-conv quantizers stay int8)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    assert spearman([1, 2], [1, 2]) is None
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.949, abs=1e-3)


def test_sensitivity_ranks_every_layer_and_measures_the_top_k(small_run, synth_small, tmp_path):
    _, paths = load_manifest(small_run / "calibration.json")
    r = layer_sensitivity(small_run / "fp32.onnx", small_run / "int8.onnx", paths[:2], synth_small, top_k=3,
                          settings=EvalSettings(), out=tmp_path)
    rows = r["layers"]
    assert len(rows) == 63 == r["proxy"]["layers"]
    assert [row["rank"] for row in rows] == list(range(1, 64))
    rec = [row["proxy_recovery"] for row in rows]
    assert rec == sorted(rec, reverse=True) and rec[0] > 0
    assert all(row["proxy_damage"] > 0 for row in rows)
    assert r["proxy"]["forward_passes"] == 2 * (2 * 63 + 2)
    measured = [row for row in rows if row["map_recovery"] is not None]
    assert [row["rank"] for row in measured] == [1, 2, 3] and all(row["map_damage"] is not None for row in measured)
    assert r["map"]["evaluations"] == 8
    # the mAP numbers are real evaluations: the recovery of the first layer is its keep-float model's mAP - INT8's
    fp32, int8 = onnx.load(str(small_run / "fp32.onnx")), onnx.load(str(small_run / "int8.onnx"))
    p = tmp_path / "check.onnx"
    onnx.save(keep_float(int8, fp32, [rows[0]["layer"]]), str(p))
    m = evaluate(p, synth_small)["metrics"]["mAP50-95"]
    assert m - r["map"]["int8_mAP50-95"] == pytest.approx(rows[0]["map_recovery"], abs=2e-5)
    csv_rows = (tmp_path / "sensitivity.csv").read_text().splitlines()
    assert len(csv_rows) == 64 and csv_rows[0].startswith("rank,layer,module")
    assert json.loads((tmp_path / "sensitivity.json").read_text())["layers"][0]["layer"] == rows[0]["layer"]
    order = ranking(r)
    assert sorted(order) == sorted(row["layer"] for row in rows)
    helped = [row["layer"] for row in measured if row["map_recovery"] > 0]
    assert order[:len(helped)] == sorted(helped, key=lambda n: -next(x["map_recovery"] for x in rows
                                                                     if x["layer"] == n))


@pytest.fixture(scope="module")
def clipping(small_run):
    """The calibration manifest of the small run (the clipping recipe quantizes with it)."""
    return small_run / "calibration.json"


def test_max_drop_met_without_fallback_writes_the_all_int8_model(small_run, synth_small, clipping, tmp_path):
    out = tmp_path / "m" / "int8.onnx"
    r = quantize_max_drop(small_run / "fp32.onnx", out, recipe_from_dict(CLIPPING), clipping, synth_small, 100.0)
    assert r["met"] and r["float_layers"] == [] and len(r["trials"]) == 1
    assert out.is_file() and (out.parent / "recipe.yaml").is_file()
    assert not (out.parent / "sensitivity.json").exists()  # nothing to rank when the budget holds
    assert json.loads((out.parent / "mixed.json").read_text())["met"] is True
    assert set(r["latency"]) == {"fp32", "int8", "mixed"}
    m = evaluate(out, synth_small)["metrics"]["mAP50-95"]
    assert m == pytest.approx(r["int8_mAP50-95"], abs=1e-5)
    assert r["drop_points"]["int8"] > 1.0  # the clipping recipe does lose accuracy here
    lo, hi = r["drop_points_ci95"]["int8"]
    assert lo <= hi and r["drop_points_ci95"]["mixed"] == [lo, hi]  # no layer fell back: the same model
    assert r["mixed_minus_int8_points_ci95"] == [0.0, 0.0]


@pytest.mark.parametrize("equalize", [0.0, 0.5])  # equalized: layers fall back to the equalized FP32 weights
def test_max_drop_falls_back_layers_or_says_it_cannot(small_run, synth_small, clipping, tmp_path, equalize):
    out = tmp_path / "m" / "int8.onnx"
    fp32 = small_run / "fp32.onnx"
    try:
        r = quantize_max_drop(fp32, out, recipe_from_dict({**CLIPPING, "equalize": equalize}), clipping,
                              synth_small, 0.5, max_float=3, proxy_images=2, top_k=2)
    except QbenchError as e:
        assert "cannot be met within 3 FP32 layers" in str(e)
        assert not out.exists() and not list(out.parent.glob("*.onnx"))
        r = json.loads((out.parent / "mixed.json").read_text())
        assert r["met"] is False and len(r["float_layers"]) <= 3
    else:
        assert r["met"] and 1 <= len(r["float_layers"]) <= 3
        assert r["drop_points"]["mixed"] <= 0.5 < r["drop_points"]["int8"]
        m = evaluate(out, synth_small)["metrics"]["mAP50-95"]
        assert m == pytest.approx(r["mixed_mAP50-95"], abs=1e-5)
        names = {x.name for x in conv_layers(onnx.load(str(out)))}
        assert not names & {f["layer"] for f in r["float_layers"]}
        assert out.with_name("fp32-prepared.onnx").is_file() == bool(equalize)  # what inspect compares it with
    assert (out.parent / "sensitivity.csv").is_file()
    kept = [t for t in r["trials"][1:] if t["kept"]]
    assert [t["float_layers"][-1] for t in kept] == [f["layer"] for f in r["float_layers"]]
    maps = [r["trials"][0]["mAP50-95"], *(t["mAP50-95"] for t in kept)]
    assert maps == sorted(maps) and len(set(maps)) == len(maps)  # a layer is kept only when it raised the mAP


def test_max_drop_with_int16_fallback(small_run, synth_small, clipping, tmp_path):
    """INT16 layers take their tensors' full calibrated range, so they undo some of a clipping recipe's damage."""
    out = tmp_path / "m" / "int8.onnx"
    try:
        r = quantize_max_drop(small_run / "fp32.onnx", out, recipe_from_dict({**CLIPPING, "percentile": 99.0}),
                              clipping, synth_small, 0.5, max_float=3,
                              proxy_images=2, top_k=2, fallback="int16")
    except QbenchError as e:
        assert "cannot be met within 3 INT16 layers" in str(e) and "or --fallback float" in str(e)
        r = json.loads((out.parent / "mixed.json").read_text())
        assert not out.exists()
    else:
        assert r["met"] and out.is_file()
        moved = {f["layer"] for f in r["float_layers"]}
        g = onnx.load(str(out)).graph
        producer = {o: n for n in g.node for o in n.output}
        for n in g.node:
            if n.op_type == "Conv" and n.input[0] in producer and producer[n.input[0]].op_type == "DequantizeLinear":
                assert (producer[n.input[0]].domain == "com.microsoft") == (n.name in moved)
        assert evaluate(out, synth_small)["metrics"]["mAP50-95"] == pytest.approx(r["mixed_mAP50-95"], abs=1e-5)
    assert r["fallback"] == "int16" and all(f["precision"] == "int16" for f in r["float_layers"])
    kept = [t for t in r["trials"][1:] if t["kept"]]
    assert len(kept) == len(r["float_layers"]) >= 1, r  # the clipping recipe loses enough for a layer to help
    c = r["cost"]
    assert c["macs"]["moved"] > 0 and c["int8_equivalent_macs"]["mixed"] == c["macs"]["all"] + 3 * c["macs"]["moved"]
    assert c["weight_bytes"]["mixed"] > c["weight_bytes"]["all_int8"] and "host_cpu_macs" not in c
    assert "a model, not a measurement" in c["model"]


def test_max_drop_is_measured_on_the_runtime_that_deploys_the_model(small_run, synth_small, clipping, tmp_path):
    """`quantize --max-drop --runtime openvino`: every model is scored on OpenVINO, the model written is one OpenVINO
    runs right (uint8 activations, from a signed recipe too: runtime.openvino_caveat), and mixed.json says which
    runtime made its numbers. Before, the budget was measured on ONNX Runtime whatever deployed the model."""
    from qbench.runtime import signed_activation_quantizers

    out = tmp_path / "ov" / "int8.onnx"
    signed = recipe_from_dict({**CLIPPING, "activation_type": "int8", "activation_symmetric": True})
    r = quantize_max_drop(small_run / "fp32.onnx", out, signed, clipping, synth_small, 100.0,
                          settings=EvalSettings(runtime="openvino"))
    assert r["met"] and r["float_layers"] == []
    assert r["runtime"] == "openvino" and r["runtimes"]["openvino"].startswith("OpenVINO")
    assert json.loads((out.parent / "mixed.json").read_text())["runtime"] == "openvino"
    assert signed_activation_quantizers(out) == 0
    for model, key in ((small_run / "fp32.onnx", "fp32_mAP50-95"), (out, "int8_mAP50-95")):
        ov = evaluate(model, synth_small, EvalSettings(runtime="openvino"))
        assert "runtime_caveat" not in ov["model"]
        assert ov["metrics"]["mAP50-95"] == pytest.approx(r[key], abs=1e-5), key
    ort_r = quantize_max_drop(small_run / "fp32.onnx", tmp_path / "ort" / "int8.onnx", signed, clipping,
                              synth_small, 100.0)
    assert ort_r["runtime"] == "ort" and signed_activation_quantizers(tmp_path / "ort" / "int8.onnx") > 0


def test_unreachable_budget_is_reported_and_writes_no_model(small_run, synth_small, clipping, tmp_path):
    out = tmp_path / "u" / "int8.onnx"
    with pytest.raises(QbenchError, match="cannot be met within 0 FP32 layers"):
        quantize_max_drop(small_run / "fp32.onnx", out, recipe_from_dict(CLIPPING), clipping, synth_small, 0.01,
                          max_float=0)
    assert not out.exists() and not list(out.parent.glob("*.onnx"))
    assert json.loads((out.parent / "mixed.json").read_text())["met"] is False


def test_cli_sensitivity_and_max_drop_bad_input(small_run, synth_small, tmp_path):
    calib = str(small_run / "calibration.json")
    r = run_cli("quantize", str(small_run / "fp32.onnx"), "--out", str(tmp_path / "a.onnx"), "--calib",
                calib, "--max-drop", "0.3")
    assert r.returncode == 2 and "--max-drop needs --data" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("quantize", str(small_run / "fp32.onnx"), "--out", str(tmp_path / "a.onnx"), "--data",
                str(synth_small), "--max-drop", "-1")
    assert r.returncode == 2 and "must be a number of mAP50-95 points" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("quantize", str(small_run / "fp32.onnx"), "--out", str(tmp_path / "dir"), "--data",
                str(synth_small), "--max-drop", "0.3")
    assert r.returncode == 2 and "is not an .onnx file path" in r.stderr and not (tmp_path / "dir").exists()
    r = run_cli("quantize", str(small_run / "fp32.onnx"), "--out", str(tmp_path / "a.onnx"), "--calib",
                calib, "--max-float", "2")
    assert r.returncode == 2 and "--max-float, --fallback and --runtime only apply with --max-drop" in r.stderr
    r = run_cli("quantize", str(small_run / "fp32.onnx"), "--out", str(tmp_path / "a.onnx"), "--calib",
                calib, "--runtime", "openvino")
    assert r.returncode == 2 and "only apply with --max-drop" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("quantize", str(small_run / "fp32.onnx"), "--out", str(tmp_path / "a.onnx"), "--data",
                str(synth_small), "--max-drop", "0.3", "--runtime", "tflite")
    assert r.returncode == 2 and "tflite" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "a.onnx").exists()
    r = run_cli("quantize", str(small_run / "fp32.onnx"), "--out", str(tmp_path / "a.onnx"), "--data",
                str(synth_small), "--max-drop", "0.3", "--profile", "cpu", "--fallback", "int16")
    assert r.returncode == 2 and "target cpu runs only int8 (its int_types)" in r.stderr
    r = run_cli("quantize", str(small_run / "fp32.onnx"), "--out", str(tmp_path / "a.onnx"), "--data",
                str(synth_small), "--max-drop", "0.3", "--fallback", "int4")
    assert r.returncode == 2 and "--fallback 'int4' is not a precision" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "a.onnx").exists()
    r = run_cli("sensitivity", str(small_run / "fp32.onnx"), str(small_run / "fp32.onnx"), "--calib",
                calib, "--out", str(tmp_path / "s"), "--top-k", "0")
    assert r.returncode == 2 and "no quantized convolution" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("sensitivity", str(small_run / "fp32.onnx"), str(small_run / "int8.onnx"), "--calib",
                calib, "--out", str(tmp_path / "s"), "--images", "1", "--top-k", "0")
    assert r.returncode == 0, r.stderr
    assert "63 quantized convs" in r.stdout and (tmp_path / "s" / "sensitivity.csv").is_file()
    assert len(json.loads((tmp_path / "s" / "sensitivity.json").read_text())["proxy"]["images"]) == 1


def test_report_shows_sensitivity_and_mixed_precision(small_run, synth_small, clipping, tmp_path):
    from qbench.report import report

    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("report.html", "summary.md"))
    _, paths = load_manifest(clipping)
    sens = layer_sensitivity(run / "fp32.onnx", run / "int8.onnx", paths[:1], synth_small, top_k=2, out=run)
    mix = quantize_max_drop(run / "fp32.onnx", run / "mixed" / "int8.onnx", recipe_from_dict(CLIPPING), clipping,
                            synth_small, 100.0)
    report([run])
    md = (run / "summary.md").read_text()
    assert "## Layer sensitivity and mixed precision" in md
    top = sens["layers"][0]
    assert f"| 1 | {top['module']} | {top['proxy_recovery_db']:+.2f} |" in md
    rc = sens["map"]["rank_correlation"]
    assert f"recovery {rc['recovery']}, damage {rc['damage']}" in md
    assert "run / mixed: mixed precision" in md and f"| all INT8 | {mix['int8_mAP50-95']:.4f} |" in md
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "layer sensitivity" in page


def test_layer_module_names_are_the_torch_module_paths(models, default_weights):
    from qbench.models.load import load_checkpoint

    names = dict(load_checkpoint(default_weights).model.named_modules())
    _, int8, _ = models
    for layer in conv_layers(int8):
        assert layer.module in names and type(names[layer.module]).__name__ == "Conv2d", layer.name
