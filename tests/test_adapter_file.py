"""The adapter file: size, atomic writes, and refusal of every kind of bad file."""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from loldu_diffusion import AdapterFile, AdapterFileError, load_adapter, save_adapter
from loldu_diffusion.adapter_file import _group
from loldu_diffusion.cli import main as loldu
from test_inject import trained_unet
from tiny import craft, tiny_unet, unet_inputs

SD15_UNET = dict(
    sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    attention_head_dim=8,
)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    unet, inputs = trained_unet(0)
    path = str(tmp_path_factory.mktemp("a") / "concept.safetensors")
    save_adapter(unet, path, metadata={"instance_prompt": "a photo of sks star"})
    return path


def assert_refused(path, match, model=None):
    with pytest.raises(AdapterFileError, match=match) as e:
        load_adapter(model if model is not None else tiny_unet(), path)
    assert "\n" not in str(e.value)


def test_sd15_unet_attention_rank32_fits_in_40kb(tmp_path):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET)
    rows = [(n[: -len(".processor")], t) for n in unet.attn_processors for t in ("to_q", "to_k", "to_v", "to_out.0")]
    assert len(rows) == 128
    n, r = len(rows), 32
    f = AdapterFile(
        {"method": "loldu", "rank": r, "alpha": 32, "init": "lu", "unet_targets": ["to_q", "to_k", "to_v", "to_out.0"],
         "base_model": "stable-diffusion-v1-5", "base_architecture": "sd1", "instance_prompt": "a photo of sks dog",
         "training": {"steps": 1000, "learning_rate": 5e-4, "batch_size": 1}},
        {"unet": rows}, {"unet": torch.randn(n, r)}, {"unet": torch.stack([torch.randperm(1280)[:r] for _ in range(n)])},
        {"unet": torch.randn(n, r)},
    )
    path = str(tmp_path / "sd15.safetensors")
    f.save(path)
    assert os.path.getsize(path) <= 40_000
    back = AdapterFile.read(path)
    assert back.layers == {"unet": rows} and torch.equal(back.delta["unet"], f.delta["unet"])
    assert back.num_parameters == 4096


def test_existing_output_is_never_overwritten_silently(adapter, tmp_path):
    import shutil

    adapter = shutil.copy(adapter, tmp_path / "copy.safetensors")
    unet, _ = trained_unet(1)
    before = open(adapter, "rb").read()
    with pytest.raises(FileExistsError, match="already exists"):
        save_adapter(unet, adapter)
    assert open(adapter, "rb").read() == before
    save_adapter(unet, adapter, overwrite=True)
    assert open(adapter, "rb").read() != before
    assert [p for p in os.listdir(os.path.dirname(adapter)) if p.startswith(".tmp")] == []


def test_failed_write_keeps_the_previous_file(adapter, monkeypatch, tmp_path):
    import shutil

    import safetensors.torch

    adapter = str(shutil.copy(adapter, tmp_path / "copy.safetensors"))
    before = open(adapter, "rb").read()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    unet, _ = trained_unet(2)
    with pytest.raises(OSError, match="No space"):
        save_adapter(unet, adapter, overwrite=True)
    assert open(adapter, "rb").read() == before
    assert [p for p in os.listdir(os.path.dirname(adapter)) if p.startswith(".tmp")] == []


def test_different_base_is_refused_and_model_left_untouched(adapter):
    other = tiny_unet(seed=7)
    inputs = unet_inputs(other)
    with torch.no_grad():
        ref = other(*inputs).sample
    assert_refused(adapter, r"layer unet\..*to_q does not match this base model", other)
    assert not any("processor.layers" in k for k in other.state_dict())
    with torch.no_grad():
        assert torch.equal(other(*inputs).sample, ref)


def test_file_for_another_base_is_refused_on_a_model_that_already_has_layers(adapter, tmp_path):
    """Rows of layers already attached are compared all at once: a mismatch in any one of them (here the last) still
    names that layer, and the adapters already loaded serve on, unchanged."""
    unet = tiny_unet()
    load_adapter(unet, adapter, adapter_name="first")
    inputs = unet_inputs(unet)
    with torch.no_grad():
        ref = unet(*inputs).sample
    f = AdapterFile.read(adapter)
    rows = f.layers["unet"]
    f.d["unet"][-1, 0] *= 1.5  # one diagonal entry of the last layer: another base's weights
    bad = str(tmp_path / "other.safetensors")
    f.save(bad)
    m, t = rows[-1]
    assert_refused(bad, rf"layer unet\.{m}\.{t} does not match this base model", unet)
    f.d["unet"][-1, 0] /= 1.5
    f.pivots["unet"][0, :2] = f.pivots["unet"][0, :2].flip(0)  # the first layer's pivots in another order
    f.save(bad, overwrite=True)
    m, t = rows[0]
    assert_refused(bad, rf"layer unet\.{m}\.{t} does not match this base model", unet)
    with torch.no_grad():
        assert torch.equal(unet(*inputs).sample, ref)
    load_adapter(unet, adapter, adapter_name="second", weight=0.0)  # the same file loads beside it


def test_each_load_walks_the_model_as_it_is_then(adapter):
    """A load walks the module tree once (fixed_module_trees) but never keeps the walk: a module replaced between two
    loads is the one the second load adapts."""
    import copy

    from loldu_diffusion.model import iter_layers, remove_loldu

    unet = tiny_unet()
    load_adapter(unet, adapter, adapter_name="first")
    remove_loldu(unet)
    path, target = AdapterFile.read(adapter).layers["unet"][0]
    parent, _, leaf = path.rpartition(".")
    fresh = copy.deepcopy(unet.get_submodule(path))
    setattr(unet.get_submodule(parent), leaf, fresh)
    load_adapter(unet, adapter, adapter_name="second")
    layer = next(lay for _, p, t, lay in iter_layers(unet) if (p, t) == (path, target))
    assert layer.base is getattr(fresh, target) and "second" in layer.adapters


def test_wrong_architecture_is_refused(adapter):
    bigger = tiny_unet(block_out_channels=(32, 32), norm_num_groups=8)
    assert_refused(adapter, "does not exist in this base model|different architecture", bigger)


def test_truncated_and_garbage_files(adapter, tmp_path):
    data = open(adapter, "rb").read()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    assert_refused(str(tmp_path / "trunc.safetensors"), "truncated or corrupt")
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(500))
    assert_refused(str(tmp_path / "garbage.safetensors"), "truncated or corrupt")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert_refused(str(tmp_path / "empty.safetensors"), "truncated or corrupt")
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "plain.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    assert_refused(str(tmp_path / "plain.safetensors"), "not a loldu-diffusion adapter")
    assert_refused(str(tmp_path / "missing.safetensors"), "no such adapter file")


def test_pickle_is_never_loaded(tmp_path):
    torch.save({"unet.delta": torch.zeros(2)}, tmp_path / "evil.safetensors")
    assert_refused(str(tmp_path / "evil.safetensors"), "truncated or corrupt")


def test_nan_renamed_wrong_shape_wrong_dtype_unknown_version(adapter, tmp_path):
    def nan(t):
        t["unet.delta"][3, 1] = float("nan")

    assert_refused(craft(adapter, str(tmp_path / "nan.safetensors"), nan), r"'unet.delta' holds NaN/inf values \(layer")

    def inf_d(t):
        t["unet.d"][0, 0] = float("inf")

    assert_refused(craft(adapter, str(tmp_path / "infd.safetensors"), inf_d), "'unet.d' holds NaN/inf")

    def rename(t):
        t["unet.deltas"] = t.pop("unet.delta")

    assert_refused(craft(adapter, str(tmp_path / "ren.safetensors"), rename), "unexpected tensor 'unet.deltas'")

    def shape(t):
        t["unet.delta"] = t["unet.delta"][:, :2].contiguous()

    assert_refused(craft(adapter, str(tmp_path / "shape.safetensors"), shape), r"'unet.pivots' has shape .* expected")

    def dtype(t):
        t["unet.pivots"] = t["unet.pivots"].float()

    assert_refused(craft(adapter, str(tmp_path / "dtype.safetensors"), dtype), "'unet.pivots' has dtype torch.float32")

    def version(m):
        m["version"] = 99

    assert_refused(craft(adapter, str(tmp_path / "v.safetensors"), meta=version), "version 99 is not supported")

    def layers(m):
        m["layers"]["unet"] = dict(list(m["layers"]["unet"].items())[:-1])

    assert_refused(craft(adapter, str(tmp_path / "l.safetensors"), meta=layers), r"has shape .* expected \(\d+, rank\)")


def test_size_limit(adapter):
    with pytest.raises(AdapterFileError, match="larger than the 100-byte limit"):
        AdapterFile.read(adapter, max_bytes=100)


def test_group_keeps_row_order():
    rows = [("a", "to_q"), ("a", "to_k"), ("b", "to_q")]
    assert [(m, t) for m, ts in _group(rows).items() for t in ts] == rows


def test_inspect_command(adapter, capsys):
    assert loldu(["inspect", adapter, "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["rank"] == 4 and info["num_layers"] == 32 and info["parameters"] == 128
    assert info["bytes"] == os.path.getsize(adapter) and info["metadata"]["instance_prompt"] == "a photo of sks star"
    assert loldu(["inspect", adapter]) == 0
    assert "rank 4, 32 layers" in capsys.readouterr().out
    assert loldu(["inspect", adapter + ".nope"]) == 2
    assert "no such adapter file" in capsys.readouterr().err


def test_adapter_trained_in_fp32_loads_on_fp16_copy_of_base(adapter):
    unet, inputs = trained_unet(0)
    with torch.no_grad():
        ref = unet(*inputs).sample
    half = tiny_unet().half()
    load_adapter(half, adapter)
    with torch.no_grad():
        out = half.float()(*inputs).sample
    assert torch.allclose(out, ref, atol=2e-2)
