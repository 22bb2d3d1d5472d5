"""Import ultralytics offline and safe: everything in qbench imports ultralytics through this module.

First the environment (qbench.offline: config folder, offline flag, local fonts), then ultralytics itself with
telemetry off, and its checkpoint loader routed through qbench.safeload (no code runs from a checkpoint).
"""

from __future__ import annotations

import os

import ultralytics  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.utils import SETTINGS  # noqa: E402

from .offline import config_dir  # noqa: F401  (sets the environment before the first ultralytics import)

# No telemetry and no experiment-tracker integrations (several of them phone home).
_OFF = {k: False for k in ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb",
                           "vscode_msg", "openvino_msg") if k in SETTINGS}
if any(SETTINGS[k] for k in _OFF):
    SETTINGS.update(_OFF)

__all__ = ["YOLO", "ultralytics", "config_dir"]

# Every checkpoint ultralytics reads in a qbench process runs no code from the file (qbench.safeload).
import ultralytics.nn.tasks as _tasks  # noqa: E402
import ultralytics.utils.patches as _patches  # noqa: E402

from . import safeload as _safeload  # noqa: E402

_tasks.torch_load = _patches.torch_load = _safeload.torch_load

# ultralytics pins torch to (cores - 1) threads on CPU (select_device), which is
# a single thread on a 2-core machine: give torch every core instead.
from ultralytics.utils import torch_utils as _torch_utils  # noqa: E402

_torch_utils.NUM_THREADS = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
