"""The one evaluation path: preprocessing and metrics agree with ultralytics' own validator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qbench.data.dataset import image_files, load_data_yaml, read_image
from qbench.data.preprocess import letterbox, to_input
from qbench.evaluate import EvalSettings, evaluate
from qbench.errors import QbenchError

from conftest import GTSDB4, run_cli


def _ultralytics_val_dataset(spec, imgsz):
    import qbench.ultra  # noqa: F401
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset

    cfg = get_cfg(overrides={"imgsz": imgsz, "rect": False, "task": "detect", "cache": False, "fraction": 1.0})
    data = {"names": dict(enumerate(spec.names)), "nc": spec.nc, "channels": 3}
    return build_yolo_dataset(cfg, str(spec.splits["val"]), 1, data, mode="val", stride=32)


@pytest.mark.parametrize("imgsz", [320, 256])
def test_letterbox_and_targets_match_ultralytics(synth_small, imgsz):
    """Same input tensor and same target boxes as ultralytics' val dataset (non-square images: padding matters)."""
    spec = load_data_yaml(synth_small)
    ds = _ultralytics_val_dataset(spec, imgsz)
    from qbench.data.dataset import read_labels

    for i, f in enumerate(image_files(spec, "val")[:6]):
        item = ds[i]
        assert item["im_file"] == str(f)
        img, geo = letterbox(read_image(f), imgsz)
        ours = to_input([img])[0]
        theirs = item["img"].numpy().astype(np.float32) / 255.0
        assert ours.shape == theirs.shape == (3, imgsz, imgsz)
        np.testing.assert_array_equal(ours, theirs)
        # targets: ultralytics' normalized xywh in the letterboxed frame, times imgsz, as its validator does
        lab = read_labels(f, spec.nc)
        tb = item["bboxes"].numpy() * imgsz
        theirs_xyxy = np.concatenate([tb[:, :2] - tb[:, 2:] / 2, tb[:, :2] + tb[:, 2:] / 2], 1)
        np.testing.assert_allclose(geo.boxes_to_input(lab[:, 1:]), theirs_xyxy, atol=1e-3)


def test_fidelity_onnx_eval_vs_ultralytics_pt_val(default_weights, default_onnx, synth_val):
    """Acceptance: qbench eval of the FP32 ONNX agrees with YOLO(best.pt).val within 0.002 mAP50-95."""
    from qbench.ultra import YOLO

    ours = evaluate(default_onnx, synth_val, EvalSettings(batch=16))
    r = YOLO(str(default_weights)).val(data=str(synth_val), imgsz=ours["settings"]["imgsz"], batch=16, conf=0.001,
                                      iou=0.7, rect=False, plots=False, device="cpu", verbose=False,
                                      project=str(synth_val.parent / "uval"), name="val")
    p, rc, m50, m5095 = (float(x) for x in r.mean_results())
    assert ours["data"]["images"] == 200
    assert abs(ours["metrics"]["mAP50-95"] - m5095) <= 0.002, (ours["metrics"], m5095)
    assert abs(ours["metrics"]["mAP50"] - m50) <= 0.002
    # the default model is worth quantizing (acceptance: mAP50 >= 0.85 on its synthetic val split)
    assert ours["metrics"]["mAP50"] >= 0.85


def test_pt_and_onnx_agree_and_batch_does_not_matter(default_weights, default_onnx, synth_small):
    a = evaluate(default_onnx, synth_small, EvalSettings(batch=5))
    b = evaluate(default_onnx, synth_small, EvalSettings(batch=1))
    c = evaluate(default_weights, synth_small, EvalSettings(batch=4))
    assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-6)
    assert a["metrics"] == pytest.approx(c["metrics"], abs=2e-3)
    assert [r["class"] for r in a["per_class"]] == ["prohibitory", "danger", "mandatory", "other"]
    assert sum(r["instances"] for r in a["per_class"]) == a["data"]["instances"] > 0


def test_eval_cli_writes_metrics_json(default_onnx, synth_small, tmp_path):
    out = tmp_path / "m" / "metrics.json"
    r = run_cli("eval", str(default_onnx), "--data", str(synth_small), "--out", str(out), "--batch", "4")
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    assert set(m["metrics"]) == {"precision", "recall", "mAP50", "mAP50-95"}
    assert "mAP50-95" in r.stdout and "prohibitory" in r.stdout
    assert m["settings"]["imgsz"] == 320 and m["data"]["images"] == 12


def test_class_count_mismatch_is_refused(default_onnx, tmp_path, synth_small):
    y = tmp_path / "two.yaml"
    y.write_text(f"path: {synth_small.parent}\ntrain: images/train\nval: images/val\nnames: [a, b]\n")
    with pytest.raises(QbenchError, match="4 classes"):
        evaluate(default_onnx, y)


@pytest.mark.skipif(not GTSDB4.exists(), reason="../shared/datasets/gtsdb4 is absent")
def test_real_gtsdb4_smoke(default_onnx):
    """The default (synthetic-trained) model runs on real GTSDB frames (1360x800) end to end."""
    r = evaluate(default_onnx, GTSDB4, EvalSettings(limit=8, batch=8))
    assert r["data"]["images"] == 8 and r["data"]["instances"] > 0
    assert 0.0 <= r["metrics"]["mAP50-95"] <= 1.0
