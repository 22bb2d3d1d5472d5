"""Training wrapper over ultralytics: offline, deterministic, results in one folder.

`train()` runs `YOLO(model).train(...)` with qbench's defaults (no AMP check
download, plots with a local font, fixed seed) and leaves in `out_dir`:

    weights/best.pt   the checkpoint to quantize (last.pt is dropped: it carries
                      the optimizer state and is only needed to resume)
    args.yaml         every argument ultralytics trained with
    results.csv       per-epoch losses and val metrics
    train.json        qbench's summary: model config, data, final val metrics,
                      wall time, versions
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .data.dataset import load_data_yaml
from .errors import QbenchError
from .files import check_writable, command_line
from .resources import shipped

CONFIG_DIR = shipped("configs") / "models"


def resolve_model(model: str) -> str:
    """A model argument: a .pt checkpoint, a model YAML path, or a name in configs/models/."""
    p = Path(model)
    if p.exists():
        return str(p)
    for cand in (CONFIG_DIR / model, CONFIG_DIR / f"{model}.yaml"):
        if cand.exists():
            return str(cand)
    if model.endswith(".pt"):
        raise QbenchError(f"Weights file '{model}' does not exist; pass the path of a trained best.pt.")
    if model.endswith((".yaml", ".yml")) and "/" not in model:
        return model  # an ultralytics built-in config such as yolo11n.yaml
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise QbenchError(f"Model '{model}' is neither a file nor a known config; use a .pt/.yaml path or one of: {known}.")


def train(model: str, data: str, out_dir: str | Path, *, epochs: int = 100, imgsz: int = 320, batch: int = 16,
          device: str = "cpu", seed: int = 0, workers: int = 2, **overrides) -> Path:
    """Train `model` on `data`; returns the path of best.pt in `out_dir`."""
    from .ultra import YOLO

    load_data_yaml(data)  # fail early, with a clear message, on a broken data.yaml
    out_dir = Path(out_dir).resolve()
    if (out_dir / "weights" / "best.pt").exists() and not overrides.get("exist_ok"):
        raise QbenchError(f"'{out_dir}' already holds a trained model; choose another --out or delete it.")

    check_writable(out_dir.parent, "the training run")
    work = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))  # this run's own
    args = dict(data=str(Path(data).resolve()), epochs=epochs, imgsz=imgsz, batch=batch, device=device, seed=seed,
                deterministic=True, workers=workers, amp=device != "cpu", plots=True, project=str(work.parent),
                name=work.name, exist_ok=True, verbose=True)
    args.update(overrides)
    t0 = time.time()
    try:
        yolo = YOLO(resolve_model(model))
        yolo.train(**args)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # no half-trained folder left behind
        raise
    wall = time.time() - t0
    metrics, n_epochs = {}, 0
    results_csv = work / "results.csv"
    if results_csv.exists():
        rows = [r.split(",") for r in results_csv.read_text().strip().splitlines()]
        header = [h.strip() for h in rows[0]]
        best = max(rows[1:], key=lambda r: 0.1 * float(r[header.index("metrics/mAP50(B)")])
                   + 0.9 * float(r[header.index("metrics/mAP50-95(B)")]))
        metrics = {h: float(v) for h, v in zip(header, best)}
        n_epochs = len(rows) - 1
    import torch
    import ultralytics

    summary = {
        "command": command_line() if Path(sys.argv[0]).name in ("qbench", "__main__.py") else None,
        "model": model, "data": str(data), "epochs": epochs, "imgsz": imgsz, "batch": batch, "device": device,
        "seed": seed, "overrides": overrides, "epochs_run": n_epochs, "wall_time_s": round(wall, 1),
        "best_epoch_metrics": metrics,
        "versions": {"ultralytics": ultralytics.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }
    (work / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    (work / "weights" / "last.pt").unlink(missing_ok=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    work.rename(out_dir)
    return out_dir / "weights" / "best.pt"
