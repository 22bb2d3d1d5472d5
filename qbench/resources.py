"""Where qbench finds what it ships: recipes, NPU profiles and model YAMLs (configs/), the embedded default set's
calibration manifest (calibration/) and the default model (results/training/synth-l3-leaky-320/weights/best.pt).

In a source checkout (and an editable install) they are the checkout's own files, which stay the source of truth a
user edits. A built wheel carries copies as package data under qbench/_shipped/ (pyproject.toml maps them), so a
plain `pip install .` works from any folder.
"""

from __future__ import annotations

from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
SHIPPED = Path(__file__).resolve().parent / "_shipped"
LOCATIONS = {  # name -> (folder in a checkout, folder in an installed wheel)
    "configs": (CHECKOUT / "configs", SHIPPED / "configs"),
    "calibration": (CHECKOUT / "calibration", SHIPPED / "calibration"),
    "default_model": (CHECKOUT / "results" / "training" / "synth-l3-leaky-320" / "weights", SHIPPED / "default_model"),
}


def shipped(name: str) -> Path:
    """The folder of a shipped resource: the checkout's when qbench runs from one, else the installed copy."""
    checkout, installed = LOCATIONS[name]
    return checkout if checkout.is_dir() and (CHECKOUT / "pyproject.toml").is_file() else installed
