"""NPU profiles: recipe keys pow2_scales / activation_fusion, the profile loader, the QDQ graph constraints and
`qbench compare --profile` (untrained exports at IMGSZ, real ORT quantization and sessions, the real CLI)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import IMGSZ, run_cli
from onnx import numpy_helper

from qbench.errors import QbenchError
from qbench.quantization import (
    apply_profile,
    available_profiles,
    load_profile,
    load_recipe,
    quantize_ort,
    recipe_from_dict,
)
from qbench.quantization.constraints import pow2_ceil, round_scales_to_pow2
from qbench.quantization.profile import OPTIONAL_PROFILE_KEYS, PROFILE_KEYS, TARGET_KEYS

N_ACTIVATIONS = 57  # activations after a Conv in the level-3 YOLO (every Conv block, Detect's included)
QDQ = ("QuantizeLinear", "DequantizeLinear")


# --------------------------------------------------------------------------- fixtures and graph helpers
@pytest.fixture(scope="session")
def variant(request, calib, tmp_path_factory):
    """variant(act, profile, fusion=None) -> (report, ModelProto, path): the untrained {act} export quantized with
    the default recipe under the profile, once per session."""
    cache = {}

    def get(act: str, profile: str, fusion: str | None = None):
        key = (act, profile, fusion)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{act}-{profile}-{fusion or 'own'}") / "int8.onnx"
            recipe = apply_profile("default", profile, fusion)
            report = quantize_ort(request.getfixturevalue(f"{act}_onnx"), out, recipe, calib)
            cache[key] = (report, onnx.load(str(out)), out)
        return cache[key]

    return get


class Graph:
    def __init__(self, model):
        self.nodes = list(model.graph.node)
        self.prod = {o: n for n in self.nodes for o in n.output}
        self.cons = {}
        for n in self.nodes:
            for i in n.input:
                self.cons.setdefault(i, []).append(n)
        self.init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def ops(self) -> Counter:
        return Counter(n.op_type for n in self.nodes)

    def source(self, tensor: str):
        """(producer of the float tensor, went through Q->DQ) for an input tensor."""
        p = self.prod.get(tensor)
        if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in self.prod \
                and self.prod[p.input[0]].op_type == "QuantizeLinear":
            return self.prod.get(self.prod[p.input[0]].input[0]), True
        return p, False

    def conv_to(self, op_type: str) -> Counter:
        """How each `op_type` node reads a Conv output: {'qdq': n, 'direct': m}."""
        how = Counter()
        for n in self.nodes:
            if n.op_type == op_type:
                src, through_qdq = self.source(n.input[0])
                if src is not None and src.op_type == "Conv":
                    how["qdq" if through_qdq else "direct"] += 1
        return how

    def scale_inputs(self) -> dict[str, str]:
        """scale initializer -> 'activation' | 'weight' | 'bias' for every Q/DQ."""
        kinds = {}
        for n in self.nodes:
            if n.op_type in QDQ:
                x = n.input[0]
                kinds[n.input[1]] = ("bias" if self.init[x].dtype == np.int32 else "weight") if x in self.init \
                    else "activation"
        return kinds


def is_pow2(a: np.ndarray) -> bool:
    mant, _ = np.frexp(np.asarray(a, np.float32))
    return bool(np.all(mant == 0.5))


def run_finite(path, calib) -> np.ndarray:
    from qbench.calibration import CalibrationReader, load_manifest
    from qbench.runtime import ort_session

    _, paths = load_manifest(calib)
    x = CalibrationReader(paths[:2], IMGSZ, "images", batch=2).get_next()["images"]
    y = ort_session(path, 1).run(None, {"images": x})[0]
    assert np.isfinite(y).all()
    return y


# --------------------------------------------------------------------------- profiles and recipe keys
def test_shipped_profiles():
    assert available_profiles() == ["cpu", "npu-symmetric", "npu-symmetric-pow2", "nxp-neutron", "openvino",
                                    "rknn-rk3588"]
    assert load_profile("openvino").settings == {**load_profile("cpu").settings, "activation_fusion": "fused",
                                                 "shared_concat_scales": True, "float_head_outputs": True,
                                                 "keep_input_float": True}
    ov = apply_profile("default", "openvino")
    assert ov.keep_input_float is True and ov.reduce_range is False
    assert apply_profile("reduce-range", "openvino").reduce_range is True  # the profile leaves 7-bit weights alone
    # a profile's 7-bit input Convs (NNCF's overflow fix) keep a recipe's `true` (every weight 7-bit)
    from qbench.quantization.profile import profile_from_dict

    nncf_like = profile_from_dict({**load_profile("cpu").settings, "reduce_range": "input"}, "nncf-like")
    assert apply_profile("default", nncf_like).reduce_range == "input"
    assert apply_profile("reduce-range", nncf_like).reduce_range is True
    assert load_recipe("default").replace(reduce_range="INPUT").reduce_range == "input"
    with pytest.raises(QbenchError, match=r"'reduce_range' is 'first'; allowed: true .*, input .* or false"):
        load_recipe("default").replace(reduce_range="first")
    cpu, sym, pow2 = (load_profile(p) for p in ("cpu", "npu-symmetric", "npu-symmetric-pow2"))
    assert (cpu.int_types, sym.int_types, pow2.int_types) == (("int8",), ("int8", "int16"), ("int8", "int16"))
    assert load_profile("rknn-rk3588").settings == {**cpu.settings, "activation_type": "int8",
                                                    "weight_symmetric": False, "activation_fusion": "fused"}
    assert load_profile("nxp-neutron").settings == {**cpu.settings, "activation_type": "int8",
                                                    "activation_fusion": "unfused"}
    assert cpu.settings == {"activation_type": "uint8", "activation_symmetric": False, "weight_type": "int8",
                            "weight_symmetric": True, "per_channel": True, "pow2_scales": False,
                            "activation_fusion": "ort"}
    assert sym.settings == {**cpu.settings, "activation_type": "int8", "activation_symmetric": True,
                            "activation_fusion": "fused"}
    assert pow2.settings == {**sym.settings, "pow2_scales": True}
    for p in (cpu, sym, pow2):
        assert p.path.read_text().startswith("# ")  # a comment header saying what hardware it models
    r = apply_profile("percentile", "npu-symmetric", "unfused")
    assert r.name == "percentile+npu-symmetric(unfused)" and r.activation_fusion == "unfused"
    assert (r.method, r.activation_type, r.activation_symmetric) == ("percentile", "int8", True)
    assert apply_profile("default", "npu-symmetric-pow2").name == "default+npu-symmetric-pow2(fused)"
    assert apply_profile("default", None, "unfused").name == "default(unfused)"
    assert apply_profile("default", None) == load_recipe("default")
    with pytest.raises(QbenchError, match=r"^target npu-symmetric: 'fusion' is 'both'; allowed: ort, fused, unfused"):
        apply_profile("default", "npu-symmetric", "both")
    with pytest.raises(QbenchError, match=r"profile 'tpu' is neither a file nor a profile name .*npu-symmetric-pow2"):
        load_profile("tpu")


def test_profile_loader_refuses_bad_keys_and_values(tmp_path):
    good = "".join(f"{k}: {v}\n" for k, v in load_profile("npu-symmetric").settings.items()).lower()
    f = tmp_path / "mynpu.yaml"
    allowed = ", ".join(PROFILE_KEYS + OPTIONAL_PROFILE_KEYS + TARGET_KEYS)
    cases = {
        good + "foo: 1\n": f"target mynpu: unknown key 'foo'; allowed: {allowed}.",
        good + "method: entropy\n": "target mynpu: 'method' is a recipe key, not a hardware key; a target holds "
                                    f"only {allowed}",
        good.replace("activation_type: int8", "activation_type: fp8"):
            "target mynpu: 'activation_type' is 'fp8'; allowed: uint8, int8.",
        good.replace("activation_fusion: fused", "activation_fusion: partly"):
            "target mynpu: 'activation_fusion' is 'partly'; allowed: ort, fused, unfused.",
        good.replace("pow2_scales: false", "pow2_scales: sometimes"):
            "target mynpu: 'pow2_scales' is 'sometimes'; allowed: true or false.",
        good.replace("per_channel: true\n", ""): "target mynpu: missing 'per_channel'",
        "- a\n- list\n": "target mynpu must be a YAML mapping of the hardware keys",
    }
    for text, msg in cases.items():
        f.write_text(text)
        with pytest.raises(QbenchError) as e:
            load_profile(f)
        assert str(e.value).startswith(msg), (text, str(e.value))
    f.write_text(good)
    assert load_profile(f).name == "mynpu" and load_profile(str(f)).settings == load_profile("npu-symmetric").settings


def test_pow2_needs_zero_points_of_zero(tmp_path):
    with pytest.raises(QbenchError) as e:
        recipe_from_dict({"pow2_scales": True}, "r")
    msg = str(e.value)
    assert msg.startswith("recipe r: 'pow2_scales: true' needs zero points of 0 (activation_symmetric: true, "
                          "weight_symmetric: true, activation_type: int8, weight_type: int8), but it has "
                          "activation_symmetric: false, activation_type: uint8"), msg
    f = tmp_path / "asym.yaml"
    f.write_text("".join(f"{k}: {v}\n" for k, v in load_profile("cpu").settings.items()).lower()
                 .replace("pow2_scales: false", "pow2_scales: true"))
    with pytest.raises(QbenchError, match=r"^target asym: 'pow2_scales: true' needs zero points of 0 .* but it has "
                                          r"activation_symmetric: false, activation_type: uint8"):
        load_profile(f)
    r = recipe_from_dict({"pow2_scales": True, "activation_symmetric": True, "activation_type": "int8"}, "ok")
    assert r.pow2_scales and load_recipe("default").pow2_scales is False
    assert load_recipe("default").activation_fusion == "ort"


def test_pow2_ceil_rounds_up_exactly():
    s = np.array([0.3, 0.25, 1.0, 3e-7, 2.0 ** -20 * 1.0000001, 5.0], np.float32)
    p = pow2_ceil(s)
    np.testing.assert_array_equal(p, np.array([0.5, 0.25, 1.0, 2.0 ** -21, 2.0 ** -19, 8.0], np.float32))
    assert is_pow2(p) and np.all(p >= s) and np.all(p < 2 * s)


# --------------------------------------------------------------------------- graphs
@pytest.mark.slow
def test_npu_symmetric_int8_activations_with_zero_points_of_zero(variant):
    report, model, _ = variant("leaky", "npu-symmetric")
    assert report["recipe_source"] == "default+npu-symmetric(fused)" and report["recipe"]["activation_type"] == "int8"
    g = Graph(model)
    qs = [n for n in g.nodes if n.op_type == "QuantizeLinear"]
    assert len(qs) > 50
    for n in g.nodes:
        if n.op_type in QDQ:
            zp = g.init[n.input[2]]
            assert not zp.any(), n.name  # int8 activations and weights, int32 biases: all zero
    assert {g.init[q.input[2]].dtype for q in qs} == {np.dtype(np.int8)}  # every activation is int8
    assert report["head"]["qdq_in_decode"] == []


def test_npu_symmetric_pow2_every_scale_a_power_of_two(variant, leaky_onnx):
    report, model, _ = variant("leaky", "npu-symmetric-pow2")
    g = Graph(model)
    kinds = g.scale_inputs()
    assert Counter(kinds.values()) == {"activation": report["constraints"]["pow2"]["activation_scales"],
                                       "weight": 63, "bias": 63}
    for t in model.graph.initializer:  # every scale in the model, not only those found through Q/DQ
        if t.name.endswith("_scale"):
            assert is_pow2(g.init[t.name]), t.name
    # rounded up from the scales the same calibration gives without pow2
    _, plain, _ = variant("leaky", "npu-symmetric")
    plain_init = Graph(plain).init
    acts = [s for s, k in kinds.items() if k == "activation"]
    for s in acts:
        np.testing.assert_array_equal(g.init[s], pow2_ceil(plain_init[s]), err_msg=s)
    assert sum(not np.array_equal(g.init[s], plain_init[s]) for s in acts) > len(acts) // 2
    # int32 bias scale = input scale x weight scale, per channel; weights and biases requantized from the floats
    fp32 = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(leaky_onnx)).graph.initializer}
    n_bias = 0
    for conv in g.nodes:
        if conv.op_type != "Conv" or len(conv.input) < 3 or g.prod.get(conv.input[2]) is None:
            continue
        x_dq, w_dq, b_dq = (g.prod[i] for i in conv.input)
        w_scale, b_scale = g.init[w_dq.input[1]], g.init[b_dq.input[1]]
        np.testing.assert_array_equal(b_scale, g.init[x_dq.input[1]] * w_scale, err_msg=conv.name)
        w_name = w_dq.input[0].removesuffix("_quantized")
        w = fp32[w_name].astype(np.float64)
        expected = np.clip(np.round(w / w_scale.astype(np.float64).reshape(-1, 1, 1, 1)), -127, 127)
        np.testing.assert_array_equal(g.init[w_dq.input[0]], expected.astype(np.int8), err_msg=w_name)
        n_bias += 1
    assert n_bias == 63
    con = report["constraints"]["pow2"]
    assert con["requantized_from_float"] == 126 and con["requantized_from_int8"] == []
    assert con["bias_values_clipped"] == 0 and con["values_rounded"] > 0
    assert report["head"]["qdq_in_decode"] == []


def test_pow2_without_the_float_model_dequantizes_and_requantizes(variant, tmp_path, calib):
    _, model, _ = variant("leaky", "npu-symmetric")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    rep = round_scales_to_pow2(m, None)
    assert len(rep["requantized_from_int8"]) == rep["weight_scales"] + rep["bias_scales"] == 126
    assert rep["requantized_from_float"] == 0
    g = Graph(m)
    assert all(is_pow2(g.init[s]) for s in g.scale_inputs())
    onnx.save(m, str(tmp_path / "fallback.onnx"))
    run_finite(tmp_path / "fallback.onnx", calib)


@pytest.mark.parametrize("fusion", ["fused", "ort", "unfused"])
def test_leaky_fusion_modes(fusion, variant):
    report, model, _ = variant("leaky", "npu-symmetric", fusion)
    g = Graph(model)
    assert g.ops()["LeakyRelu"] == N_ACTIVATIONS
    if fusion == "fused":  # the NPU's Conv+LeakyRelu kernel: only the LeakyRelu output is quantized
        assert g.conv_to("LeakyRelu") == {"direct": N_ACTIVATIONS}
        assert report["constraints"]["fused"] == {"LeakyRelu": N_ACTIVATIONS}
        assert report["constraints"]["qdq_pairs_removed"] == N_ACTIVATIONS
    else:  # ORT quantizes the Conv output and then the LeakyRelu output
        assert g.conv_to("LeakyRelu") == {"qdq": N_ACTIVATIONS}
        assert "fused" not in report["constraints"]
    assert report["head"]["qdq_in_decode"] == []


@pytest.mark.slow
def test_relu_unfused_keeps_relu_with_its_own_qdq(variant, relu_onnx):
    assert Graph(onnx.load(str(relu_onnx))).ops()["Relu"] == N_ACTIVATIONS
    _, ort_default, _ = variant("relu", "cpu")  # asymmetric activations: ORT folds Relu into the Conv's range
    assert Graph(ort_default).ops()["Relu"] == 0
    _, unfused, _ = variant("relu", "cpu", "unfused")
    g = Graph(unfused)
    relus = [n for n in g.nodes if n.op_type == "Relu"]
    assert len(relus) == N_ACTIVATIONS and g.conv_to("Relu") == {"qdq": N_ACTIVATIONS}
    for n in relus:  # requantized on its own: DQ in, Q out
        assert g.prod[n.input[0]].op_type == "DequantizeLinear"
        assert [c.op_type for c in g.cons[n.output[0]]] == ["QuantizeLinear"]
    # with symmetric activations ORT keeps every Relu (it would clip the Conv's negative half otherwise) ...
    _, sym_ort, _ = variant("relu", "npu-symmetric", "ort")
    assert Graph(sym_ort).conv_to("Relu") == {"qdq": N_ACTIVATIONS}
    # ... so 'fused' removes the Conv->Relu Q/DQ itself
    report, sym_fused, _ = variant("relu", "npu-symmetric")
    assert Graph(sym_fused).conv_to("Relu") == {"direct": N_ACTIVATIONS}
    assert report["constraints"]["fused"] == {"Relu": N_ACTIVATIONS}


@pytest.mark.slow
def test_silu_fused_quantizes_only_the_product(variant):
    report, model, _ = variant("silu", "npu-symmetric")
    g = Graph(model)
    assert report["constraints"]["fused"] == {"SiLU": N_ACTIVATIONS}
    assert report["constraints"]["qdq_pairs_removed"] == 2 * N_ACTIVATIONS  # conv output and sigmoid output
    assert g.conv_to("Sigmoid") == {"direct": N_ACTIVATIONS}  # the class sigmoid of the decode reads a Concat
    muls = [n for n in g.nodes if n.op_type == "Mul" and g.source(n.input[0])[0] is not None
            and g.source(n.input[0])[0].op_type in ("Conv", "Sigmoid")]
    assert len(muls) == N_ACTIVATIONS
    for mul in muls:
        assert sorted(g.prod[i].op_type for i in mul.input) == ["Conv", "Sigmoid"]  # both straight, no Q/DQ
        assert [c.op_type for c in g.cons[mul.output[0]]] == ["QuantizeLinear"]
    assert report["head"]["qdq_in_decode"] == []


VARIANTS = [("leaky", "cpu", None), ("leaky", "npu-symmetric", None), ("leaky", "npu-symmetric", "ort"),
            ("leaky", "npu-symmetric", "unfused"), ("leaky", "npu-symmetric-pow2", None), ("relu", "cpu", None),
            ("relu", "cpu", "unfused"), ("relu", "npu-symmetric", None), ("relu", "npu-symmetric", "ort"),
            ("silu", "npu-symmetric", None)]


@pytest.mark.parametrize("act,profile,fusion", VARIANTS)
def test_every_variant_runs_in_ort(act, profile, fusion, variant, calib):
    report, _, path = variant(act, profile, fusion)
    assert report["head"]["qdq_in_decode"] == []
    assert run_finite(path, calib).shape == (2, 8, 84)  # 4 + 4 classes, (8^2 + 4^2 + 2^2) anchors at 64 px
    recipe = load_recipe(path.with_name("recipe.yaml"))
    assert recipe.activation_fusion == (fusion or load_profile(profile).settings["activation_fusion"])
    assert recipe.pow2_scales == (profile == "npu-symmetric-pow2")


# --------------------------------------------------------------------------- command line
@pytest.mark.slow
def test_cli_compare_profiles(leaky_onnx, calib, synth_small, tmp_path):
    out = tmp_path / "cmp"
    r = run_cli("compare", str(leaky_onnx), "--data", str(synth_small), "--calib", str(calib), "--profile", "cpu",
                "--profile", "npu-symmetric", "--both-fusions", "--batch", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = ["int8[cpu,fused]", "int8[cpu,unfused]", "int8[npu-symmetric,fused]", "int8[npu-symmetric,unfused]"]
    c = json.loads((out / "compare.json").read_text())
    assert list(c["models"]) == ["fp32", *rows] and list(c["variants"]) == rows
    for row in rows:
        assert f"| {row} |" in r.stdout
        assert set(c["models"][row]["metrics"]) >= {"mAP50", "mAP50-95"}
        folder = out / row[5:-1].replace(",", "-")
        assert {p.name for p in folder.iterdir()} == {"int8.onnx", "recipe.yaml", "quantize.json"}
        q = json.loads((folder / "quantize.json").read_text())
        assert q["recipe_source"] == c["variants"][row]["recipe"] == f"default+{row[5:-1].replace(',', '(')})"
        assert q["constraints"]["activation_fusion"] == row.split(",")[1][:-1]
    assert c["variants"]["int8[npu-symmetric,fused]"]["constraints"]["qdq_pairs_removed"] == N_ACTIVATIONS
    assert (out / "compare.md").read_text() in r.stdout


def test_cli_compare_int8_with_profile_is_refused(leaky_onnx, synth_small, calib):
    r = run_cli("compare", str(leaky_onnx), str(leaky_onnx), "--data", str(synth_small), "--calib", str(calib),
                "--profile", "npu-symmetric")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: pass either an INT8 model") and "--profile" in lines[0]


@pytest.mark.slow
def test_cli_quantize_with_profile_and_fusion(leaky_onnx, calib, tmp_path):
    out = tmp_path / "q" / "int8.onnx"
    r = run_cli("quantize", str(leaky_onnx), "--calib", str(calib), "--out", str(out),
                "--profile", "npu-symmetric-pow2", "--fusion", "unfused")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "recipe default+npu-symmetric-pow2(unfused): 0 Conv->activation Q/DQ pairs removed" in r.stdout
    rec = load_recipe(out.with_name("recipe.yaml"))
    assert rec.pow2_scales and rec.activation_fusion == "unfused" and rec.activation_type == "int8"
    q = json.loads(out.with_name("quantize.json").read_text())
    assert q["constraints"]["pow2"]["requantized_from_int8"] == []
    assert all(is_pow2(numpy_helper.to_array(t)) for t in onnx.load(str(out)).graph.initializer
               if t.name.endswith("_scale"))


def test_cli_run_with_an_unknown_profile(tmp_path, synth_small, default_weights):
    out = tmp_path / "run"
    r = run_cli("run", "--weights", str(default_weights), "--data", str(synth_small), "--out", str(out),
                "--profile", "tpu")
    assert r.returncode == 2 and not out.exists() and not list(tmp_path.iterdir())
    assert r.stderr.strip().startswith("error: profile 'tpu' is neither a file nor a profile name")


@pytest.mark.slow
def test_cli_run_with_a_profile(tmp_path, synth_small, default_weights):
    out = tmp_path / "run"
    r = run_cli("run", "--weights", str(default_weights), "--data", str(synth_small), "--out", str(out),
                "--profile", "npu-symmetric", "--fusion", "unfused", "--batch", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = load_recipe(out / "recipe.yaml")
    assert (rec.activation_type, rec.activation_symmetric, rec.activation_fusion) == ("int8", True, "unfused")
    assert json.loads((out / "run.json").read_text())["recipe"] == "default+npu-symmetric(unfused)"
    assert "recipe `default+npu-symmetric(unfused)`" in (out / "summary.md").read_text()
