"""NPU profiles: the integer-arithmetic constraints of a target (configs/npu/*.yaml), applied on top of a recipe.

A recipe says how to calibrate and what to keep float; a profile says what the hardware can compute. A profile
holds every hardware key and nothing else (PROFILE_KEYS); its values are validated by the recipe validators, so
an unknown key, a recipe key that is not a hardware key (method, calib_size, ...), a missing key or a bad value
is a `QbenchError` naming the profile, the key and what is allowed. ONNX Runtime runs the resulting QDQ graph on
any machine, so INT8 accuracy under a profile can be measured without the NPU.

`apply_profile(recipe, profile, fusion)` gives the recipe with the profile's keys; `fusion` (ort | fused |
unfused) overrides the profile's activation_fusion. The result is named e.g. `default+npu-symmetric(unfused)`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import QbenchError
from ..files import read_yaml
from ..resources import shipped
from .recipe import (
    FUSIONS,
    KEYS,
    Recipe,
    _choice,
    available_configs,
    find_config,
    load_recipe,
    recipe_from_dict,
    short_name,
)

PROFILES_DIR = shipped("configs") / "npu"
PROFILE_KEYS = ("activation_type", "activation_symmetric", "weight_type", "weight_symmetric", "per_channel",
                "pow2_scales", "activation_fusion")


@dataclass(frozen=True)
class Profile:
    name: str  # the file's stem: 'npu-symmetric'
    settings: dict  # every PROFILE_KEYS key -> validated value
    path: Path


def available_profiles() -> list[str]:
    return available_configs(PROFILES_DIR)


def profile_from_dict(data, name: str, path: Path | None = None) -> Profile:
    """Validate a mapping of hardware keys (QbenchError naming the key and the allowed values)."""
    label = f"profile {name}"
    allowed = ", ".join(PROFILE_KEYS)
    if not isinstance(data, dict):
        raise QbenchError(f"{label} must be a YAML mapping of the hardware keys ({allowed}), "
                          f"not a {type(data).__name__}.")
    for key in data:
        if key in KEYS and key not in PROFILE_KEYS:
            raise QbenchError(f"{label}: {key!r} is a recipe key, not a hardware key; a profile holds only "
                              f"{allowed} (set {key!r} in the recipe).")
        if key not in PROFILE_KEYS:
            raise QbenchError(f"{label}: unknown key {key!r}; allowed: {allowed}.")
    missing = [k for k in PROFILE_KEYS if k not in data]
    if missing:
        raise QbenchError(f"{label}: missing {', '.join(repr(k) for k in missing)}; a profile sets every hardware "
                          f"key ({allowed}).")
    checked = recipe_from_dict(data, name, kind="profile")  # the recipe validators, messages start "profile NAME"
    return Profile(name, {k: getattr(checked, k) for k in PROFILE_KEYS}, Path(path) if path else Path(name))


def load_profile(name_or_path: str | os.PathLike | Profile) -> Profile:
    """A profile by name from configs/npu/ (cpu, npu-symmetric, ...) or from a YAML file."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    p = find_config(name_or_path, PROFILES_DIR, "profile")
    return profile_from_dict(read_yaml(p, "profile"), p.stem, p)


def apply_profile(recipe: Recipe | str | os.PathLike | None, profile: Profile | str | os.PathLike | None,
                  fusion: str | None = None) -> Recipe:
    """The recipe with the profile's hardware keys, `fusion` overriding activation_fusion.

    Named '<recipe>+<profile>(<fusion>)'. Without a profile only `fusion` applies ('<recipe>(<fusion>)'); with
    neither the recipe comes back unchanged.
    """
    recipe = load_recipe(recipe)
    if profile is None and fusion is None:
        return recipe
    prof = load_profile(profile) if profile is not None else None
    changes = dict(prof.settings) if prof else {}
    if fusion is not None:
        changes["activation_fusion"] = _choice(f"profile {prof.name}" if prof else f"recipe {recipe.name}",
                                               "fusion", fusion, FUSIONS)
    applied = recipe.replace(**changes)
    label = f"+{prof.name}" if prof else ""
    return dataclasses.replace(applied, name=f"{short_name(recipe)}{label}({applied.activation_fusion})")
