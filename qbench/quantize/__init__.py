"""Quantization: validated recipes (configs/recipes/), NPU profiles (configs/npu/) and engines.

`load_recipe(name_or_path)` gives a `Recipe`; `apply_profile(recipe, load_profile("npu-symmetric"), fusion)` puts
a profile's hardware constraints on it; `quantize_ort(fp32, out, recipe, calib_paths)` runs ONNX Runtime static
QDQ quantization with the YOLO detect-head decode kept in float (`find_head`) and the recipe's constraints applied
to the QDQ graph (`constraints.py`). `quantize_max_drop` (mixed.py) keeps the fewest convs in FP32 to meet an
accuracy budget, through `fallback.keep_float` on the calibrated QDQ graph.
"""

from .mixed import quantize_max_drop
from .ort_engine import check_detector, find_head, quantize_ort
from .profile import Profile, apply_profile, available_profiles, load_profile
from .recipe import Recipe, available_recipes, load_recipe, recipe_from_dict, write_recipe

__all__ = ["Profile", "Recipe", "apply_profile", "available_profiles", "available_recipes", "check_detector",
           "find_head", "load_profile", "load_recipe", "quantize_max_drop", "quantize_ort", "recipe_from_dict", "write_recipe"]
