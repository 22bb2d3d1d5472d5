"""QAT: fake quantization read from the PTQ graph, a tiny real fine-tuning run (interrupted and resumed), the INT8
export through quantize_ort with the PTQ ranges, and the s8 -> u8 activation rewrite."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from qbench.errors import QbenchError

pytestmark = pytest.mark.slow  # real quantization/training/evaluation: minutes; CI runs it, `-m "not slow"` skips it

QAT_IMGSZ = 160  # the default model (trained at 320) exported and fine-tuned at 160: seconds per stage


def test_bad_input_is_one_clear_error(tmp_path, default_weights, synth_small):
    from qbench.qatrain import qat

    with pytest.raises(QbenchError, match="does not exist"):
        qat(tmp_path / "missing.pt", synth_small, tmp_path / "o1")
    with pytest.raises(QbenchError, match="epochs"):
        qat(default_weights, synth_small, tmp_path / "o2", epochs=0)
    with pytest.raises(QbenchError, match="no-such-npu"):
        qat(default_weights, synth_small, tmp_path / "o3", profile="no-such-npu")
    with pytest.raises(QbenchError, match="imgsz"):
        qat(default_weights, synth_small, tmp_path / "o4", imgsz=100)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


@pytest.mark.slow
def test_u8_activations_same_numbers_fused_kernels(tmp_path, default_onnx, calib):
    """int8 activations with zero point 0 rewritten as uint8 / 128: identical outputs, every conv a QLinearConv."""
    from qbench.quantization.ort_engine import quantize_ort
    from qbench.quantization.profile import apply_profile
    from qbench.runtime import ort_session

    rec = apply_profile("default", "npu-symmetric", "unfused").replace(calib_size=12)
    s8 = quantize_ort(default_onnx, tmp_path / "s8" / "int8.onnx", rec, calib, save_ranges=tmp_path / "r.json")
    u8 = quantize_ort(default_onnx, tmp_path / "u8" / "int8.onnx", rec, None, ranges=tmp_path / "r.json",
                      u8_activations=True)
    assert u8["calibration"]["images"] == 0 and "precomputed" in u8["calibration"]["ranges"]
    assert u8["constraints"]["u8_activations"]["zero_points"] > 0
    n_conv = u8["nodes"]["quantized"]["Conv"]
    assert u8["qlinear_ops"]["QLinearConv"] == n_conv > s8["qlinear_ops"].get("QLinearConv", 0)
    x = np.random.default_rng(0).random((2, 3, 320, 320), dtype=np.float32)
    for opt in (False, True):
        a = ort_session(tmp_path / "s8" / "int8.onnx", 2, optimize=opt).run(None, {"images": x})[0]
        b = ort_session(tmp_path / "u8" / "int8.onnx", 2, optimize=opt).run(None, {"images": x})[0]
        if not opt:  # the QDQ graphs compute exactly the same numbers
            np.testing.assert_array_equal(a, b)
    with pytest.raises(QbenchError, match="does not exist"):
        quantize_ort(default_onnx, tmp_path / "x" / "int8.onnx", rec, None, ranges=tmp_path / "nope.json")


@pytest.mark.slow
def test_fake_quant_placement_matches_ptq_graph_pow2(tmp_path, default_weights, default_onnx, calib):
    import onnx
    import torch

    from qbench.models.load import load_checkpoint
    from qbench.models.modules import module_for_node
    from qbench.qatrain import QConv2d, prepare_qat, strip_qat
    from qbench.quantization.fallback import conv_layers
    from qbench.quantization.ort_engine import quantize_ort
    from qbench.quantization.profile import apply_profile

    rec = apply_profile("default", "npu-symmetric-pow2", None).replace(calib_size=12)  # fused, pow2
    quantize_ort(default_onnx, tmp_path / "int8.onnx", rec, calib)
    q = onnx.load(str(tmp_path / "int8.onnx"))
    model = copy.deepcopy(load_checkpoint(default_weights).model).float()
    model.fuse(verbose=False)
    p = prepare_qat(model, q, rec)
    layers = conv_layers(q)
    assert p["unmapped"] == [] and p["quantized_convs"] == len(layers) > 50
    qconvs = {n: m for n, m in model.named_modules() if isinstance(m, QConv2d)}
    assert {module_for_node(model, lay.name)[0] for lay in layers} == {lay.module for lay in layers} == set(qconvs)
    assert not isinstance(model.model[-1].dfl.conv, QConv2d)  # the DFL conv stays float, as in the PTQ graph
    # fused profile: only the detect-branch convs (read by the float decode) quantize their own output
    assert sum(m.out_q is not None for m in qconvs.values()) == 6
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    prod = {o: n for n in q.graph.node for o in n.output}
    for node in q.graph.node:
        path, mod = module_for_node(model, node.name) if node.op_type == "Conv" else (None, None)
        if not isinstance(mod, QConv2d):
            continue
        dq = prod[node.input[0]]
        assert mod.in_q[0] == float(init[dq.input[1]]) and mod.in_q[1] == 0 and mod.in_q[2:] == (-128, 127)
        assert np.log2(mod.in_q[0]).is_integer()
        w_dq = prod[node.input[1]]
        np.testing.assert_array_equal(mod.weight_scale().numpy(), init[w_dq.input[1]])  # pow2, as constraints.py
    x = torch.rand(1, 3, 320, 320)
    model.eval()
    with torch.inference_mode():
        yq = model(x)[0]
        yf = strip_qat(model)(x)[0]
    assert not any(isinstance(m, QConv2d) for m in model.modules())
    assert not torch.equal(yq, yf)


@pytest.mark.slow
def test_learned_ranges_start_at_ptq_train_and_export_exactly(tmp_path, default_weights, default_onnx, calib,
                                                              synth_small):
    import onnx
    import torch

    from qbench.graph.qdq import activation_quantizers
    from qbench.models.load import load_checkpoint
    from qbench.qatrain import (
        IN_RANGE_PARAM,
        RANGE_PARAM,
        QConv2d,
        learned_params,
        learned_scales,
        match_onnx,
        prepare_qat,
        strip_qat,
        write_learned_ranges,
    )
    from qbench.quantization.ort_engine import quantize_ort
    from qbench.quantization.profile import apply_profile

    rec = apply_profile("default", "npu-symmetric-pow2", "unfused").replace(calib_size=12)
    quantize_ort(default_onnx, tmp_path / "ptq.onnx", rec, calib, save_ranges=tmp_path / "ranges.json")
    q = onnx.load(str(tmp_path / "ptq.onnx"))
    base = copy.deepcopy(load_checkpoint(default_weights).model).float()
    base.fuse(verbose=False)
    frozen, learned = copy.deepcopy(base), copy.deepcopy(base)
    pf = prepare_qat(frozen, q, rec, learn_ranges=False)
    p = prepare_qat(learned, q, rec, learn_ranges=True)
    params = learned_params(learned)
    assert not learned_params(frozen) and len(params) == len(p["learned"])
    # every quantized tensor has exactly one quantizer: learned, or the learned one of the tensor it passes through
    aq = activation_quantizers(q)
    assert len(p["learned"]) + len(p["pass_through_of"]) == len(aq) and p["unmapped"] == []
    assert set(p["learned"]) | set(p["pass_through_of"]) == set(aq)
    assert pf["inputs_quantized_upstream"] == p["inputs_quantized_upstream"] > 0
    x = torch.rand(2, 3, 320, 320)
    frozen.eval(), learned.eval()
    with torch.no_grad():  # initialised at the PTQ scales: exactly the frozen model
        assert torch.equal(frozen(x)[0], learned(x)[0])

    learned.train()
    for t in learned.parameters():
        t.requires_grad_(True)
    y = learned(x)
    sum(v.float().pow(2).mean() for v in y.values() if torch.is_tensor(v)).backward()
    grads = [t.grad for t in params.values()]
    assert sum(g is not None and float(g.abs().sum()) > 0 for g in grads) > 0.8 * len(grads)

    # halve the scale of every Conv output requantized before its LeakyReLU (the unfused pow2 case QAT learns)
    learned.eval()
    with torch.no_grad():
        moved = 0
        for m in learned.modules():
            if isinstance(m, QConv2d) and RANGE_PARAM in m._parameters and m.onnx_node.endswith("conv/Conv"):
                m._parameters[RANGE_PARAM] -= 1
                moved += 1
    assert moved > 40
    c = copy.deepcopy(learned)  # the bias grid follows the copy's own scale parameters
    owners = [m.in_scale_of[0] for m in c.modules() if isinstance(m, QConv2d) and m.in_scale_of is not None]
    assert owners and all(any(o is mm for mm in c.modules()) for o in owners)
    scales = learned_scales(learned, p, pow2=True)
    assert all(np.log2(v).is_integer() for v in scales.values())
    qp = {t: (a.qparams.scale, a.qparams.zero_point, a.qparams.qmin, a.qparams.qmax) for t, a in aq.items()}
    expected = write_learned_ranges(tmp_path / "ranges.json", tmp_path / "learned.json", scales, p, qp, rec)
    quantize_ort(default_onnx, tmp_path / "qat.onnx", rec, None, ranges=tmp_path / "learned.json")
    got = activation_quantizers(onnx.load(str(tmp_path / "qat.onnx")))
    assert {t: got[t].qparams.scale for t in expected} == expected  # exact powers of two, none rounded up again
    assert sum(expected[t] != aq[t].qparams.scale for t in expected) >= moved
    m = match_onnx(learned, tmp_path / "qat.onnx", synth_small, 320)
    assert m["ort_optimized"]["sqnr_db"] > 60, m  # pow2 grids: the same numbers up to float summation order
    assert not any(k in (RANGE_PARAM, IN_RANGE_PARAM) for k in strip_qat(learned).state_dict())


@pytest.mark.slow
def test_tiny_qat_run_interrupted_resumes_and_exports_int8(tmp_path, default_weights, synth_small):
    import torch

    from qbench.qatrain import IN_RANGE_PARAM, QAT_JSON, RANGE_PARAM, QConv2d, load_qat_model, qat

    RANGES = (RANGE_PARAM, IN_RANGE_PARAM)

    out = tmp_path / "qat"
    kw = dict(profile="npu-symmetric", fusion="unfused", epochs=2, imgsz=QAT_IMGSZ, batch=4, workers=0,
              learn_ranges=True, distill=1.0)

    def stop_after_first_epoch(trainer):
        if trainer.epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qat(default_weights, synth_small, out, callbacks={"on_fit_epoch_end": stop_after_first_epoch}, **kw)
    last = out / "train" / "weights" / "last.pt"
    assert last.exists() and not (out / QAT_JSON).exists()
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 0
    assert len((out / "train" / "results.csv").read_text().strip().splitlines()) == 2  # header + epoch 1
    assert isinstance(load_qat_model(last).model[0].conv, QConv2d)  # the checkpoint keeps its fake quantizers
    ema = torch.load(last, map_location="cpu", weights_only=False)["ema"]
    assert next(ema.parameters()).dtype == torch.float32  # the EMA that was validated, not a half-precision copy

    def learned(ckpt: Path) -> dict:
        m = load_qat_model(ckpt)
        return {n: p.detach().clone() for n, p in m.named_parameters() if n.rsplit(".", 1)[-1] in RANGES}

    after_1 = learned(last)

    with pytest.raises(QbenchError, match="--epochs 2"):  # resuming with other epochs is refused, clearly
        qat(default_weights, synth_small, out, **{**kw, "epochs": 3})
    with pytest.raises(QbenchError, match="--learn-ranges"):  # ... and so is resuming with the other range mode
        qat(default_weights, synth_small, out, **{**kw, "learn_ranges": False})
    with pytest.raises(QbenchError, match="distill"):  # ... or another distillation weight
        qat(default_weights, synth_small, out, **{**kw, "distill": 0.0})

    r = qat(default_weights, synth_small, out, **kw)  # the same command again: resumes at epoch 2
    assert r["resumed_from_epoch"] == 2 and r["epochs_run"] == 2
    assert [s["start_epoch"] for s in r["train_sessions"]] == [1, 2]
    assert [int(row["epoch"]) for row in r["train_results"]] == [1, 2]
    assert json.loads((out / QAT_JSON).read_text())["epochs_run"] == 2

    assert r["placement"]["unmapped"] == [] and r["placement"]["quantized_convs"] > 50
    a = r["activation_ranges"]  # npu-symmetric scales are continuous, so training moves them
    assert a["mode"] == "learned" and a["learned_tensors"] > 100
    moved = learned(out / "train" / "weights" / "last.pt")
    assert sum(not torch.equal(after_1[n], moved[n]) for n in after_1) > 100  # epoch 2 trained on
    # every epoch makes optimizer steps, even on 2 batches of 4 images (ultralytics would accumulate to 64 images
    # first): whichever epoch ultralytics' fitness picks for best.pt, its scales moved from PTQ's
    assert a["changed_from_ptq"] > 0 and r["checks"]["int8_weight_codes"]["changed"] > 0
    assert r["distill"] == 1.0
    # int8 kernels: every quantized conv is a QLinearConv after ORT's optimisation (u8 activations), DFL stays float
    assert r["kernels"]["QLinearConv"] == r["placement"]["quantized_convs"] and r["kernels"]["float_Conv"] == 1
    # the INT8 ONNX computes what the PyTorch fake-quant model computes. Tolerance: both round to the same grids
    # but in different float arithmetic, so a few activations land one step apart and that spreads with depth;
    # measured ~37 dB, 1 px mean box error at imgsz 160. Stated bound: SQNR >= 25 dB, mean box error <= 2 px,
    # mean score error <= 2e-3, and far closer than the same weights without fake quantization.
    m = r["onnx_vs_torch"]
    for k in ("ort_optimized", "ort_qdq_simulated"):
        assert m[k]["sqnr_db"] >= 25 and m[k]["box_mean_abs_px"] <= 2 and m[k]["score_mean_abs"] <= 2e-3, m
    assert m["ort_optimized"]["sqnr_db"] > m["baseline_float_torch"]["sqnr_db"] + 3, m
    assert set(r["compare"]["table"]) == {"fp32", "int8", "qat"}
    assert (out / "qat" / "int8.onnx").exists() and (out / "qat.pt").exists()
    # the command that repeats the run, with options the CLI really has
    import shlex

    import typer.main

    from qbench.cli import app

    cmd = shlex.split(r["command"])
    opts = {o for prm in typer.main.get_command(app).commands["qat"].params for o in prm.opts + prm.secondary_opts}
    assert cmd[:2] == ["qbench", "qat"] and {a for a in cmd if a.startswith("--")} <= opts
    for a in ("--profile npu-symmetric", "--fusion unfused", "--epochs 2", f"--imgsz {QAT_IMGSZ}", "--batch 4",
              "--workers 0", "--learn-ranges", "--distill 1", f"--out {out}"):
        assert a in r["command"], (a, r["command"])
    # a person-readable report next to qat.json: the table, the training per epoch, the checks
    md = (out / "summary.md").read_text()
    assert "## Quantization-aware training" in md and "| 1 | " in md and "| 2 | " in md
    row = next(line for line in md.splitlines() if line.startswith("| qat |"))
    assert f"{r['compare']['table']['qat']['mAP50-95']:.4f}" in row
    assert f"{r['kernels']['QLinearConv']} of {r['placement']['quantized_convs']}" in md
    assert "<img" in (out / "report.html").read_text()  # the per-epoch chart
    # `qbench inspect QAT_DIR` (what the report says to run): the PTQ and the QAT model, each against its own FP32
    # model, into ptq/ and qat/; the re-rendered report puts them side by side
    from qbench.analysis.inspect import inspect_run
    from qbench.report.render import report

    assert f"qbench inspect {out}`" in md
    with pytest.raises(QbenchError, match="QAT folder"):
        inspect_run(out, fp32=out / "fp32.onnx")
    ins = inspect_run(out, images=4, error_images=2)
    assert ins["out"] == str(out / "qat") and set(ins["other_variants"]) == {"ptq"}
    assert json.loads((out / "ptq" / "inspect.json").read_text())["summary"]["quantized_tensors"] > 100
    report([out])
    md = (out / "summary.md").read_text()
    assert f"### {out.name} qat" in md and "| int8 | recipe |" in md and "| qat | recipe |" in md
    assert "No per-layer analysis" not in md
    with pytest.raises(QbenchError, match="finished QAT run"):
        qat(default_weights, synth_small, out, **kw)


@pytest.mark.slow
def test_default_qat_keeps_the_ptq_ranges_distillation_adds_to_the_loss_equalize_matches(tmp_path, default_weights, synth_small):
    import torch

    from qbench.qatrain import DistillLoss, qat

    seen = {}

    def probe(trainer):  # the criterion the trainer really uses, on a real batch
        c = trainer.model.criterion
        seen["criterion"] = type(c).__name__
        if isinstance(c, DistillLoss):
            b = trainer.preprocess_batch(next(iter(trainer.train_loader)))
            with torch.no_grad():
                preds = trainer.model(b["img"])
                seen["extra"] = float(c(preds, b)[0].sum() - c.base(preds, b)[0].sum())

    kw = dict(profile="npu-symmetric-pow2", fusion="unfused", epochs=1, imgsz=QAT_IMGSZ, batch=4, workers=0)
    r = qat(default_weights, synth_small, tmp_path / "frozen", evaluate=False, **kw,
            callbacks={"on_train_epoch_end": probe})
    # frozen: the QAT INT8 model's activation quantizers are the PTQ ones (qat() checks them all, exactly)
    assert r["activation_ranges"]["mode"] == "frozen at PTQ" and r["activation_ranges"]["learned_tensors"] == 0
    assert seen == {"criterion": "v8DetectionLoss"} and r["distill"] == 0
    assert r["onnx_vs_torch"]["ort_optimized"]["sqnr_db"] > 60  # pow2 grids: the same numbers
    seen.clear()
    qat(default_weights, synth_small, tmp_path / "distill", evaluate=False, distill=5.0, **kw,
        callbacks={"on_train_epoch_end": probe})
    # the fake-quant model differs from its FP32 teacher, so the distillation term is positive
    assert seen["criterion"] == "DistillLoss" and seen["extra"] > 0
    with pytest.raises(QbenchError, match="distill"):
        qat(default_weights, synth_small, tmp_path / "bad", distill=-1, **kw)
    # recipe key equalize: fp32.onnx and the PyTorch model get the same scales, so the QAT ONNX still matches
    r = qat(default_weights, synth_small, tmp_path / "eq", recipe="equalize", evaluate=False, **kw)
    assert r["equalize"]["chains"] > 15 and (tmp_path / "eq" / "equalize.json").exists()
    assert r["onnx_vs_torch"]["ort_optimized"]["sqnr_db"] > 60
