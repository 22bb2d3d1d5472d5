"""ultralytics, offline: the environment qbench sets before ultralytics is first imported.

ultralytics reaches for the network in a few places: an online check, hub and
telemetry events, a settings file, fonts for plots (Arial.ttf) and an AMP check
that downloads yolo11n.pt on GPUs. Importing this module points it at a
qbench-owned config folder, declares it offline, and puts a local font
(matplotlib's DejaVu Sans, which ships with matplotlib) where ultralytics looks
for Arial, so plots render without a download. It imports nothing of qbench
and not ultralytics itself (qbench.ultra does, after this).
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
