"""Import ultralytics offline.

ultralytics reaches for the network in a few places: an online check, hub and
telemetry events, a settings file, fonts for plots (Arial.ttf) and an AMP check
that downloads yolo11n.pt on GPUs. Everything in qbench imports ultralytics
through this module, which first points it at a qbench-owned config folder,
declares it offline, turns telemetry off, and puts a local font (matplotlib's
DejaVu Sans, which ships with matplotlib) where ultralytics looks for Arial, so
plots render without a download.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def config_dir() -> Path:
    base = os.environ.get("QBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qbench")
    return Path(base) / "ultralytics"


def _prepare() -> None:
    cfg = config_dir()
    cfg.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(cfg))
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ.setdefault("ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS", "1")  # never pip-install at run time
    import matplotlib

    dejavu = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    target = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"  # ultralytics' USER_CONFIG_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (target / name).exists() and dejavu.exists():
            shutil.copyfile(dejavu, target / name)


_prepare()

import ultralytics  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.utils import SETTINGS  # noqa: E402

# No telemetry and no experiment-tracker integrations (several of them phone home).
_OFF = {k: False for k in ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb",
                           "vscode_msg", "openvino_msg") if k in SETTINGS}
if any(SETTINGS[k] for k in _OFF):
    SETTINGS.update(_OFF)

__all__ = ["YOLO", "ultralytics", "config_dir"]

# Every checkpoint ultralytics reads in a qbench process runs no code from the file (qbench.models.safeload).
import ultralytics.nn.tasks as _tasks  # noqa: E402
import ultralytics.utils.patches as _patches  # noqa: E402

from .models import safeload as _safeload  # noqa: E402

_tasks.torch_load = _patches.torch_load = _safeload.torch_load

# ultralytics pins torch to (cores - 1) threads on CPU (select_device), which is
# a single thread on a 2-core machine: give torch every core instead.
from ultralytics.utils import torch_utils as _torch_utils  # noqa: E402

_torch_utils.NUM_THREADS = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
