import atexit
import os
import shutil
import sys
import tempfile

# A Hugging Face home of the test run's own, set before anything imports huggingface_hub: no
# test reads or writes the user's cache, and tests/peer places the hub test models in it.
_HF_HOME = tempfile.mkdtemp(prefix="loldu-tests-hf-")
atexit.register(shutil.rmtree, _HF_HOME, True)
os.environ["HF_HOME"] = _HF_HOME
os.environ.pop("HF_HUB_CACHE", None)
os.environ.pop("HF_DATASETS_CACHE", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # scripts/test.sh runs one worker per core: one thread each (and in the trainers the tests
    # launch), as two workers of two threads on two cores wait on each other's spin locks
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

import pytest


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    from pipelines import make_tiny_sd

    return make_tiny_sd(str(tmp_path_factory.mktemp("models") / "tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    from pipelines import make_tiny_sdxl

    return make_tiny_sdxl(str(tmp_path_factory.mktemp("models") / "tiny-sdxl"))


@pytest.fixture(scope="session")
def concept_dir():
    from loldu_diffusion.toy import default_concept_path

    return default_concept_path()
