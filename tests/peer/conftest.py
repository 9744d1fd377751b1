"""diffusers' own DreamBooth tests, run against train_dreambooth_loldu.py.

test_dreambooth_lora.py, test_dreambooth.py and test_examples_utils.py are copied unchanged
from huggingface/diffusers@58eb52c0 (examples/dreambooth/, examples/). They launch
`accelerate launch examples/dreambooth/<script>.py --pretrained_model_name_or_path
hf-internal-testing/<tiny model> --instance_data_dir docs/source/en/imgs ...` from the
diffusers repository root. What is swapped, all outside those files:

- the scripts: each test runs in a scratch folder whose examples/dreambooth/ holds two-line
  shims: train_dreambooth_lora.py and train_dreambooth_lora_sdxl.py run this trainer with
  --method lora, train_dreambooth.py with --method full, train_dreambooth_loldu.py with its
  default method (for test_dreambooth_loldu.py);
- the hub test models: tiny random SD and SDXL pipelines of the same architecture, built here
  and placed in the test run's own Hugging Face cache (HF_HOME, set in tests/conftest.py)
  under the hub ids the tests name, with HF_HUB_OFFLINE=1. The trainer and the tests'
  DiffusionPipeline.from_pretrained resolve them from the cache, as a user's cached model;
- docs/source/en/imgs: three images; hf-internal-testing/dummy_image_text_data: a three-image
  dataset repository in the same cache.
DeepFloyd IF tests are skipped: IF is not a Stable Diffusion family and this trainer does not
train it.
"""
import json
import os

import pytest

SHIMS = {"train_dreambooth_lora.py": "lora", "train_dreambooth_lora_sdxl.py": "lora", "train_dreambooth.py": "full",
         "train_dreambooth_loldu.py": "loldu"}
SHIM = """import sys
sys.path.insert(0, {root!r})
from loldu_diffusion.training import main
sys.exit(main(sys.argv[1:] + ["--method", {method!r}]))
"""
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODELS = {"hf-internal-testing/tiny-stable-diffusion-torch": "make_tiny_sd", "hf-internal-testing/tiny-stable-diffusion-xl-pipe": "make_tiny_sdxl"}
DATASET = "hf-internal-testing/dummy_image_text_data"
REVISION = "0" * 40


def _cache_entry(kind: str, repo_id: str) -> str:
    """A snapshot folder in the hub cache layout (refs/main → snapshots/<rev>)."""
    from huggingface_hub import constants

    root = os.path.join(constants.HF_HUB_CACHE, f"{kind}--{repo_id.replace('/', '--')}")
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(REVISION)
    return os.path.join(root, "snapshots", REVISION)


def _images(folder: str, n: int = 3, captions=None) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (60 * i, 120, 200 - 40 * i)).save(os.path.join(folder, f"{i}.png"))
    if captions:
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            for i in range(n):
                f.write(json.dumps({"file_name": f"{i}.png", "text": captions[i]}) + "\n")


@pytest.fixture(scope="session")
def diffusers_checkout(tmp_path_factory):
    """A scratch 'diffusers repository root' for the vendored tests, and the cached hub models."""
    import pipelines

    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE and constants.HF_HUB_CACHE.startswith(os.environ["HF_HOME"])
    for repo_id, maker in MODELS.items():
        getattr(pipelines, maker)(_cache_entry("models", repo_id))
    _images(os.path.join(_cache_entry("datasets", DATASET), "train"), captions=["a photo of a red dog", "a photo of a dog", "a dog"])
    root = tmp_path_factory.mktemp("diffusers")
    scripts = root / "examples" / "dreambooth"
    scripts.mkdir(parents=True)
    for name, method in SHIMS.items():
        (scripts / name).write_text(SHIM.format(root=REPO, method=method))
    _images(str(root / "docs" / "source" / "en" / "imgs"))
    return root


@pytest.fixture(autouse=True)
def _in_diffusers_checkout(diffusers_checkout, monkeypatch):
    monkeypatch.chdir(diffusers_checkout)


IF_TESTS = {"test_dreambooth_lora_if_model", "test_dreambooth_if"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.name in IF_TESTS:
            item.add_marker(pytest.mark.skip(reason="DeepFloyd IF is not a Stable Diffusion family; this trainer does not train it"))

