"""Benchmark commands on tiny inputs: they run end to end and write what results/ commits."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from qbench.calibration import build_manifest, save_manifest

pytestmark = pytest.mark.slow  # real quantization/training/evaluation: minutes; CI runs it, `-m "not slow"` skips it


def test_bench_eval_agrees_with_ultralytics(default_onnx, synth_small, tmp_path):
    r = run_cli("bench", "eval", str(default_onnx), "--data", str(synth_small), "--out", str(tmp_path / "b"),
                "--repeats", "1", "--batch", "4")
    assert r.returncode == 0, r.stderr
    b = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert b["images"] == 12 and b["median_qbench_s"] > 0 and b["median_ultralytics_s"] > 0
    assert b["abs_diff_mAP50-95"] <= 0.002
    assert "Reproduce: `qbench bench eval" in (tmp_path / "b" / "summary.md").read_text()


def test_bench_sweep_and_calib_memory(default_weights, synth_small, tmp_path):
    manifest = save_manifest(build_manifest(synth_small, 8), tmp_path / "calib.json")
    r = run_cli("bench", "sweep", str(default_weights), "--imgsz", "96", "--data", str(synth_small), "--calib",
                str(manifest), "--out", str(tmp_path / "s"), "--methods", "minmax,percentile", "--sizes", "8")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [(row["method"], row["calib_size"]) for row in s["rows"]] == [("minmax", 8), ("percentile", 8)]
    for row in s["rows"]:
        assert abs(row["delta_mAP50-95"] - (row["mAP50-95"] - s["fp32"]["mAP50-95"])) < 1e-12
        lo, hi = row["delta_ci95_mAP50-95"]
        assert lo <= hi
    first, second = s["rows"]
    assert "vs_first" not in first and second["vs_first"]["method"] == "minmax"
    assert abs(second["vs_first"]["delta_mAP50-95"] - (second["mAP50-95"] - first["mAP50-95"])) < 1e-12
    assert "| vs minmax [95% CI] |" in (tmp_path / "s" / "summary.md").read_text()
    r = run_cli("bench", "calib-memory", str(default_weights), "--imgsz", "96", "--calib", str(manifest),
                "--out", str(tmp_path / "m"), "--sizes", "8,8")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "m" / "memory.json").read_text())
    assert [row["images"] for row in m["rows"]] == [8, 8] and m["rows"][0]["peak_rss_mb"] > 100


def test_sweep_refuses_sizes_beyond_the_manifest(default_weights, synth_small, tmp_path):
    manifest = save_manifest(build_manifest(synth_small, 8), tmp_path / "calib.json")
    r = run_cli("bench", "sweep", str(default_weights), "--data", str(synth_small), "--calib", str(manifest),
                "--out", str(tmp_path / "s"), "--sizes", "8,64")
    assert r.returncode == 2 and "has 8 images" in r.stderr and "qbench calib --n 64" in r.stderr
    assert not (tmp_path / "s").exists()
