"""The embedded toy world and the small Stable-Diffusion-architecture base model trained on it."""
import os

ASSETS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "assets"))


def default_base_path() -> str:
    return os.path.join(ASSETS, "tiny-sd")


def default_judge_path() -> str:
    return os.path.join(ASSETS, "judge")


def default_concept_path() -> str:
    return os.path.join(ASSETS, "concepts", "sks-heart")
