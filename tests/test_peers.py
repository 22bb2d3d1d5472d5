"""`qbench bench peers`: qbench's models beside NNCF's, ONNX Runtime's quantize_static and ultralytics' export, each
scored through the runtime that runs it, in one table with intervals and speed against ORT's FP32."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow  # real quantization/training/evaluation: minutes; CI runs it, `-m "not slow"` skips it


@pytest.mark.slow
def test_peers_table_scores_every_tool_through_its_runtime(tmp_path, default_weights, synth_small, calib):
    out = tmp_path / "peers"
    r = run_cli("bench", "peers", str(default_weights), "--data", str(synth_small), "--calib", str(calib),
                "--heldout", str(synth_small), "--imgsz", "96", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    p = json.loads((out / "peers.json").read_text())
    rows = {row["name"]: row for row in p["rows"]}
    assert set(rows) == {"fp32 @ort", "fp32 @openvino", "qbench default @ort", "qbench fused @openvino",
                         "qbench openvino @openvino", "nncf @openvino", "nncf u8 @openvino", "nncf @ort",
                         "ort quantize_static @ort", "ultralytics @ort"}
    assert "profile openvino" in rows["qbench openvino @openvino"]["tool"]["settings"]
    assert "rewritten as uint8" in rows["nncf u8 @openvino"]["tool"]["settings"]
    assert {row["runtime"] for row in rows.values()} == {"ort", "openvino"}
    assert rows["fp32 @ort"]["speedup_batch1"] == 1.0 and rows["fp32 @ort"]["delta_mAP50-95"] == 0
    for name, row in rows.items():
        assert 0 <= row["mAP50-95"] <= 1 and row["batch1_median_ms"] > 0 and "heldout" in row, name
        if name != "fp32 @ort":
            lo, hi = row["delta_ci95"]
            assert lo <= row["delta_mAP50-95"] <= hi, name
    assert "nncf" in rows["nncf @openvino"]["tool"]["tool"] and p["runtimes"]["openvino"].startswith("OpenVINO")
    md = (out / "peers.md").read_text()
    assert "| nncf @openvino | openvino |" in md and f"`{p['command']}`" in md and "Δ (held-out)" in md
