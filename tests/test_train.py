"""The training wrapper: a real (tiny) ultralytics run, offline, leaving a complete run folder."""

from __future__ import annotations

import json

import pytest

from qbench.errors import QbenchError
from qbench.train import resolve_model, train

pytestmark = pytest.mark.slow  # real quantization/training/evaluation: minutes; CI runs it, `-m "not slow"` skips it


def test_tiny_training_run_is_complete_and_offline(synth_small, tmp_path):
    out = tmp_path / "runs" / "tiny"
    best = train("yolo11n-l3-leaky", str(synth_small), out, epochs=1, imgsz=64, batch=4, workers=0)
    assert best == out / "weights" / "best.pt" and best.stat().st_size > 1_000_000
    assert not (out / "weights" / "last.pt").exists()
    for name in ("args.yaml", "results.csv", "train.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "train.json").read_text())
    assert summary["epochs"] == 1 and "metrics/mAP50-95(B)" in summary["best_epoch_metrics"]
    assert not list(tmp_path.glob("runs/.*partial"))  # staging folder renamed away
    # plots rendered with the local font (no download possible offline)
    assert list(out.glob("*.jpg")) or list(out.glob("*.png"))


def test_refuses_to_overwrite_a_trained_run(tmp_path, synth_small):
    (tmp_path / "r" / "weights").mkdir(parents=True)
    (tmp_path / "r" / "weights" / "best.pt").write_bytes(b"x")
    with pytest.raises(QbenchError, match="already holds a trained model"):
        train("yolo11n-l3-leaky", str(synth_small), tmp_path / "r", epochs=1)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(QbenchError, match="yolo11n-l3-leaky"):
        resolve_model("no-such-model")
    assert resolve_model("yolo11n-l3-relu").endswith("configs/models/yolo11n-l3-relu.yaml")
