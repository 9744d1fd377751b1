"""The app's functions on a tiny base: load, validate, blend, generate, export."""
import os
import shutil

import pytest
import torch

from loldu_diffusion import AdapterFileError
from loldu_diffusion.app import MAX_SLOTS, Studio
from test_cli import trained_adapter


@pytest.fixture(scope="module")
def adapter_dir(tiny_sd_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("app_adapters")
    trained_adapter(tiny_sd_path, d / "dog.safetensors", 1)
    trained_adapter(tiny_sd_path, d / "style.safetensors", 2, rank=2)
    (d / "notes.txt").write_text("not an adapter")
    return d


@pytest.fixture()
def studio(tiny_sd_path, adapter_dir):
    return Studio(tiny_sd_path, str(adapter_dir))


def pixels(img):
    import numpy as np

    return torch.from_numpy(np.asarray(img).astype("float32"))


def test_lists_loads_and_describes_adapters(studio, adapter_dir):
    assert [os.path.basename(p) for p in studio.folder_adapters()] == ["dog.safetensors", "style.safetensors"]
    a = studio.add(str(adapter_dir / "dog.safetensors"))
    text = a.describe()
    assert "trigger `a photo of sks heart`" in text and "rank 4" in text and f"{a.file.nbytes:,} bytes" in text
    assert studio.add(str(adapter_dir / "dog.safetensors")) is a  # the same file twice loads once


def test_generation_with_blend_side_by_side_and_fuse(studio, adapter_dir):
    base_only = studio.generate("a photo of sks heart", steps=2, seed=3, num_images=1)
    assert len(base_only) == 1 and "no adapter" in base_only[0][1]
    studio.add(str(adapter_dir / "dog.safetensors"))
    studio.add(str(adapter_dir / "style.safetensors"))
    secs = studio.set_weights({"dog": 0.8, "style": -0.5})
    out = studio.generate("a photo of sks heart", steps=2, seed=3, num_images=1, compare=True)
    assert [c.split(" · ")[-1] for _, c in out] == ["dog:0.8, style:-0.5", "base model"]
    assert torch.equal(pixels(out[1][0]), pixels(base_only[0][0]))  # the side-by-side base is the base
    assert not torch.equal(pixels(out[0][0]), pixels(base_only[0][0]))
    fused = studio.generate("a photo of sks heart", steps=2, seed=3, num_images=1, fuse=True)
    assert (pixels(fused[0][0]) - pixels(out[0][0])).abs().max() <= 2  # fused = unfused, up to rounding
    assert secs < 1.0  # re-weighting never reloads the base (measured by benchmarks; a loose sanity bound)


def test_bad_uploads_are_refused_and_the_studio_keeps_working(studio, adapter_dir, tmp_path, tiny_sd_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        studio.add(str(bad))
    with pytest.raises(AdapterFileError, match="only .safetensors"):
        studio.add(str(adapter_dir / "notes.txt"))
    from pipelines import make_tiny_sd

    other = make_tiny_sd(str(tmp_path / "other"), seed=4)
    trained_adapter(other, tmp_path / "foreign.safetensors", 1)
    with pytest.raises(AdapterFileError, match="does not match this base model"):
        studio.add(str(tmp_path / "foreign.safetensors"))
    assert studio.loaded == {}
    assert len(studio.generate("a red star", steps=2, seed=0)) == 1


def test_slots_are_limited(studio, adapter_dir, tmp_path):
    for i in range(MAX_SLOTS):
        shutil.copy(adapter_dir / "dog.safetensors", tmp_path / f"d{i}.safetensors")
        studio.add(str(tmp_path / f"d{i}.safetensors"))
    with pytest.raises(ValueError, match=f"at most {MAX_SLOTS}"):
        studio.add(str(adapter_dir / "style.safetensors"))


def test_export_of_the_active_blend(studio, adapter_dir):
    from safetensors.torch import load_file

    with pytest.raises(ValueError, match="load an adapter"):
        studio.export_lora()
    studio.add(str(adapter_dir / "dog.safetensors"))
    path = studio.export_lora("kohya")
    assert path.endswith(".safetensors") and any(k.startswith("lora_unet_") for k in load_file(path))
