"""Bad input through the real command line: one sentence naming the file, exit code 2, nothing half-written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import run_cli


def _copy_data(src_yaml: Path, dst: Path) -> Path:
    shutil.copytree(src_yaml.parent, dst)
    return dst / "data.yaml"


def _assert_user_error(r, *needles: str):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert err and err[-1].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in err[-1], (n, err[-1])


def test_run_with_missing_weights(tmp_path, synth_small):
    out = tmp_path / "run"
    r = run_cli("run", "--weights", str(tmp_path / "nope.pt"), "--data", str(synth_small), "--out", str(out))
    _assert_user_error(r, "nope.pt")
    assert not out.exists()


def test_run_with_a_file_that_is_not_a_checkpoint(tmp_path, synth_small):
    fake = tmp_path / "best.pt"
    fake.write_text("these are not weights\n")
    r = run_cli("run", "--weights", str(fake), "--data", str(synth_small), "--out", str(tmp_path / "run"))
    _assert_user_error(r, "best.pt")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("yaml_text, needle", [
    ("train: images/train\nnames: [prohibitory, danger, mandatory, other]\n", "'val'"),
    ("train: images/train\nval: images/val\n", "'names'"),
    ("train: images/train\nval: images/nowhere\nnames: [prohibitory, danger, mandatory, other]\n", "nowhere"),
])
def test_eval_with_broken_data_yaml(tmp_path, synth_small, default_onnx, yaml_text, needle):
    data = _copy_data(synth_small, tmp_path / "d")
    data.write_text(yaml_text)
    r = run_cli("eval", str(default_onnx), "--data", str(data), "--out", str(tmp_path / "m.json"))
    _assert_user_error(r, "data.yaml", needle)
    assert not (tmp_path / "m.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("row, needle", [("7 0.5 0.5 0.1 0.1", "class id 7"), ("0 0.5 0.5", "line 2")])
def test_eval_with_bad_label_rows(tmp_path, synth_small, default_onnx, row, needle):
    data = _copy_data(synth_small, tmp_path / "d")
    label = sorted((data.parent / "labels" / "val").glob("*.txt"))[3]
    label.write_text("0 0.5 0.5 0.2 0.2\n" + row + "\n")
    r = run_cli("eval", str(default_onnx), "--data", str(data), "--out", str(tmp_path / "m.json"))
    _assert_user_error(r, label.name, needle)
    assert not (tmp_path / "m.json").exists()


@pytest.mark.slow
def test_run_with_an_unreadable_image_leaves_no_run_folder(tmp_path, synth_small, default_weights):
    data = _copy_data(synth_small, tmp_path / "d")
    bad = sorted((data.parent / "images" / "val").glob("*.jpg"))[-1]
    bad.write_bytes(b"\x00not a jpeg" * 10)
    out = tmp_path / "runs" / "r1"
    r = run_cli("run", "--weights", str(default_weights), "--data", str(data), "--out", str(out))
    _assert_user_error(r, bad.name)
    assert not out.exists() and not list(out.parent.glob("*")), list(out.parent.glob("*"))


@pytest.mark.slow
def test_run_with_a_model_whose_classes_differ_from_the_data(tmp_path, synth_small, default_weights):
    data = _copy_data(synth_small, tmp_path / "d")
    data.write_text("train: images/train\nval: images/val\nnames: [a, b]\n")
    out = tmp_path / "run"
    r = run_cli("run", "--weights", str(default_weights), "--data", str(data), "--out", str(out))
    _assert_user_error(r, "4 classes", "2")
    assert not out.exists()


@pytest.mark.slow
def test_run_end_to_end_writes_a_complete_run_folder(tmp_path, synth_small, default_weights):
    import json

    out = tmp_path / "run"
    r = run_cli("run", "--weights", str(default_weights), "--data", str(synth_small), "--out", str(out), "--baseline")
    assert r.returncode == 0, r.stderr
    for name in ("model.json", "fp32.onnx", "calibration.json", "int8.onnx", "recipe.yaml", "quantize.json",
                 "metrics.json", "compare.json", "run.json", "summary.md"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    m = metrics["fp32"]
    assert m["data"]["images"] == 12 and 0 <= m["metrics"]["mAP50-95"] <= 1
    summary = (out / "summary.md").read_text()
    assert f"{m['metrics']['mAP50-95']:.4f}" in summary and f"{metrics['int8']['metrics']['mAP50-95']:.4f}" in summary
    # calibrated on the train split, scored on val: the two never share an image
    calib = json.loads((out / "calibration.json").read_text())
    assert calib["split"] == "train" and all("/train/" in e["path"] for e in calib["images"])
    cmp = json.loads((out / "compare.json").read_text())
    assert cmp["models"]["int8"]["size_mb"] < cmp["models"]["fp32"]["size_mb"] / 2
    d = metrics["int8"]["metrics"]["mAP50-95"] - m["metrics"]["mAP50-95"]
    assert cmp["models"]["int8"]["delta"]["mAP50-95"] == pytest.approx(d, abs=1e-12)
    assert cmp["models"]["int8"]["latency"]["batch1_median_ms"] > 0
    # ultralytics' own INT8 export, scored through the same path (a static batch-1 model)
    assert set(cmp["models"]) == {"fp32", "int8", "ultralytics-int8"}
    assert set(metrics) == {"fp32", "int8", "ultralytics-int8"} and "ultralytics-int8" in summary
    facts = json.loads((out / "model.json").read_text())
    assert facts["activations"].get("LeakyReLU", 0) > 0 and "SiLU" not in facts["activations"]

    # qbench inspect on that run folder: statistics, error and LeakyReLU ranking of the real default model
    r = run_cli("inspect", str(out), "--images", "8", "--error-images", "4")
    assert r.returncode == 0, r.stderr
    ins = json.loads((out / "inspect.json").read_text())
    assert ins["summary"]["leaky_relus"] == facts["activations"]["LeakyReLU"]
    assert ins["summary"]["unfused_leaky_relus"] == ins["summary"]["leaky_relus"]  # ORT's default QDQ
    assert ins["images"] == {"statistics": 8, "error": 4}
    assert 10 < ins["summary"]["output_sqnr_db"] < 80
    assert [row["rank"] for row in ins["leaky"]] == list(range(1, len(ins["leaky"]) + 1))
    harms = [row["harm_db"] for row in ins["leaky"]]
    assert harms == sorted(harms, reverse=True)
    assert (out / "layers.csv").read_text().count("\n") == ins["summary"]["tensors"] + 1
    assert f"#1 {ins['leaky'][0]['layer']}" in r.stdout


@pytest.mark.slow
def test_inspect_bad_input(tmp_path):
    r = run_cli("inspect", str(tmp_path))
    _assert_user_error(r, "not a qbench run folder", str(tmp_path))
    r = run_cli("inspect", "--fp32", str(tmp_path / "a.onnx"))
    _assert_user_error(r, "needs --int8")


@pytest.mark.slow
def test_run_profiles_bad_input(tmp_path):
    out = tmp_path / "run"
    r = run_cli("run", "--out", str(out), "--profiles", "cpu,tpu")
    _assert_user_error(r, "tpu")
    assert not out.exists()
    r = run_cli("run", "--out", str(out), "--both-fusions")
    _assert_user_error(r, "--both-fusions goes with --profiles")
    assert not out.exists()
