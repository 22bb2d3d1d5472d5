"""Quantization: validated recipes (configs/recipes/), NPU profiles (configs/npu/) and engines.

`load_recipe(name_or_path)` gives a `Recipe`; `apply_profile(recipe, load_profile("npu-symmetric"), fusion)` puts
a profile's hardware constraints on it; `quantize_ort(fp32, out, recipe, calib_paths)` runs ONNX Runtime static
QDQ quantization with the YOLO detect-head decode kept in float (`find_head`) and the recipe's constraints applied
to the QDQ graph (`constraints.py`); `fallback.keep_float` puts chosen layers of a QDQ graph back in float
(qbench.mixed builds mixed precision on it). Engines only: nothing here imports analysis/ or the workflows.
"""

from ..graph.detector import check_detector, find_head
from .ort_engine import quantize_ort
from .profile import Profile, apply_profile, available_profiles, load_profile
from .recipe import Recipe, available_recipes, load_recipe, recipe_from_dict, write_recipe

__all__ = ["Profile", "Recipe", "apply_profile", "available_profiles", "available_recipes", "check_detector",
           "find_head", "load_profile", "load_recipe", "quantize_ort", "recipe_from_dict", "write_recipe"]
