"""`qat()`: the resumable QAT run over one folder (stages in qbench.qatrain's package doc) and its self-checks."""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import safeload
from ..calibration import build_manifest, load_manifest, save_manifest, scored_overlap
from ..comparison import compare
from ..data.dataset import image_files, load_data_yaml, scored_labels
from ..data.preprocess import load_batch
from ..errors import QbenchError
from ..evaluation import EvalSettings, delta_interval
from ..files import atomic_write_text, check_writable, exclusive, read_json, sha256_file
from ..graph.qdq import activation_quantizers
from ..models.export import export_onnx
from ..models.load import checkpoint_imgsz, load_checkpoint
from ..quantization.equalize import equalize_torch
from ..quantization.ort_engine import quantize_ort
from ..quantization.profile import apply_profile
from ..report.render import load_run, write_report
from .check import MIN_MATCH_DB, divergence_message, fake_quant_match, match_onnx, matches
from .fakequant import is_prepared, strip_qat
from .placement import learned_scales, prepare_qat, read_ranges, write_learned_ranges
from .trainer import last_epoch, reference_losses, results, train_stage

LOG = logging.getLogger("qbench")

QAT_JSON = "qat.json"
EQUALIZE_JSON = "equalize.json"  # the scales of recipe key `equalize`, applied to fp32.onnx and the PyTorch model
RANGE_LR = 1e-2  # AdamW step of a log2 activation scale: crossing to the next power of two takes ~50 steps
CHECK_IMAGES = 2  # calibration images the fake-quant model is checked on before training


def _check_args(weights, data, out, epochs, recipe, profile, fusion, batch, lr0, device):

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise QbenchError(f"epochs {epochs!r} must be a whole number >= 1 (QAT fine-tuning typically needs 1-10).")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 2:
        raise QbenchError(f"batch {batch!r} must be a whole number >= 2, e.g. 16.")
    if not isinstance(lr0, (int, float)) or isinstance(lr0, bool) or not 0 < lr0 < 1:
        raise QbenchError(f"lr0 {lr0!r} must be a number between 0 and 1, e.g. 1e-4 for QAT fine-tuning.")
    w = Path(weights)
    if not w.is_file():
        raise QbenchError(f"Weights file '{w}' does not exist; pass the path of a trained best.pt.")
    rec = apply_profile(recipe, profile, fusion)  # QbenchError for unknown recipe/profile/fusion
    if rec.shift_negative:
        raise QbenchError(f"recipe {rec.name} sets 'shift_negative', which QAT does not support yet (the fake "
                          "quantization would need the same shifts in the PyTorch model); use a recipe without it.")
    placement_keys = [k for k in ("shared_concat_scales", "float_head_outputs") if getattr(rec, k)]
    if placement_keys:
        raise QbenchError(f"{rec.name} sets {' and '.join(placement_keys)}, which QAT does not support yet (its "
                          "fake quantizers learn one scale per tensor, where those keys tie tensors together or "
                          "drop them); run QAT under a profile without them, e.g. --profile cpu --fusion fused.")
    spec = load_data_yaml(data, require=("train", "val"))
    scored_labels(spec, "val", image_files(spec, "val"))  # bad data fails before PTQ and training
    o = Path(out)
    if o.exists() and not o.is_dir():
        raise QbenchError(f"output '{o}' is a file; pass a folder for the QAT run.")
    if str(device).lower() not in ("cpu",) and not str(device).replace(",", "").isdigit() and device != "":
        raise QbenchError(f"device {device!r} is not 'cpu' or a CUDA index like '0'.")
    return rec, spec


def _ptq_stage(weights: Path, data, out: Path, rec, calib, imgsz: int, u8: bool, progress: bool) -> dict:

    fp32 = out / "fp32.onnx"
    ptq = out / "ptq" / "int8.onnx"
    ranges = out / "ptq" / "ranges.json"
    rep_path = out / "ptq" / "quantize.json"
    if fp32.exists() and ptq.exists() and ranges.exists() and rep_path.exists() \
            and (rec.equalize == 0 or (out / EQUALIZE_JSON).exists()):
        return read_json(rep_path, {})
    if calib is None:

        n = min(rec.calib_size, len(image_files(load_data_yaml(data, require=("train",)), "train")))
        calib = save_manifest(build_manifest(data, n, seed=0), out / "calibration.json")
    if rec.equalize > 0:  # quantize_ort equalizes; fp32.onnx is its equalized model, whose scales the PyTorch
        plain = out / "fp32-unequalized.onnx"  # model takes too (equalize.json)
        export_onnx(weights, plain, imgsz=imgsz)
        try:
            rep = quantize_ort(plain, ptq, rec, calib, imgsz=imgsz, progress=progress, save_ranges=ranges,
                               u8_activations=u8, save_prepared=fp32)
        finally:
            plain.unlink(missing_ok=True)
        atomic_write_text(out / EQUALIZE_JSON, json.dumps(rep["equalize"], indent=2) + "\n")
    else:
        if not fp32.exists():
            export_onnx(weights, fp32, imgsz=imgsz)
        rep = quantize_ort(fp32, ptq, rec, calib, imgsz=imgsz, progress=progress, save_ranges=ranges,
                           u8_activations=u8)
    atomic_write_text(rep_path, json.dumps(rep, indent=2, default=str) + "\n")
    return rep


def _calibration_images(out: Path, calib, imgsz: int, n: int) -> np.ndarray:

    manifest = Path(calib) if calib is not None else out / "calibration.json"
    return load_batch(load_manifest(manifest, verify=False)[1][:n], imgsz)


def load_qat_model(path: str | os.PathLike):
    """The fake-quant model of a QAT checkpoint (train/weights/best.pt or last.pt), float32, eval, CPU."""
    from ultralytics.nn.tasks import load_checkpoint

    from .. import ultra  # noqa: F401

    model, _ = load_checkpoint(str(path), device="cpu")
    if not is_prepared(model):
        raise QbenchError(f"'{path}' holds no fake-quant model; pass a checkpoint written by `qbench qat`.")
    return model.float().eval()


def _save_plain(model, src_ckpt: Path, dst: Path, imgsz: int) -> Path:
    """A plain ultralytics checkpoint (fake quantizers stripped) that `export_onnx` and `YOLO()` load."""
    import torch

    plain = strip_qat(copy.deepcopy(model))  # fp32: exactly the weights the fake-quant model was scored with
    for p in plain.parameters():
        p.requires_grad = False
    ck = safeload.load(src_ckpt)
    train_args = dict(ck.get("train_args") or {})
    train_args["imgsz"] = imgsz
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"model": plain, "ema": None, "epoch": -1, "train_args": train_args,
                    "date": ck.get("date"), "version": ck.get("version"), "qbench": "qat, fake quantizers stripped"},
                   tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def _int8_codes_changed(a: Path, b: Path) -> dict:
    """How many int8 weight codes differ between two QDQ models of the same graph (and how many there are)."""
    import onnx
    from onnx import numpy_helper

    def codes(p):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer
                if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(t.dims) == 4}

    ca, cb = codes(a), codes(b)
    changed = sum(int(np.count_nonzero(ca[k] != cb[k])) for k in ca if k in cb and ca[k].shape == cb[k].shape)
    return {"changed": changed, "total": int(sum(v.size for v in ca.values()))}


def qat_command(weights, data, out, recipe, profile, fusion, calib, epochs, imgsz, batch, lr0, device, workers,
                u8_activations, learn_ranges, range_lr, distill, train_overrides: dict) -> str:
    """The `qbench qat` command line that repeats a `qat()` call (options at their CLI defaults left out); calls
    with ultralytics overrides the CLI has no option for say so instead."""
    import shlex

    def q(v) -> str:
        return shlex.quote(str(v))

    parts = ["qbench qat", f"--weights {q(weights)}", f"--data {q(data)}"]
    parts += [f"--{k} {q(v)}" for k, v in (("recipe", None if recipe == "default" else recipe), ("profile", profile),
                                            ("fusion", fusion), ("calib", calib)) if v is not None]
    parts.append(f"--epochs {epochs}")
    parts += [f"--{k} {v}" for k, v, default in (("imgsz", imgsz, None), ("batch", batch, 16), ("lr0", lr0, 1e-4),
                                                 ("device", device, "cpu"), ("workers", workers, 2))
              if v != default]
    parts += ["--no-u8"] if not u8_activations else []
    parts += [f"--learn-ranges --range-lr {range_lr:g}"] if learn_ranges else []
    parts += [f"--distill {distill:g}"] if distill else []
    rest = dict(train_overrides)
    seed = rest.pop("seed", 0)
    parts += [f"--seed {seed}"] if seed else []
    parts.append(f"--out {q(out)}")
    cmd = " ".join(parts)
    return cmd if not rest else f"qbench.qatrain.qat(...) with ultralytics overrides {rest} (no CLI option); nearest: {cmd}"


def qat(weights: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, recipe: str | None = "default",
        profile: str | None = None, fusion: str | None = None, calib: str | os.PathLike | None = None,
        epochs: int = 3, imgsz: int | None = None, batch: int = 16, lr0: float = 1e-4, device: str = "cpu",
        workers: int = 2, u8_activations: bool = True, learn_ranges: bool = False, range_lr: float = RANGE_LR,
        distill: float = 0.0, evaluate: bool = True, eval_limit: int | None = None, progress: bool = False,
        callbacks: dict | None = None, min_match_db: float = MIN_MATCH_DB, allow_scored_calib: bool = False,
        **train_overrides) -> dict:
    """Quantization-aware fine-tuning matching a PTQ recipe/profile, exported to an INT8 QDQ ONNX (see the package
    doc).

    Re-running the same call after an interruption resumes (PTQ and export stages are skipped when their files
    exist; training resumes from train/weights/last.pt; any changed setting is refused). `train_overrides` go to
    ultralytics (e.g. optimizer='SGD', fraction=0.5). Returns the qat.json report.

    Refused with a QbenchError, before any result is written: a PTQ graph whose quantized tensors the PyTorch
    model cannot reproduce, a fake-quant model that does not compute what the PTQ ONNX computes (output SQNR below
    `min_match_db`, naming the first tensor that differs), first training batches that lose far more than the
    checkpoint's own training did, an exported QAT model that does not match its fake-quant model, and a QAT model
    whose int8 weights are the PTQ model's (training changed nothing).
    """
    import onnx
    import torch

    t_all = time.time()
    imgsz_arg = imgsz
    rec, spec = _check_args(weights, data, out, epochs, recipe, profile, fusion, batch, lr0, device)
    if not isinstance(range_lr, (int, float)) or isinstance(range_lr, bool) or not 0 < range_lr < 1:
        raise QbenchError(f"range_lr {range_lr!r} must be a number between 0 and 1, e.g. {RANGE_LR}.")
    if not isinstance(distill, (int, float)) or isinstance(distill, bool) or not 0 <= distill <= 100:
        raise QbenchError(f"distill {distill!r} must be a weight between 0 (off) and 100, e.g. 1.")

    overlap = scored_overlap(calib, data, "val", allow_scored_calib, rec.calib_size) if calib is not None else None
    weights, out = Path(weights), Path(out)
    if (out / QAT_JSON).exists():
        raise QbenchError(f"'{out}' already holds a finished QAT run ({QAT_JSON}); choose another --out or delete it.")
    yolo = load_checkpoint(weights)  # QbenchError for anything that is not a YOLO detection checkpoint
    if imgsz is None:
        imgsz = checkpoint_imgsz(yolo) or 640
    if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz <= 0 or imgsz % 32:
        raise QbenchError(f"imgsz {imgsz!r} must be a positive multiple of 32, e.g. 640.")
    check_writable(out, "the QAT run")
    with exclusive(out, "a QAT run"):  # another qbench qat in the same folder is refused, not mixed in
        seconds = {}

        t = time.time()
        ptq_rep = _ptq_stage(weights, data, out, rec, calib, imgsz, u8_activations, progress)
        seconds["ptq"] = round(time.time() - t, 1)

        qmodel = onnx.load(str(out / "ptq" / "int8.onnx"))
        model = copy.deepcopy(yolo.model).float()
        model.fuse(verbose=False)
        if rec.equalize > 0:  # the same rescaling as fp32.onnx, the model the PTQ graph was quantized from

            equalize_torch(model, read_json(out / EQUALIZE_JSON, {}))
            rec = rec.replace(equalize=0.0)  # the QAT export quantizes qat-fp32.onnx, which is equalized already
        teacher = copy.deepcopy(model) if distill > 0 else None  # the FP32 model the fake-quant one is distilled from
        placement = prepare_qat(model, qmodel, rec, learn_ranges=learn_ranges,
                                calibrated=read_ranges(out / "ptq" / "ranges.json"))
        if placement["unmapped"]:
            un = placement["unmapped"]
            kinds = sorted({f"{u['producer'].rsplit('/', 1)[-1].split('_')[0]} in {u.get('module_class')}" for u in un})
            raise QbenchError(f"QAT cannot reproduce {len(un)} quantized tensors of this model's PTQ graph in PyTorch "
                              f"(first: '{un[0]['tensor']}'; kinds: {', '.join(kinds[:6])}), so it would train a model "
                              "other than the one deployed; no result is written. Quantize this model with PTQ "
                              "(`qbench run`, `--max-drop`) instead.")
        ckpt = getattr(yolo, "ckpt", None) or {}
        reference = reference_losses(ckpt)
        del yolo

        # before any training: the fake-quant model must compute what the PTQ ONNX computes. Checked with the PTQ
        # quantizers frozen (the same placement): a learned scale starts at 2 ** log2(PTQ scale), which float32 may
        # put one ulp off, and a tie that rounds the other way at one tensor spreads through the ones after it.
        t = time.time()
        x_cal = _calibration_images(out, calib, imgsz, CHECK_IMAGES)
        frozen = model
        if learn_ranges:
            frozen = strip_qat(copy.deepcopy(model))
            prepare_qat(frozen, qmodel, rec)
        before = fake_quant_match(frozen, out / "ptq" / "int8.onnx", x_cal, min_match_db)
        del frozen
        model.train()
        seconds["check_placement"] = round(time.time() - t, 1)
        if not matches(before):
            raise QbenchError(divergence_message(before, "before training"))

        resume_settings = {"recipe": rec.to_dict(), "profile": profile, "fusion": rec.activation_fusion,
                           "weights_sha256": sha256_file(weights), "data": str(Path(data).resolve()), "imgsz": imgsz,
                           "batch": batch, "lr0": lr0, "u8_activations": u8_activations,
                           "calib": str(Path(calib).resolve()) if calib is not None else None,
                           "train_overrides": {k: str(v) for k, v in sorted(train_overrides.items())}}
        t = time.time()
        train_info = train_stage(model, weights, data, out, epochs, imgsz, batch, lr0, range_lr, teacher, distill,
                                 str(device), workers, callbacks, train_overrides, len(image_files(spec, "train")),
                                 reference, resume_settings)
        seconds["train_this_call"] = round(time.time() - t, 1)

        tdir = out / "train"
        best = tdir / "weights" / ("best.pt" if (tdir / "weights" / "best.pt").exists() else "last.pt")
        trained = load_qat_model(best)
        plain_pt = _save_plain(trained, best, out / "qat.pt", imgsz)

        t = time.time()

        qat_fp32 = out / "qat-fp32.onnx"
        if not qat_fp32.exists():
            export_onnx(plain_pt, qat_fp32, imgsz=imgsz)
        qat_int8 = out / "qat" / "int8.onnx"
        qat_rep_path = out / "qat" / "quantize.json"
        a_ptq = activation_quantizers(qmodel)
        ranges = out / "ptq" / "ranges.json"
        expected = {}
        if learn_ranges:  # the learned scales, written as the ranges ORT quantizes the QAT model with
            (out / "qat").mkdir(exist_ok=True)
            scales = learned_scales(trained, placement, bool(rec.pow2_scales))
            expected = write_learned_ranges(ranges, out / "qat" / "ranges.json", scales, placement,
                                            {t: (a.qparams.scale, a.qparams.zero_point, a.qparams.qmin, a.qparams.qmax)
                                             for t, a in a_ptq.items()}, rec)
            ranges = out / "qat" / "ranges.json"
        if not (qat_int8.exists() and qat_rep_path.exists()):
            qrep = quantize_ort(qat_fp32, qat_int8, rec, None, imgsz=imgsz, ranges=ranges, u8_activations=u8_activations)
            atomic_write_text(qat_rep_path, json.dumps(qrep, indent=2, default=str) + "\n")
        qrep = read_json(qat_rep_path, {})
        seconds["export"] = round(time.time() - t, 1)
        a_qat = activation_quantizers(onnx.load(str(qat_int8)))
        differ = []
        for k, a in a_ptq.items():
            b, q = a_qat.get(k), a.qparams
            if b is None or (b.qparams.zero_point, b.qparams.qmin, b.qparams.qmax) != (q.zero_point, q.qmin, q.qmax) \
                    or not np.isclose(b.qparams.scale, expected.get(k, q.scale), rtol=1e-6, atol=0):
                differ.append(k)
        if differ:
            raise RuntimeError(f"the QAT INT8 model's activation quantizers differ from the fake-quant model's: "
                               f"{differ[:5]}")
        range_changes = [{"tensor": k, "ptq_scale": a_ptq[k].qparams.scale, "qat_scale": v} for k, v in expected.items()
                         if k in placement["learned"] and not np.isclose(v, a_ptq[k].qparams.scale, rtol=1e-6, atol=0)]

        t = time.time()
        match = match_onnx(trained, qat_int8, data, imgsz)
        after = fake_quant_match(trained, qat_int8, _calibration_images(out, calib, imgsz, CHECK_IMAGES), min_match_db)
        if not matches(after):
            raise QbenchError(divergence_message(after, "after training, the exported QAT model"))
        codes = _int8_codes_changed(out / "ptq" / "int8.onnx", qat_int8)
        if codes["changed"] == 0 and not range_changes:
            raise QbenchError(f"the QAT model's int8 weights are exactly the PTQ model's (0 of {codes['total']} codes "
                              f"changed, the checkpoint ultralytics picked is {best.name} of {last_epoch(tdir)} epochs), "
                              "so there is no QAT result to report; train longer (--epochs) or on more images.")
        seconds["match"] = round(time.time() - t, 1)
        ops = qrep.get("ort_optimized_ops", {})
        kernels = {"QLinearConv": ops.get("QLinearConv", 0), "float_Conv": ops.get("Conv", 0),
                   "quantized_convs": placement["quantized_convs"], "qlinear_ops": qrep.get("qlinear_ops", {}),
                   "ptq_qlinear_ops": ptq_rep.get("qlinear_ops", {})}

        cmp = None
        if evaluate:

            t = time.time()
            c = compare(out / "fp32.onnx", out / "ptq" / "int8.onnx", data, EvalSettings(limit=eval_limit),
                        progress=progress, extra={"qat": qat_int8}, keep_stats=True)
            stats = c.pop("image_stats")
            seconds["compare"] = round(time.time() - t, 1)
            rows = c["models"]
            f, p, q = (rows[k]["metrics"]["mAP50-95"] for k in ("fp32", "int8", "qat"))
            ptq_ci = rows["int8"]["delta_ci95"]["mAP50-95"]
            cmp = {"table": {k: {"mAP50": r["metrics"]["mAP50"], "mAP50-95": r["metrics"]["mAP50-95"],
                                 "delta_mAP50-95": r["delta"]["mAP50-95"], "batch1_median_ms": r["latency"]
                                 ["batch1_median_ms"], "speedup_batch1": r["speedup_batch1"], "size_mb": r["size_mb"],
                                 "delta_ci95_mAP50-95": r["delta_ci95"]["mAP50-95"]}
                             for k, r in rows.items()},
                   # paired bootstrap over the val images of QAT - PTQ: whether the gain is resolved at all
                   "qat_minus_ptq": q - p, "qat_minus_ptq_ci95": delta_interval(stats["int8"], stats["qat"]),
                   "ptq_drop": f - p, "qat_drop": f - q,
                   # a share of the PTQ loss only where there is a resolved loss to share (its interval excludes 0)
                   "recovered_fraction": (q - p) / (f - p) if f - p > 0 and ptq_ci and ptq_ci[1] < 0 else None,
                   "threads": c["threads"], "settings": c["settings"]}
            atomic_write_text(out / "compare.json", json.dumps(c, indent=2, default=str) + "\n")

        import ultralytics

        sessions = train_info["sessions"]
        report = {
            "command": qat_command(weights, data, out, recipe, profile, fusion, calib, epochs, imgsz_arg, batch, lr0,
                                   device, workers, u8_activations, learn_ranges, range_lr, distill, train_overrides),
            "weights": str(weights), "data": str(data), "out": str(out), "recipe": rec.name, "profile": profile,
            "calibration": str(calib if calib is not None else out / "calibration.json"),
            "calibration_check": overlap or {"split": "train", "in_scored_split": 0},
            "fusion": rec.activation_fusion, "u8_activations": u8_activations, "imgsz": imgsz,
            "activation_ranges": {"mode": "learned" if learn_ranges else "frozen at PTQ", "range_lr": range_lr,
                                  "learned_tensors": len(placement["learned"]),
                                  "changed_from_ptq": len(range_changes), "changes": range_changes},
            "epochs": epochs, "epochs_run": last_epoch(tdir), "device": str(device), "batch": batch, "lr0": lr0,
            "distill": distill,
            "equalize": {k: v for k, v in read_json(out / EQUALIZE_JSON, {}).items() if k != "layers"} or None,
            "train_overrides": train_overrides, "resumed_from_epoch": train_info["resumed_from_epoch"],
            "train_sessions": sessions, "train_seconds": round(sum(s["seconds"] for s in sessions), 1),
            "train_results": results(tdir), "checkpoint": str(best),
            "models": {"fp32": str(out / "fp32.onnx"), "ptq": str(out / "ptq" / "int8.onnx"), "qat_pt": str(plain_pt),
                       "qat_fp32": str(qat_fp32), "qat": str(qat_int8)},
            "placement": {k: v for k, v in placement.items()
                          if k not in ("convs", "hooks", "taps", "learned", "pass_through_of")},
            "checks": {"before_training": {k: v for k, v in before.items() if k != "tensors"},
                       "exported": {k: v for k, v in after.items() if k != "tensors"},
                       "loss_guard": train_info.get("loss_guard"), "int8_weight_codes": codes,
                       "min_match_db": min_match_db},
            "onnx_vs_torch": match, "kernels": kernels, "compare": cmp,
            "seconds": {**seconds, "total_this_call": round(time.time() - t_all, 1)},
            "versions": {"torch": torch.__version__, "ultralytics": ultralytics.__version__,
                         "python": platform.python_version()},
        }
        (out / "placement.json").write_text(json.dumps(placement, indent=2, default=str) + "\n")
        if cmp is not None:  # summary.md + report.html (qbench.report): the table, the training, the checks

            write_report([load_run(out, qat=report)], out)  # qat.json is not written yet: the report comes from memory
        atomic_write_text(out / QAT_JSON, json.dumps(report, indent=2, default=str) + "\n")
        return report
