"""The embedded toy world and the small Stable-Diffusion-architecture base model trained on it.
Built on the product (pipeline, training); the product never imports it for its defaults,
which live in `loldu_diffusion.assets`."""
from ..assets import ASSETS, default_base_path, default_concept_path, default_judge_path

__all__ = ["ASSETS", "default_base_path", "default_concept_path", "default_judge_path"]
