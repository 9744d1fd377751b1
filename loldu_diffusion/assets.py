"""Where the shipped files are: the embedded base model, the toy judge, the bundled example
subject and adapter. The bottom of the package: the product reads its defaults here, and the
toy world (`toy/`), which is built on the product, re-exports them."""
import os

ASSETS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "assets"))
# the bundled example subject (toy.concepts.DEFAULT_SUBJECT renders it; a test checks they agree)
DEFAULT_INSTANCE_PROMPT = "a photo of sks heart"
DEFAULT_CLASS_PROMPT = "a photo of a heart"


# A toy-world base (the embedded one, or one trained or derived by loldu_diffusion.toy) carries this
# file: the trainer's embedded defaults and judge apply to it, wherever it is.
TOY_WORLD_MARKER = "loldu_toy_world.json"


def default_base_path() -> str:
    return os.path.join(ASSETS, "tiny-sd")


def is_toy_world_base(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TOY_WORLD_MARKER))


def write_toy_world_marker(folder: str) -> None:
    with open(os.path.join(folder, TOY_WORLD_MARKER), "w") as f:
        f.write('{"world": "loldu-diffusion toy world: scenes of six shapes in eight colours (loldu_diffusion/toy)"}\n')


def default_judge_path() -> str:
    return os.path.join(ASSETS, "judge")


def default_concept_path() -> str:
    return os.path.join(ASSETS, "concepts", "sks-heart")


def bundled_adapters_dir() -> str:
    return os.path.join(ASSETS, "adapters")
