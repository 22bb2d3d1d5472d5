"""Model backends behind one call: float32 NCHW batch in, raw YOLO head out.

`open_model(path)` gives a `Detector` for an `.onnx` file (ONNX Runtime, the
path every FP32/INT8 comparison goes through) or a `.pt` checkpoint (PyTorch,
for cross-checks). Both return the head's raw `(N, 4 + nc, anchors)` output
(boxes as cx, cy, w, h in input pixels; sigmoid class scores), which
`qbench.evaluation` decodes with ultralytics' NMS.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import QbenchError
from .graph.qdq import activation_quantizers, weight_quantizers
from .models.export import read_onnx_meta
from .models.load import checkpoint_imgsz, load_checkpoint


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ONNX Runtime's session entry that makes x86 int8 matrix products exact (kOrtSessionOptionsAvx2PrecisionMode): it
# rewrites int8 weights to uint8 + 128 so the u8u8 kernels run instead of the u8s8 ones.
EXACT_INT8_ENTRY = "session.x64quantprecision"


def _cpuinfo(field_name: str) -> str | None:
    """The first CPU's `field_name` line of /proc/cpuinfo ("model name", "flags"), or None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field_name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


VNNI_FLAGS = {"avx512_vnni", "avx_vnni"}  # /proc/cpuinfo's names of VNNI: u8 x s8 products added in 32 bits


def cpu_isa() -> str | None:
    """The x86 extensions that decide int8 and float speed (and, without VNNI, int8 saturation), as the kernel lists
    them: "AVX-512, VNNI, bf16", "AVX2, no VNNI", ...; None where /proc/cpuinfo lists no flags (not Linux/x86)."""
    flags = set((_cpuinfo("flags") or "").split())
    if not flags or not flags & {"sse2", "avx", "avx2"}:
        return None
    parts = ["AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2",
             "VNNI" if flags & VNNI_FLAGS else "no VNNI"]
    parts += [name for name, fl in (("bf16", {"avx512_bf16", "amx_bf16"}), ("AMX", {"amx_int8"})) if flags & fl]
    return ", ".join(parts)


def qdq_conv_model(w, w_scale, y_scale: float, y_zero: int, hw: int, pad: int = 0):
    """A QDQ model of one Conv that ONNX Runtime runs as a QLinearConv: x (float on the uint8 grid of step 1) ->
    Q/DQ -> Conv with int8 weights `w` (cout, cin, k, k), per-output-channel scales `w_scale`, zero points 0 ->
    Q/DQ with (y_scale, y_zero); input (1, cin, hw, hw), `pad` on every side, stride 1."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    cout, cin, k = w.shape[0], w.shape[1], w.shape[2]
    c = {"xs": np.float32(1), "xz": np.uint8(0), "w": np.asarray(w, np.int8),
         "ws": np.asarray(w_scale, np.float32).reshape(cout), "wz": np.zeros(cout, np.int8),
         "ys": np.float32(y_scale), "yz": np.uint8(y_zero)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[pad] * 4),
             helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"])]
    out_hw = hw + 2 * pad - k + 1
    graph = helper.make_graph(nodes, "qdq_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, hw, hw])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, cout, out_hw, out_hw])],
                              [numpy_helper.from_array(np.asarray(v), name) for name, v in c.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _saturation_probe(exact: bool) -> float:
    """One output of a 1x1 QDQ Conv whose exact value is 16 * 255 * 127 = 518160 (uint8 input 255, int8 weights
    127, 16 input channels), run as ONNX Runtime optimizes it (QLinearConv)."""
    import numpy as np
    import onnxruntime as ort

    model = qdq_conv_model(np.full((4, 16, 1, 1), 127, np.int8), np.ones(4), 4096.0, 0, hw=4)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if exact:
        so.add_session_config_entry(EXACT_INT8_ENTRY, "1")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return float(sess.run(None, {"x": np.full((1, 16, 4, 4), 255, np.float32)})[0].ravel()[0])


@functools.lru_cache(maxsize=1)
def int8_host() -> dict:
    """How ONNX Runtime runs int8 convolutions on this CPU, probed once per process.

    On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) ONNX Runtime's fast u8s8 kernels add each pair of
    uint8 x int8 products in saturating 16-bit arithmetic (VPMADDUBSW): 255 * 127 * 2 = 64770 is clamped to
    32767, so a model with full-range int8 weights computes something else than on a VNNI CPU or an NPU (the
    gtsdb4 reference model lost 1.5 more points of mAP50-95 to it on an AVX2 CPU). qbench then turns on ONNX
    Runtime's exact mode (EXACT_INT8_ENTRY) in every session, so INT8 accuracy is the same on every CPU; those
    u8u8 kernels are slower, and `int8_kernels` says so next to every latency. Models whose weights fit in 7 bits
    (recipe `reduce_range: true`) cannot saturate and keep the fast kernels. QBENCH_EXACT_INT8=0 keeps ONNX
    Runtime's default kernels: what a deployment with default session options computes on this CPU.
    """
    cpu, isa, exact = _cpu_name(), cpu_isa(), 16 * 255 * 127
    wanted = os.environ.get("QBENCH_EXACT_INT8", "1").strip() != "0"

    def wrong(value: float) -> bool:
        return abs(value - exact) > 0.01 * exact

    try:
        saturates = wrong(_saturation_probe(exact=False))
        exact_mode = saturates and wanted and not wrong(_saturation_probe(exact=True))
    except Exception as e:  # no probe, no claim: sessions keep ONNX Runtime's defaults
        return {"cpu": cpu, "isa": isa, "u8s8_saturates": None, "exact_mode": False,
                "int8_kernels": f"ONNX Runtime's defaults (the saturation probe failed: {e})"}
    if saturates and VNNI_FLAGS & set((_cpuinfo("flags") or "").split()):
        # the kernel lists VNNI, yet ORT's kernels saturate: CPUID hides it from this process (an AVX2 CPU emulated
        # with tests/isa/maskcpu.c, or a hypervisor), so every kernel choice and timing here is such a CPU's
        cpu += " with VNNI hidden from CPUID (it runs the kernels of a CPU without VNNI)"
        isa = f"as listed by the kernel: {isa}"
    if not saturates:
        kernels = "u8s8, exact on this CPU"
    elif exact_mode:
        kernels = (f"exact ({EXACT_INT8_ENTRY}=1: this CPU has no VNNI and its fast u8s8 kernels saturate, so "
                   "full-range int8 weights run ORT's slower u8u8 kernels; 7-bit weights (reduce_range) the fast ones)")
    else:
        kernels = ("SATURATING u8s8 (this CPU has no VNNI and exact mode is off): INT8 accuracy here is lower "
                   "than on a VNNI CPU or an NPU")
    return {"cpu": cpu, "isa": isa, "u8s8_saturates": saturates, "exact_mode": exact_mode,
            "int8_kernels": kernels}


def ort_session(path: str | Path | bytes, threads: int | None = None, optimize: bool = True,
                saturating_ok: bool = False, spinning: bool = False):
    """An ONNX Runtime CPU session with a fixed thread count (intra-op), sequential execution, and exact int8
    arithmetic on every CPU (see `int8_host`); `path` may also be a serialized model (bytes).

    Its idle worker threads sleep at once unless `spinning` (ONNX Runtime's default): qbench keeps several
    sessions open (FP32, INT8, variants) and runs them in turn, and a spinning pool of one session steals the cores
    of the next (on 2 cores that doubled latencies). A session that serves a stream of images, as a deployment
    does, spins: its latency is timed that way (`measure_latency`; at 640 on the 2-core Xeon FP32 ran about 3% and
    INT8 about 11% faster so: results/bench/ort-spinning).

    ONNX Runtime cannot load some models in exact mode (1.32: an int8 constant whose DequantizeLinear feeds two
    nodes, as `quantize_static`'s defaults make of a YOLO decode's anchors: "Attempt to replace the existing
    tensor"). Then this raises a QbenchError that says so, or with `saturating_ok` runs the model on ONNX Runtime's
    default kernels and says why in the session's `qbench_caveat` (None otherwise)."""
    import onnxruntime as ort

    def options(exact: bool):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or default_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        so.log_severity_level = 4 if exact else 3  # a refused exact mode is reported below, not on the console
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")  # 1: ORT's default
        if exact:
            so.add_session_config_entry(EXACT_INT8_ENTRY, "1")
        return so

    src = path if isinstance(path, bytes) else str(path)
    where = "the edited model" if isinstance(path, bytes) else path
    exact = int8_host()["exact_mode"]

    def cannot_load(e: Exception) -> QbenchError:
        return QbenchError(f"ONNX Runtime cannot load '{where}' ({str(e).splitlines()[0][:200]}); re-export it with "
                           "`qbench export`.")

    try:
        sess = ort.InferenceSession(src, options(exact), providers=["CPUExecutionProvider"])
        sess.qbench_caveat = None
        return sess
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        if not exact:
            raise cannot_load(e) from e
        refused = e
    try:  # exact mode refused it: do ONNX Runtime's default kernels load it?
        sess = ort.InferenceSession(src, options(False), providers=["CPUExecutionProvider"])
    except Exception:
        raise cannot_load(refused) from None
    reason = " ".join(str(refused).split()).split(" : ")[-1][:160]
    why = (f"ONNX Runtime's exact int8 mode ({EXACT_INT8_ENTRY}=1), which qbench turns on because this CPU has no "
           f"VNNI, cannot load '{where}' (ONNX Runtime: {reason})")
    if not saturating_ok:
        raise QbenchError(f"{why}; its default kernels can, but they saturate on this CPU. QBENCH_EXACT_INT8=0 runs "
                          "it on them: what a deployment with default session options computes here.")
    sess.qbench_caveat = (f"{why}, so it ran on ONNX Runtime's default int8 kernels, which saturate on this CPU: "
                          "its numbers here are what a deployment with default session options computes on this CPU, "
                          "not what the model computes on a VNNI CPU or an NPU.")
    return sess


RUNTIMES = ("ort", "openvino")  # what runs an .onnx: ONNX Runtime's CPU EP, or OpenVINO's own runtime


@dataclass
class Detector:
    path: Path
    kind: str  # "onnx" or "pt"
    names: list[str]
    imgsz: int
    dynamic_batch: bool
    forward: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    threads: int = 1
    runtime: str = "ort"  # "ort", "openvino" (an .onnx) or "torch" (a .pt)
    caveat: str | None = None  # why this runtime's numbers for this model may not be the model's (openvino_caveat,
    # or ONNX Runtime's exact int8 mode refusing the model: ort_session)
    # a forward set up as a deployment serving a stream of images runs it (ONNX Runtime: worker threads spinning
    # between runs), made on first use; None: `forward` is that already
    streaming: Callable[[], Callable[[np.ndarray], np.ndarray]] | None = field(default=None, repr=False)

    def timed_forward(self) -> Callable[[np.ndarray], np.ndarray]:
        """The forward whose latency qbench reports (`comparison.measure_latency`)."""
        return self.streaming() if self.streaming is not None else self.forward


RUNTIME_NAMES = {"ort": "ONNX Runtime (CPU EP)", "openvino": "OpenVINO (CPU)", "torch": "PyTorch"}


def runtime_versions(used) -> dict[str, str]:
    """{runtime: 'ONNX Runtime (CPU EP) 1.32.0'} for the runtimes in `used`."""
    out = {}
    for r in sorted(set(used)):
        if r == "ort":
            import onnxruntime as mod
        elif r == "openvino":
            import openvino as mod
        else:
            import torch as mod
        out[r] = f"{RUNTIME_NAMES[r]} {mod.__version__.split('-')[0]}"
    return out


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise QbenchError(f"--runtime {runtime!r} is not a runtime qbench runs; use {' or '.join(RUNTIMES)}.")
    return runtime


def openvino_compiled(path: str | Path, threads: int | None = None):
    """An OpenVINO CPU compilation of an ONNX model (OpenVINO reads QDQ ONNX directly and runs its Conv+activation
    groups in int8), latency-oriented, with a fixed thread count, and its float ops in float32.

    OpenVINO's CPU plugin runs float ops in bfloat16 by default on CPUs with bf16 instructions (avx512_bf16, AMX):
    there an FP32 model scored 0.0029 mAP50-95 below ONNX Runtime's on gtsdb4 val, and an INT8 model's float parts
    (the image's Conv kept float, the box decode in pixels) lost precision too. qbench reports what the model
    computes, so it asks for float32 (INFERENCE_PRECISION_HINT), as ONNX Runtime computes."""
    try:
        import openvino as ov
    except ImportError as e:
        raise QbenchError("--runtime openvino needs the openvino package (pip install openvino).") from e
    core = ov.Core()
    try:
        return core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads or default_threads(),
                                                     "PERFORMANCE_HINT": "LATENCY",
                                                     "INFERENCE_PRECISION_HINT": "f32"})
    except RuntimeError as e:
        raise QbenchError(f"OpenVINO cannot compile '{path}' ({str(e).splitlines()[0][:200]}); re-export it with "
                          "`qbench export`.") from e


def signed_activation_quantizers(path) -> int:
    """How many QuantizeLinear nodes of an ONNX file quantize an activation (not an initializer) to int8 (a signed
    zero point); reads the graph only, not external weight data."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    int8_zero_points = {t.name for t in g.initializer if t.data_type == onnx.TensorProto.INT8}
    int8_zero_points |= {n.output[0] for n in g.node if n.op_type == "Constant"
                         and any(a.name == "value" and a.t.data_type == onnx.TensorProto.INT8 for a in n.attribute)}
    weights = {t.name for t in g.initializer}
    return sum(n.op_type == "QuantizeLinear" and n.input[0] not in weights and len(n.input) > 2
               and n.input[2] in int8_zero_points for n in g.node)


def saturating_input_convs(path: str | Path) -> list[str]:
    """The Convs of a QDQ ONNX that read the model input (the image) through an 8-bit quantizer and hold int8 weights
    beyond 7 bits (|q| > 64). On x86 CPUs without VNNI the int8 kernels of ONNX Runtime and OpenVINO add each pair
    of uint8 x int8 products in saturating 16-bit arithmetic; the image's 0-255 codes times such weights overflow
    it (255 * 127 * 2 = 64770 > 32767), and 7-bit weights cannot (255 * 64 * 2 = 32640)."""
    import onnx

    model = onnx.load(str(path))
    image = {a.dequantized for a in activation_quantizers(model).values() if a.producer == "input"}
    weights = weight_quantizers(model)
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.input[0] in image and n.name in weights
            and weights[n.name].q.dtype == np.int8 and np.abs(weights[n.name].q.astype(np.int16)).max() > 64]


def openvino_caveat(path: str | Path) -> str | None:
    """Why OpenVINO's numbers for this ONNX may not be what the model computes, or None.

    - OpenVINO's CPU plugin (2026.4) runs int8 (signed) activations inaccurately, with a zero point of 0 or not,
      and the same values stored as uint8 correctly (docs/runtimes.md, tests/test_openvino.py).
    - On a CPU without VNNI its int8 kernels saturate (`saturating_input_convs`), and it has no exact mode as
      ONNX Runtime has (`int8_host`): a model whose image Conv holds 8-bit weights loses accuracy there that it
      does not lose on a VNNI CPU or an NPU (the gtsdb4 reference model's `cpu` fused layout on OpenVINO: -0.0322
      mAP50-95 on val with VNNI hidden, -0.0031 with it; docs/runtimes.md).
    Its numbers for such a file are what OpenVINO gives for it on this CPU, not the model's accuracy."""
    reasons = []
    n = signed_activation_quantizers(path)
    if n:
        reasons.append(f"{n} activation quantizers of this model are int8 (signed), which OpenVINO's CPU plugin runs "
                       "inaccurately: its numbers here are OpenVINO's for this file, not what the model computes. "
                       "Store the activations as uint8 with zero point + 128 (the same values) before deploying on "
                       "OpenVINO: qbench quantizes that way for --runtime openvino, and "
                       "qbench.quantization.constraints.activations_to_uint8 rewrites an existing model.")
    if int8_host()["u8s8_saturates"]:
        first = saturating_input_convs(path)
        if first:
            reasons.append(f"this CPU has no VNNI: OpenVINO's int8 kernels add pairs of uint8 x int8 products in "
                           f"saturating 16-bit arithmetic, which the image's 0-255 codes overflow in {', '.join(first)}"
                           " (8-bit weights; OpenVINO has no exact mode): its numbers here are this CPU's, lower "
                           "than what the model computes on a VNNI CPU or an NPU. Quantize with keep_input_float "
                           "(the openvino profile) or reduce_range: input for a model that computes the same on "
                           "every CPU.")
    return " Also: ".join(reasons) or None


def _open_onnx(path: Path, threads: int | None, runtime: str = "ort") -> Detector:
    meta = read_onnx_meta(path)
    caveat = None
    if runtime == "openvino":
        caveat = openvino_caveat(path)
        compiled = openvino_compiled(path, threads)
        port = compiled.input(0)
        shape = list(port.get_partial_shape())
        request = compiled.create_infer_request()
        dynamic = shape and shape[0].is_dynamic

        def forward(batch: np.ndarray) -> np.ndarray:
            return request.infer({0: batch})[compiled.output(0)]

        streaming = None  # OpenVINO's threads wait as its defaults have them, in evaluation as in timing
    else:
        sess = ort_session(path, threads, saturating_ok=True)
        caveat = sess.qbench_caveat
        inp = sess.get_inputs()[0]
        shape = inp.shape
        name = inp.name
        dynamic = not isinstance(shape[0], int)

        def forward(batch: np.ndarray) -> np.ndarray:
            return sess.run(None, {name: batch})[0]

        def streaming():
            spinning = ort_session(path, threads, saturating_ok=True, spinning=True)

            def served(batch: np.ndarray) -> np.ndarray:
                return spinning.run(None, {name: batch})[0]

            served.session = spinning
            return served

        forward.session = sess  # each ONNX Runtime forward names its session (its options say how it runs)
    if len(shape) != 4:
        raise QbenchError(f"'{path}' takes a {len(shape)}-D input, not an image batch (N, 3, H, W); "
                          "it is not a YOLO detector exported by ultralytics or qbench.")
    return Detector(path, "onnx", meta["names"], meta["imgsz"], bool(dynamic), forward, threads or default_threads(),
                    runtime, caveat, streaming)


def _open_pt(path: Path, threads: int | None) -> Detector:
    import torch

    yolo = load_checkpoint(path)
    model = yolo.model.float().eval()
    model = model.fuse() if hasattr(model, "fuse") else model
    imgsz = checkpoint_imgsz(yolo) or 640  # ultralytics' default when a checkpoint does not say
    names = [model.names[i] for i in range(len(model.names))]
    n_threads = threads or default_threads()

    def forward(batch: np.ndarray) -> np.ndarray:
        torch.set_num_threads(n_threads)
        with torch.inference_mode():
            out = model(torch.from_numpy(batch))
        out = out[0] if isinstance(out, (list, tuple)) else out
        return out.numpy()

    return Detector(path, "pt", names, imgsz, True, forward, n_threads, "torch")


def open_model(path: str | Path, threads: int | None = None, runtime: str = "ort") -> Detector:
    """A detector for a `.onnx` (run by `runtime`: ONNX Runtime or OpenVINO) or `.pt` (PyTorch) file."""
    p = Path(path)
    check_runtime(runtime)
    if not p.exists():
        raise QbenchError(f"Model file '{p}' does not exist; pass a trained .pt or an exported .onnx.")
    if p.suffix.lower() == ".onnx":
        return _open_onnx(p, threads, runtime)
    if p.suffix.lower() == ".pt":
        return _open_pt(p, threads)
    raise QbenchError(f"'{p}' is neither a .pt checkpoint nor an .onnx model; qbench evaluates those two formats.")
