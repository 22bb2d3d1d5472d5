"""qbench.models: checkpoint loading, model facts, ONNX export (real models, real files, real ORT sessions).

Checkpoints are untrained models built from configs/models/*.yaml and saved the way ultralytics' trainer leaves
best.pt (EMA model in FP16 under 'model', train_args with imgsz), in tmp folders. Exports run at imgsz 64/96.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from copy import deepcopy
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import qbench.ultra  # noqa: F401  (offline ultralytics before anything imports it)
from qbench.errors import QbenchError
from qbench.models import export_onnx, load_checkpoint, model_facts, read_onnx_meta

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"
NAMES = ["prohibitory", "danger", "mandatory", "other"]
IMGSZ = 64


def save_checkpoint(model: torch.nn.Module, path: Path, imgsz: int = IMGSZ) -> Path:
    """Save `model` like ultralytics' final best.pt: Trainer.save_model() then strip_optimizer()."""
    from ultralytics import __version__
    from ultralytics.utils import DEFAULT_CFG_DICT, DEFAULT_CFG_KEYS

    train_args = {**DEFAULT_CFG_DICT, "model": "yolo11n-l3.yaml", "data": "synth/data.yaml", "epochs": 3,
                  "imgsz": imgsz, "batch": 8, "device": "cpu"}
    model = deepcopy(model).eval()  # the EMA copy the trainer saves is in eval mode
    model.args = dict(train_args)
    model.half()
    for p in model.parameters():
        p.requires_grad = False
    torch.save({
        "epoch": -1, "best_fitness": None, "model": model, "ema": None, "updates": None, "optimizer": None,
        "scaler": None, "train_args": {k: v for k, v in train_args.items() if k in DEFAULT_CFG_KEYS},
        "train_metrics": {}, "train_results": {}, "date": datetime.now().isoformat(), "version": __version__,
    }, path)
    return path


def build(cfg: str):
    from ultralytics import YOLO

    model = YOLO(cfg).model
    if model.task == "detect":
        model.names = dict(enumerate(NAMES))
    return model


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """ckpt(variant) -> Path of a saved checkpoint: 'leaky', 'relu', 'silu' (level-3 configs) or 'cls'."""
    root = tmp_path_factory.mktemp("ckpt")
    made: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in made:
            cfg = "yolo11n-cls.yaml" if variant == "cls" else str(CONFIGS / f"yolo11n-l3-{variant}.yaml")
            (root / variant).mkdir()
            made[variant] = save_checkpoint(build(cfg), root / variant / "best.pt")
        return made[variant]

    return get


@pytest.fixture(scope="session")
def exported(ckpt, tmp_path_factory):
    """The leaky checkpoint exported with the defaults (opset 17, dynamic batch) at imgsz 64, from a clean cwd."""
    weights = ckpt("leaky")
    cwd = tmp_path_factory.mktemp("cwd")
    out = tmp_path_factory.mktemp("export") / "leaky.onnx"
    before = sorted(os.listdir(weights.parent))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        assert export_onnx(weights, out) == out
    assert os.listdir(cwd) == [], "the exporter wrote into the working directory"
    assert sorted(os.listdir(weights.parent)) == before, "the exporter wrote next to the weights"
    assert os.listdir(out.parent) == [out.name], "temporary files left next to the output"
    return out


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def images(n: int, size: int = IMGSZ, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, size, size), dtype=np.float32)


# ----------------------------------------------------------------------------------------------- load_checkpoint


def test_load_valid_checkpoint(ckpt):
    yolo = load_checkpoint(ckpt("leaky"))
    assert yolo.task == "detect"
    assert yolo.ckpt_path == str(ckpt("leaky"))
    assert yolo.model.names == dict(enumerate(NAMES))
    assert not yolo.model.training
    assert next(yolo.model.parameters()).dtype == torch.float32


def test_load_checkpoint_with_ema_only(ckpt, tmp_path):
    """A mid-training last.pt keeps the model under 'ema' and None under 'model'."""
    ck = torch.load(ckpt("leaky"), weights_only=False)
    ck["ema"], ck["model"] = ck["model"], None
    torch.save(ck, tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "last.pt").task == "detect"


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory, ckpt) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    valid = ckpt("leaky").read_bytes()
    (d / "folder.pt").mkdir()
    (d / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (d / "notes.pt").write_text("epochs: 100\nthis is a text file, not a checkpoint\n")
    (d / "empty.pt").write_bytes(b"")
    (d / "truncated.pt").write_bytes(valid[: len(valid) // 2])
    with zipfile.ZipFile(d / "archive.pt", "w") as z:
        z.writestr("readme.txt", "not a checkpoint")
    with zipfile.ZipFile(d / "nested.pt", "w") as z:  # torch-like layout, still no data.pkl
        z.writestr("nested/version", "3")
    torch.save(torch.zeros(3), d / "tensor.pt")
    torch.save({"epoch": 3, "optimizer": None, "train_args": {"imgsz": 64}}, d / "no_model.pt")
    torch.save({"model": None, "ema": None}, d / "empty_model.pt")
    torch.save({"model": build(str(CONFIGS / "yolo11n-l3-leaky.yaml")).state_dict()}, d / "state_dict.pt")
    torch.save({"model": torch.nn.Conv2d(3, 8, 3)}, d / "foreign.pt")
    (d / "model.onnx").write_bytes(b"\x08\x07")
    return {p.name: p for p in d.iterdir()} | {"missing.pt": d / "missing.pt", "cls.pt": ckpt("cls")}


BAD = ["missing.pt", "folder.pt", "random.pt", "notes.pt", "empty.pt", "truncated.pt", "archive.pt", "nested.pt",
       "tensor.pt", "no_model.pt", "empty_model.pt", "state_dict.pt", "foreign.pt", "model.onnx", "cls.pt"]


@pytest.mark.parametrize("name", BAD)
def test_load_bad_input_raises_qbench_error(name, bad_inputs):
    path = bad_inputs[name]
    with pytest.raises(QbenchError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg  # names the offending file
    assert "\n" not in msg and msg.endswith("."), msg  # one sentence


def test_load_not_detection_says_so(ckpt):
    with pytest.raises(QbenchError, match="'classify' model"):
        load_checkpoint(ckpt("cls"))


# ----------------------------------------------------------------------------------------------- model_facts


def test_model_facts_leaky(ckpt):
    path = ckpt("leaky")
    facts = model_facts(load_checkpoint(path))
    json.dumps(facts)  # JSON-serialisable as is
    assert facts["source"] == str(path)
    assert facts["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert facts["task"] == "detect" and facts["nc"] == 4 and facts["names"] == NAMES
    assert facts["imgsz"] == IMGSZ and facts["imgsz_source"] == "train_args"
    assert facts["stride"] == [8, 16, 32]
    assert facts["params"] == pytest.approx(3.56e6, rel=0.01)
    assert facts["gflops"] > 0
    assert facts["activations"].get("LeakyReLU", 0) > 0
    assert "SiLU" not in facts["activations"] and "ReLU" not in facts["activations"]
    assert facts["leaky_relu_negative_slopes"] == [0.1]
    assert facts["n_conv"] > 50
    blocks = facts["blocks"]
    assert blocks["C2f"] > 0 and blocks["SPPF"] == 1 and blocks["Detect"] == 1
    assert "C3k2" not in blocks and "C2PSA" not in blocks
    assert facts["yaml"]["activation"] == "nn.LeakyReLU(0.1)"
    assert facts["train_args"] == {"imgsz": IMGSZ, "epochs": 3, "data": "synth/data.yaml"}


def test_model_facts_imgsz_argument_and_path(ckpt):
    at64 = model_facts(ckpt("leaky"))  # a path is loaded first
    at128 = model_facts(ckpt("leaky"), imgsz=128)
    assert at128["imgsz"] == 128 and at128["imgsz_source"] == "argument"
    assert at128["gflops"] == pytest.approx(4 * at64["gflops"], rel=0.05)


@pytest.mark.parametrize("variant, act", [("relu", "ReLU"), ("silu", "SiLU")])
def test_model_facts_twins(ckpt, variant, act):
    facts = model_facts(load_checkpoint(ckpt(variant)))
    assert set(facts["activations"]) == {act}
    assert facts["activations"][act] == model_facts(ckpt("leaky"))["activations"]["LeakyReLU"]
    assert facts["leaky_relu_negative_slopes"] == []
    assert facts["params"] == pytest.approx(3.56e6, rel=0.01)
    leaky = model_facts(ckpt("leaky"))["activation_census"]
    census = facts["activation_census"]
    assert [(a["layer"], a["type"], a["param"]) for a in census] == [(a["layer"], act, None) for a in leaky]
    assert all(a["param"] == pytest.approx(0.1) for a in leaky) and census[0]["layer"] == "model.0.act"


# ----------------------------------------------------------------------------------------------- export_onnx


def test_export_metadata(exported, ckpt):
    proto = onnx.load(str(exported))
    onnx.checker.check_model(proto, full_check=True)
    meta = read_onnx_meta(exported)
    assert meta["opset"] == 17 and meta["opset"] <= 20
    assert meta["names"] == NAMES
    assert meta["imgsz"] == IMGSZ and meta["stride"] == 32 and meta["task"] == "detect"
    assert meta["batch_dynamic"] is True and meta["hw_dynamic"] is False
    assert meta["input_shape"] == ["batch", 3, IMGSZ, IMGSZ]
    assert meta["output_shape"] == ["batch", 4 + len(NAMES), (IMGSZ // 8) ** 2 + (IMGSZ // 16) ** 2 + (IMGSZ // 32) ** 2]
    assert meta["source_sha256"] == hashlib.sha256(ckpt("leaky").read_bytes()).hexdigest()
    assert meta["qbench_version"] == qbench_version()
    raw = meta["metadata"]
    assert raw["imgsz"] == f"[{IMGSZ}, {IMGSZ}]" and raw["qbench_imgsz"] == str(IMGSZ)  # ultralytics' key untouched
    assert proto.ir_version <= 10
    assert not {n.op_type for n in proto.graph.node} & {"NonMaxSuppression", "TopK", "Shape"}  # no NMS, H/W folded


def qbench_version() -> str:
    import qbench

    return qbench.__version__


def test_export_dynamic_batch(exported):
    x = images(3)
    y3 = ort_run(exported, x)
    assert y3.shape[0] == 3
    for i in range(3):
        np.testing.assert_allclose(y3[i : i + 1], ort_run(exported, x[i : i + 1]), rtol=0, atol=1e-4)


def test_export_matches_pytorch(exported, ckpt):
    """ORT output == the PyTorch model's output in eval mode.

    In eval mode Detect returns (y, raw_maps); in export mode it returns y alone. y is the same tensor in both:
    (B, 4 + nc, anchors), boxes decoded to xywh in input pixels, class scores after the sigmoid. The export also
    fuses Conv+BN, so the sums differ by float rounding: observed ~6e-5 px on boxes of up to ~500 px and ~1e-7 on
    scores. Tolerances: boxes atol 1e-3 px, scores atol 1e-6 + rtol 1e-4.
    """
    model = load_checkpoint(ckpt("leaky")).model.eval()
    x = images(2, seed=1)
    with torch.no_grad():
        y, _ = model(torch.from_numpy(x))
    want, got = y.numpy(), ort_run(exported, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got[:, :4], want[:, :4], rtol=0, atol=1e-3)
    np.testing.assert_allclose(got[:, 4:], want[:, 4:], rtol=1e-4, atol=1e-6)
    assert (got[:, 4:] >= 0).all() and (got[:, 4:] <= 1).all()  # sigmoided scores


def test_export_static_batch_at_opset_20(ckpt, tmp_path):
    out = export_onnx(ckpt("leaky"), tmp_path / "static.onnx", imgsz=96, opset=20, dynamic_batch=False)
    meta = read_onnx_meta(out)
    assert meta["opset"] == 20 and meta["imgsz"] == 96
    assert meta["batch_dynamic"] is False and meta["input_shape"] == [1, 3, 96, 96]
    assert ort_run(out, images(1, 96)).shape == (1, 8, 12 * 12 + 6 * 6 + 3 * 3)


def test_export_opset_21_raises(ckpt, tmp_path):
    out = tmp_path / "new.onnx"
    with pytest.raises(QbenchError, match="opset") as err:
        export_onnx(ckpt("leaky"), out, opset=21)
    assert str(ckpt("leaky")) in str(err.value)
    assert not out.exists()


def test_export_imgsz_not_multiple_of_stride_raises(ckpt, tmp_path):
    with pytest.raises(QbenchError, match="multiple of the model's stride 32"):
        export_onnx(ckpt("leaky"), tmp_path / "x.onnx", imgsz=100)
    assert list(tmp_path.iterdir()) == []


def test_export_bad_weights_raises(tmp_path):
    with pytest.raises(QbenchError, match="does not exist"):
        export_onnx(tmp_path / "nope.pt", tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_no_file(ckpt, tmp_path):
    """A checkpoint whose graph has an operator the ONNX exporter cannot convert: the export fails inside
    ultralytics/torch.onnx, and neither out_path nor a temporary file is left behind."""
    ck = torch.load(ckpt("leaky"), weights_only=False)
    layer = ck["model"].model[10]
    shuffled = torch.nn.Sequential(layer, torch.nn.ChannelShuffle(2))  # aten::channel_shuffle has no ONNX symbolic
    for attr in ("f", "i", "type", "np"):  # what ultralytics' forward routing reads
        setattr(shuffled, attr, getattr(layer, attr))
    ck["model"].model[10] = shuffled
    weights = tmp_path / "w" / "unexportable.pt"
    weights.parent.mkdir()
    torch.save(ck, weights)
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(torch.onnx.errors.OnnxExporterError, match="channel_shuffle"):
        export_onnx(weights, out, imgsz=IMGSZ)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []
    assert list(weights.parent.iterdir()) == [weights]


# ----------------------------------------------------------------------------------------------- read_onnx_meta


def test_read_onnx_meta_bad_inputs(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("not an onnx model\n")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), foreign)
    for path, why in [(tmp_path / "missing.onnx", "does not exist"), (text, "not an ONNX model"),
                      (empty, "not an ONNX model"), (foreign, "qbench export")]:
        with pytest.raises(QbenchError, match=why) as err:
            read_onnx_meta(path)
        assert str(path) in str(err.value)


# ----------------------------------------------------------------------------------------------- ultralytics on it


def test_ultralytics_val_runs_on_export(exported, tmp_path):
    """YOLO(onnx).val() works on the batch-dynamic export with read_onnx_meta()['val_args'] (imgsz, rect=False)."""
    from ultralytics import YOLO

    from qbench.data.synth import generate

    data = generate(tmp_path / "synth", n_train=0, n_val=4)
    meta = read_onnx_meta(exported)
    metrics = YOLO(str(exported), task="detect").val(
        data=str(data), batch=2, device="cpu", plots=False, verbose=False, project=str(tmp_path / "runs"),
        name="val", **meta["val_args"])
    assert metrics.box.map50 >= 0  # untrained: the point is that it runs end to end
    assert list(metrics.names.values()) == NAMES
