"""One evaluation path for every model format.

images -> letterbox (as ultralytics) -> batched forward (ONNX Runtime or
PyTorch) -> ultralytics' NMS -> ultralytics' matching and AP -> metrics.json.

Boxes are matched in model-input pixels, as ultralytics' validator does, so
the numbers agree with `yolo val ... rect=False` on the same settings.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import __version__
from .data.dataset import image_files, load_data_yaml, read_image, scored_labels
from .data.preprocess import letterbox, to_input
from .errors import QbenchError
from .files import display_path, sha256_file
from .progress import bar
from .runtime import Detector, check_runtime, open_model

LOG = logging.getLogger("qbench")


@dataclass(frozen=True)
class EvalSettings:
    split: str = "val"
    imgsz: int | None = None  # None: the model's own
    batch: int = 16
    conf: float = 0.001
    iou: float = 0.7
    max_det: int = 300
    threads: int | None = None
    limit: int | None = None  # evaluate only the first N images (smoke tests)
    runtime: str = "ort"  # what runs an .onnx: ONNX Runtime ("ort") or OpenVINO ("openvino")

    def __post_init__(self):
        def whole(name, v, lo, none_ok=False):
            if v is None and none_ok:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise QbenchError(f"{name} {v!r} must be a whole number of at least {lo}"
                                  + (" (or left out)" if none_ok else "") + ".")

        whole("--batch", self.batch, 1)
        whole("--limit", self.limit, 1, none_ok=True)
        whole("--threads", self.threads, 1, none_ok=True)
        whole("--imgsz", self.imgsz, 32, none_ok=True)
        whole("max_det", self.max_det, 1)
        check_runtime(self.runtime)
        for name, v in (("--conf", self.conf), ("--iou", self.iou)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise QbenchError(f"{name} {v!r} must be a number between 0 and 1.")


def nms(raw: np.ndarray, conf: float, iou: float, max_det: int, max_nms: int = 30000, max_wh: int = 7680) -> list:
    """Per image, the kept detections (n, 6: x1 y1 x2 y2 score class) of raw (B, 4 + nc, anchors) outputs.

    This is ultralytics' `non_max_suppression` (class-aware, multi-label, as `yolo val` calls it), always with its
    pure-torch kernel `TorchNMS.nms`. ultralytics itself switches to `torchvision.ops.nms` as soon as anything in the
    process has imported torchvision (ultralytics' trainer does), and the two order boxes of EQUAL score
    differently. INT8 scores tie a lot (a pow2 model's 100 candidates in an image take about 20 distinct scores), so
    the same INT8 model scored up to 0.5 points of mAP50-95 apart depending on what ran before in the process.
    Also without ultralytics' time limit, which gave up on the rest of a batch after 2 s + 0.05 s per image and
    silently dropped their detections on a busy machine.
    """
    import torch
    from ultralytics.utils.nms import TorchNMS
    from ultralytics.utils.ops import xywh2xyxy

    out = []
    for x in torch.from_numpy(raw).transpose(-1, -2):  # (anchors, 4 + nc) per image
        nc = x.shape[1] - 4
        x = x[x[:, 4:].amax(1) > conf]
        box, cls = xywh2xyxy(x[:, :4]), x[:, 4:]
        if nc > 1:  # every class above conf is a detection
            i, j = torch.where(cls > conf)
            d = torch.cat((box[i], cls[i, j, None], j[:, None].float()), 1)
        else:
            score, j = cls.max(1, keepdim=True)
            d = torch.cat((box, score, j.float()), 1)[score.view(-1) > conf]
        if len(d) > max_nms:
            d = d[d[:, 4].argsort(descending=True)[:max_nms]]
        keep = TorchNMS.nms(d[:, :4] + d[:, 5:6] * max_wh, d[:, 4], iou)[:max_det]
        out.append(d[keep])
    return out


def evaluate(model: str | Path | Detector, data: str | Path, settings: EvalSettings = EvalSettings(),
             progress: bool = False, keep_stats: bool = False) -> dict:
    """Evaluate `model` (.onnx / .pt path, or an open Detector) on a split of `data`; returns the metrics dict.

    keep_stats: also return each image's matches under "image_stats" (numpy arrays, not JSON: pop them before
    writing the result), for `delta_interval`.
    """
    import torch
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import DetMetrics, box_iou

    import qbench.ultra  # noqa: F401  (ultralytics offline)

    spec = load_data_yaml(data, require=(settings.split,))
    det = model if isinstance(model, Detector) else open_model(model, settings.threads, settings.runtime)
    if len(det.names) != spec.nc:
        raise QbenchError(f"Model '{det.path}' predicts {len(det.names)} classes but '{spec.yaml_path}' has {spec.nc}; "
                          "evaluate it on the data it was trained for.")
    renamed = _renamed(det, spec)
    if renamed:
        i, a, b = renamed[0]
        LOG.warning(f"'{det.path}' calls class {i} '{a}' but '{spec.yaml_path}' calls it '{b}'"
                    + (f" ({len(renamed)} classes differ)" if len(renamed) > 1 else "")
                    + ": scores are per class id, so check that the model was trained on this data's classes.")
    imgsz = settings.imgsz or det.imgsz
    if det.kind == "onnx" and imgsz != det.imgsz:
        raise QbenchError(f"'{det.path}' was exported for imgsz {det.imgsz}, not {imgsz}; "
                          f"drop --imgsz or re-export with `qbench export --imgsz {imgsz}`.")
    files = image_files(spec, settings.split)
    if settings.limit:
        files = files[: settings.limit]
    labels = scored_labels(spec, settings.split, files)  # all checked before any compute: bad data fails fast
    batch = settings.batch if det.dynamic_batch else 1

    names = {i: n for i, n in enumerate(spec.names)}
    metrics = DetMetrics(names=names)
    matcher = SimpleNamespace(iouv=torch.linspace(0.5, 0.95, 10))
    t_pre = t_inf = t_post = 0.0
    t_start = time.perf_counter()
    image_stats = []
    chunks = [range(i, min(i + batch, len(files))) for i in range(0, len(files), batch)]

    def load(chunk):
        t = time.perf_counter()
        out = [letterbox(read_image(files[i]), imgsz) for i in chunk]
        return out, time.perf_counter() - t

    with ThreadPoolExecutor(max_workers=1) as pool, bar(len(files), f"Evaluating {det.path.name}", progress) as adv:
        pending = pool.submit(load, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            items, dt = pending.result()
            t_pre += dt
            if k + 1 < len(chunks):  # decode the next batch while this one runs
                pending = pool.submit(load, chunks[k + 1])
            t = time.perf_counter()
            raw = det.forward(to_input([it[0] for it in items]))
            t_inf += time.perf_counter() - t
            t = time.perf_counter()
            preds = nms(raw, settings.conf, settings.iou, settings.max_det)
            for i, (_, geo), pred in zip(chunks[k], items, preds):
                lab = labels[i]
                tcls = torch.from_numpy(lab[:, 0])
                pcls, pconf = pred[:, 5], pred[:, 4]
                if len(lab) and len(pred):
                    iou = box_iou(torch.from_numpy(geo.boxes_to_input(lab[:, 1:])), pred[:, :4])
                    tp = BaseValidator.match_predictions(matcher, pcls, tcls, iou).numpy()
                else:
                    tp = np.zeros((len(pred), 10), dtype=bool)
                metrics.update_stats({"tp": tp, "conf": pconf.numpy(), "pred_cls": pcls.numpy(),
                                      "target_cls": tcls.numpy(), "target_img": np.unique(tcls.numpy()),
                                      "im_name": files[i].name})
                if keep_stats:
                    image_stats.append((tp, pconf.numpy(), pcls.numpy(), tcls.numpy()))
            t_post += time.perf_counter() - t
            adv(len(items))
    wall = time.perf_counter() - t_start
    metrics.process(plot=False)
    result = _result(det, spec, files, settings, imgsz, batch, metrics, wall, t_pre, t_inf, t_post)
    if keep_stats:
        result["image_stats"] = image_stats
    return result


RESAMPLES = 200  # bootstrap resamples for delta_interval: about 10 s for two models on 111 images


def _map5095(stats: list, idx: np.ndarray) -> float:
    from ultralytics.utils.metrics import ap_per_class

    tp, conf, pcls, tcls = (np.concatenate([stats[i][k] for i in idx]) for k in range(4))
    if not len(tcls):
        return float("nan")
    return float(ap_per_class(tp, conf, pcls, tcls)[5].mean())


def delta_interval(base: list, other: list, resamples: int = RESAMPLES, level: float = 0.95, seed: int = 0) -> list:
    """Paired bootstrap interval of mAP50-95(other) - mAP50-95(base): the images are resampled with replacement,
    the same draw for both models, `resamples` times; returns [low, high] at `level`. Both lists come from
    `evaluate(..., keep_stats=True)` on the same images. An interval that holds 0 is a difference these images
    do not resolve."""
    if len(base) != len(other):
        raise ValueError(f"paired bootstrap needs the same images ({len(base)} vs {len(other)})")
    rng = np.random.default_rng(seed)
    n = len(base)
    d = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        d.append(_map5095(other, idx) - _map5095(base, idx))
    lo, hi = np.nanpercentile(d, [50 * (1 - level), 50 * (1 + level)])
    return [round(float(lo), 5), round(float(hi), 5)]


def _renamed(det, spec) -> list[tuple[int, str, str]]:
    """(class id, model's name, data's name) of every class the model and the data.yaml name differently."""
    return [(i, str(a), str(b)) for i, (a, b) in enumerate(zip(det.names, spec.names)) if str(a) != str(b)]


def _result(det, spec, files, settings, imgsz, batch, metrics, wall, t_pre, t_inf, t_post) -> dict:
    renamed = _renamed(det, spec)
    p, r, map50, map5095 = (float(x) for x in metrics.mean_results())
    per_class = []
    ap_index = list(metrics.ap_class_index)
    for c, name in enumerate(spec.names):
        row = {"class": name, "id": c, "images": int(metrics.nt_per_image[c]),
               "instances": int(metrics.nt_per_class[c])}
        if c in ap_index:
            cp, cr, c50, c5095 = metrics.class_result(ap_index.index(c))
            row.update(precision=float(cp), recall=float(cr), mAP50=float(c50), **{"mAP50-95": float(c5095)})
        else:
            row.update(precision=None, recall=None, mAP50=None, **{"mAP50-95": None})
        per_class.append(row)
    n = len(files)
    return {
        "model": {"path": display_path(det.path), "format": det.kind, "runtime": det.runtime,
                  "sha256": sha256_file(det.path), **({"runtime_caveat": det.caveat} if det.caveat else {})},
        "data": {"yaml": display_path(spec.yaml_path), "split": settings.split, "images": n,
                 "instances": int(metrics.nt_per_class.sum()),
                 **({"class_names_differ": [{"id": i, "model": a, "data": b} for i, a, b in renamed]}
                    if renamed else {})},
        "metrics": {"precision": p, "recall": r, "mAP50": map50, "mAP50-95": map5095},
        "per_class": per_class,
        "settings": {**asdict(settings), "imgsz": imgsz, "batch": batch, "threads": det.threads},
        "timing": {"wall_s": round(wall, 3), "images_per_s": round(n / wall, 2) if wall else None,
                   "preprocess_ms_per_image": round(1000 * t_pre / max(n, 1), 2),
                   "inference_ms_per_image": round(1000 * t_inf / max(n, 1), 2),
                   "postprocess_ms_per_image": round(1000 * t_post / max(n, 1), 2)},
        "qbench_version": __version__,
    }


def format_table(result: dict) -> str:
    """A plain-text table like ultralytics' validator prints."""
    head = f"{'Class':>14} {'Images':>7} {'Instances':>9} {'P':>7} {'R':>7} {'mAP50':>7} {'mAP50-95':>9}"
    m, d = result["metrics"], result["data"]
    lines = [head, f"{'all':>14} {d['images']:>7} {d['instances']:>9} {m['precision']:>7.3f} {m['recall']:>7.3f} "
                   f"{m['mAP50']:>7.3f} {m['mAP50-95']:>9.3f}"]
    for row in result["per_class"]:
        vals = [row[k] for k in ("precision", "recall", "mAP50")] + [row["mAP50-95"]]
        cells = " ".join(f"{v:>7.3f}" if v is not None else f"{'-':>7}" for v in vals[:3])
        last = f"{vals[3]:>9.3f}" if vals[3] is not None else f"{'-':>9}"
        lines.append(f"{row['class']:>14} {row['images']:>7} {row['instances']:>9} {cells} {last}")
    return "\n".join(lines)
