"""Trust: no code runs from a checkpoint, no complete-looking wrong result, every bad input one sentence (exit 2,
nothing left behind). Each test reproduces a defect found by a hostile-input battery (issue 20)."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from qbench.errors import QbenchError

pytestmark = pytest.mark.slow  # real quantization/training/evaluation: minutes; CI runs it, `-m "not slow"` skips it

UNWRITABLE = Path("/proc/qbench-cannot-write-here")  # even root cannot create files under /proc


def _payload_checkpoint(src: Path, dst: Path, marker: Path, bare: bool = False) -> Path:
    """A copy of a real checkpoint with one more key whose unpickling runs `touch marker` (or only that object)."""
    code = f"""
import os, sys, torch
import qbench.ultra
from qbench import safeload
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
safeload.trust({str(src)!r})
ck = {{}} if {bare} else safeload.load({str(src)!r})
ck["payload"] = Payload()
torch.save(Payload() if {bare} else ck, {str(dst)!r})
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()  # building it ran nothing
    return dst


def test_a_checkpoint_that_runs_code_is_refused_before_it_runs(tmp_path, default_weights, synth_small):
    marker = tmp_path / "PAYLOAD_RAN"
    evil = _payload_checkpoint(default_weights, tmp_path / "best.pt", marker)
    for args in (("export", str(evil), "--out", str(tmp_path / "m.onnx")),
                 ("eval", str(evil), "--data", str(synth_small)),
                 ("run", "--weights", str(evil), "--data", str(synth_small), "--out", str(tmp_path / "run"))):
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "posix.system" in r.stderr and "--trust-weights" in r.stderr, r.stderr
        assert not marker.exists(), args
    bare = _payload_checkpoint(default_weights, tmp_path / "bare.pt", marker, bare=True)
    r = run_cli("eval", str(bare), "--data", str(synth_small))
    assert r.returncode == 2 and "posix.system" in r.stderr and not marker.exists()
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "run").exists()
    # the library entry points go through the same loader
    from qbench.models.load import load_checkpoint

    with pytest.raises(QbenchError, match="posix.system"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_every_kind_of_real_checkpoint_loads_without_trust(tmp_path, default_weights):
    """Plain, fused (forward = forward_fuse, pickled via getattr), stock YOLO11n (attention) and YOLOv8n models,
    and qbench's QAT fake-quant classes: all within the allow-list."""
    import copy

    import torch

    from qbench import safeload
    from qbench.qatrain import QConv2d, QSiLU
    from qbench.ultra import YOLO

    for name in ("yolo11n.yaml", "yolov8n.yaml"):
        p = tmp_path / f"{name}.pt"
        YOLO(name).save(str(p))
        assert type(safeload.load(p)["model"]).__name__ == "DetectionModel"
    ck = safeload.load(default_weights)
    m = copy.deepcopy(ck["model"]).float()
    m.fuse(verbose=False)
    conv = m.model[0].conv
    conv.__class__, conv.in_q = QConv2d, (0.1, 0, 0, 255)
    m.model[1].act = QSiLU()
    torch.save({**ck, "model": m, "ema": None}, tmp_path / "fused.pt")
    import zipfile

    with zipfile.ZipFile(tmp_path / "fused.pt") as z:  # forward = forward_fuse, pickled through getattr
        assert b"getattr" in z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    loaded = safeload.load(tmp_path / "fused.pt")["model"]
    assert isinstance(loaded.model[0].conv, QConv2d) and isinstance(loaded.model[1].act, QSiLU)


def test_trust_weights_is_an_explicit_opt_in(tmp_path, default_weights):
    """A harmless object outside the allow-list (a Fraction) is refused, and loads with --trust-weights."""
    code = f"""
import fractions, torch, qbench.ultra
from qbench import safeload
safeload.trust({str(default_weights)!r})
ck = safeload.load({str(default_weights)!r})
ck["note"] = fractions.Fraction(1, 3)
torch.save(ck, {str(tmp_path / 'odd.pt')!r})
"""
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300).returncode == 0
    out = tmp_path / "m.onnx"
    r = run_cli("export", str(tmp_path / "odd.pt"), "--out", str(out), "--imgsz", "96")
    assert r.returncode == 2 and "fractions.Fraction" in r.stderr and not out.exists()
    r = run_cli("--trust-weights", str(tmp_path / "odd.pt"), "export", str(tmp_path / "odd.pt"), "--out", str(out),
                "--imgsz", "96")
    assert r.returncode == 0 and out.exists(), r.stderr
    assert "--trust-weights" in r.stderr and "fully unpickled" in r.stderr  # said loudly


def _copy_data(src_yaml: Path, dst: Path) -> Path:
    shutil.copytree(src_yaml.parent, dst)
    return dst / "data.yaml"


@pytest.mark.parametrize("how", ["missing", "empty", "symlink"])
def test_a_split_without_labels_is_refused_not_scored_zero(tmp_path, synth_small, default_onnx, how):
    data = _copy_data(synth_small, tmp_path / "d")
    labels = data.parent / "labels" / "val"
    if how == "missing":
        shutil.rmtree(labels)
        needle = "has a label file"
    elif how == "empty":
        for f in labels.glob("*.txt"):
            f.write_text("")
        needle = "are empty"
    else:  # images/val links to a folder elsewhere; the labels stayed beside the link, where they are not looked up
        elsewhere = tmp_path / "elsewhere" / "images"
        elsewhere.mkdir(parents=True)
        shutil.move(str(data.parent / "images" / "val"), elsewhere / "val")
        (data.parent / "images" / "val").symlink_to(elsewhere / "val", target_is_directory=True)
        needle = "symbolic link"
    r = run_cli("eval", str(default_onnx), "--data", str(data))
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    r = run_cli("run", "--weights", str(REPO / "results/training/synth-l3-leaky-320/weights/best.pt"),
                "--data", str(data), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and needle in r.stderr and not (tmp_path / "run").exists(), r.stderr
    assert "Exporting" not in r.stderr  # refused before any export or quantization


def test_runs_into_the_same_folder_never_mix(tmp_path):
    """Each run stages into its own folder; the one that finishes second is refused (explicit --out) or takes
    the next free name (automatic), and its files are never merged into the other's."""
    from qbench.pipeline import _publish

    out = tmp_path / "run"
    a = Path(tempfile.mkdtemp(dir=tmp_path, prefix=".run.partial-"))
    b = Path(tempfile.mkdtemp(dir=tmp_path, prefix=".run.partial-"))
    assert a != b
    (a / "run.json").write_text('{"who": "a"}')
    (b / "run.json").write_text('{"who": "b"}')
    assert _publish(a, out, auto=False) == out
    with pytest.raises(QbenchError, match="another run"):
        _publish(b, out, auto=False)
    assert json.loads((out / "run.json").read_text())["who"] == "a" and not b.exists()
    c = Path(tempfile.mkdtemp(dir=tmp_path, prefix=".run.partial-"))
    (c / "run.json").write_text(json.dumps({"who": "c", "path": str(c / "x")}))
    moved = _publish(c, out, auto=True)
    assert moved == tmp_path / "run2"
    assert json.loads((moved / "run.json").read_text()) == {"who": "c", "path": str(moved / "x")}  # relocated


def test_calibrating_on_the_scored_split_is_refused_unless_asked(tmp_path, synth_small, default_weights):
    from qbench.calibration import build_manifest, save_manifest

    manifest = save_manifest(build_manifest(synth_small, 8, split="val"), tmp_path / "val8.json")
    r = run_cli("run", "--weights", str(default_weights), "--data", str(synth_small), "--calib", str(manifest),
                "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "'val' split being scored" in r.stderr and "--allow-scored-calib" in r.stderr
    assert not (tmp_path / "run").exists()
    r = run_cli("run", "--weights", str(default_weights), "--data", str(synth_small), "--calib", str(manifest),
                "--out", str(tmp_path / "run"), "--allow-scored-calib")
    assert r.returncode == 0, r.stderr
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "8 val images" in summary and str(manifest) in summary
    assert "8 of the calibration images are in the scored split" in summary
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["calibration_check"]["in_scored_split"] == 8
    # the reports name the published folder's files, not the staging folder that no longer exists
    q = json.loads((tmp_path / "run" / "quantize.json").read_text())
    assert Path(q["recipe_file"]).is_file() and Path(q["out"]).is_file() and ".partial" not in json.dumps(q)
    assert ".partial" not in (tmp_path / "run" / "recipe.yaml").read_text()
    cmd = shlex.split(info["command"])  # pastes back as it ran
    assert cmd[:2] == ["qbench", "run"] and cmd[cmd.index("--out") + 1] == str(tmp_path / "run")


def test_an_int8_model_is_refused_where_fp32_is_expected(tmp_path, small_run, calib):
    int8, fp32 = small_run / "int8.onnx", small_run / "fp32.onnx"
    r = run_cli("quantize", str(int8), "--calib", str(calib), "--out", str(tmp_path / "q.onnx"))
    assert r.returncode == 2 and "already quantized" in r.stderr and not (tmp_path / "q.onnx").exists()
    data = json.loads((small_run / "run.json").read_text())["data"]
    r = run_cli("compare", str(int8), str(fp32), "--data", str(small_run / data) if not Path(data).is_absolute()
                else data)
    assert r.returncode == 2 and "cannot be the FP32 reference" in r.stderr, r.stderr


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, default_weights, default_onnx, synth_small, calib):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    for out in (UNWRITABLE / "o", afile / "o"):
        for args in (("run", "--weights", str(default_weights), "--data", str(synth_small), "--out", str(out)),
                     ("calib", "--data", str(synth_small), "--n", "8", "--out", str(out / "m.json")),
                     ("export", str(default_weights), "--out", str(out / "m.onnx")),
                     ("quantize", str(default_onnx), "--calib", str(calib), "--out", str(out / "q.onnx")),
                     ("eval", str(default_onnx), "--data", str(synth_small), "--out", str(out / "m.json"))):
            t = time.perf_counter()
            r = run_cli(*args)
            assert r.returncode == 2 and "cannot be written" in r.stderr, (args, r.stderr)
            assert "Traceback" not in r.stderr and time.perf_counter() - t < 60, args
            assert "Evaluating" not in r.stderr and "Calibrating" not in r.stderr  # before the work


def test_bad_numbers_are_refused_at_once(tmp_path, default_weights, default_onnx, synth_small):
    for args, needle in ((("eval", str(default_onnx), "--data", str(synth_small), "--batch", "0"), "--batch 0"),
                         (("eval", str(default_onnx), "--data", str(synth_small), "--limit", "0"), "--limit 0"),
                         (("run", "--weights", str(default_weights), "--data", str(synth_small), "--batch", "0",
                           "--out", str(tmp_path / "r")), "--batch 0"),
                         (("calib", "--data", str(synth_small), "--n", "4", "--out", str(tmp_path / "m.json")),
                          "at least 8")):
        r = run_cli(*args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "r").exists() and not (tmp_path / "m.json").exists()


def test_calib_never_overwrites_a_manifest(tmp_path, synth_small):
    m = tmp_path / "m.json"
    assert run_cli("calib", "--data", str(synth_small), "--n", "8", "--out", str(m)).returncode == 0
    before = m.read_bytes()
    r = run_cli("calib", "--data", str(synth_small), "--n", "8", "--seed", "1", "--out", str(m))
    assert r.returncode == 2 and "already exists" in r.stderr and m.read_bytes() == before


def test_two_models_quantized_into_one_folder_keep_their_own_recipes(tmp_path, default_onnx, calib):
    from qbench.quantization import load_recipe, quantize_ort

    quantize_ort(default_onnx, tmp_path / "a.onnx", "default", calib)
    quantize_ort(default_onnx, tmp_path / "b.onnx", "per-tensor", calib)
    assert load_recipe(tmp_path / "a.recipe.yaml").per_channel and not load_recipe(tmp_path / "b.recipe.yaml").per_channel


def test_class_names_that_differ_from_the_model_are_said(tmp_path, synth_small, default_onnx):
    data = _copy_data(synth_small, tmp_path / "d")
    text = data.read_text().replace("prohibitory", "circle")
    data.write_text(text)
    r = run_cli("eval", str(default_onnx), "--data", str(data), "--limit", "2", "--out", str(tmp_path / "m.json"))
    assert r.returncode == 0 and "calls class 0 'prohibitory' but" in r.stderr and "'circle'" in r.stderr
    assert json.loads((tmp_path / "m.json").read_text())["data"]["class_names_differ"][0]["data"] == "circle"


@pytest.mark.parametrize("sig,code,said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupted_runs_say_so_and_leave_nothing(tmp_path, default_weights, synth_small, sig, code, said):
    """Ctrl-C and SIGTERM: one line, their exit code, no staging folder and no scratch folder left; a SIGKILLed
    process's scratch folder is swept by the next qbench command."""
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "qbench", "run", "--weights", str(default_weights), "--data",
                          str(synth_small), "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and not list(Path(tempfile.gettempdir()).glob(f"qbench-*-{p.pid}-*")):
        time.sleep(0.2)  # until it is inside a step with a scratch folder
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code and said in err and "Traceback" not in err, err
    assert not list(Path(tempfile.gettempdir()).glob(f"qbench-*-{p.pid}-*"))
    assert not out.exists() and not list(tmp_path.glob(".run.partial*"))
    dead = Path(tempfile.gettempdir()) / f"qbench-quant-{p.pid}-leftover"
    dead.mkdir()
    run_cli("--help")
    assert not dead.exists()
