"""Hostile inputs, generated here (no committed binaries): every kind of crafted adapter file
through every entry point (library, CLI inspect / blend / export-lora, the app), hostile image
folders through the trainer's reader, and faults (locks, full or read-only disks). Each is a
one-line error, and a refusal leaves the model's output bit-identical."""
import copy
import errno
import json
import os
import re
import struct
import zlib

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loldu_diffusion import AdapterFileError, fuse_loldu, iter_layers, load_adapter, remove_loldu, unfuse_loldu
from loldu_diffusion.adapter_file import DELTA_BOUND, MAX_LAYERS, adaptable_layers
from loldu_diffusion.cli import main as loldu
from test_cli import trained_adapter, unet_out
from tiny import craft


@pytest.fixture(scope="module")
def good(tiny_sd_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    trained_adapter(tiny_sd_path, path, 1)
    return str(path)


def _first_rows(n):
    def edit_tensors(t):
        for k in ("delta", "pivots", "d"):
            t[f"unet.{k}"] = t[f"unet.{k}"][:1].repeat(n, 1).contiguous()
    return edit_tensors


def _set(key, value):
    def edit(m):
        m[key] = value
    return edit


def _layers(layers):
    return _set("layers", layers)


def _scale_delta(value, row=0):
    def edit(t):
        t["unet.delta"][row, 0] = value
    return edit


def _fake_rows(n, rank):
    """n distinct, canonical, non-existent UNet rows."""
    def edit_tensors(t):
        t["unet.delta"] = torch.zeros(n, rank)
        t["unet.d"] = torch.ones(n, rank)
        t["unet.pivots"] = torch.arange(rank, dtype=torch.int16).repeat(n, 1).contiguous()

    def edit_meta(m):
        m["layers"] = {"unet": {f"down_blocks.0.attentions.0.transformer_blocks.{k}.attn1": ["to_q"] for k in range(n)}}
    return edit_tensors, edit_meta


def first_row(path):
    with safe_open(path, "pt") as f:
        layers = json.loads(f.metadata()["loldu"])["layers"]["unet"]
    mod = next(iter(layers))
    return mod, layers[mod][0]


# name → (how to craft it, what the error says, whether the file alone is wrong: inspect/blend refuse it too)
def hostile_files(good, d, base_layers):
    mod, target = first_row(good)
    rank = load_file(good)["unet.delta"].shape[1]
    over_base, over_base_meta = _fake_rows(base_layers + 1, rank)
    over_max, over_max_meta = _fake_rows(MAX_LAYERS + 1, 1)
    cases = {
        "huge_delta": (dict(tensors=_scale_delta(1e30)), "exceeds the bound", True),
        "max_float_delta": (dict(tensors=_scale_delta(3.4e38)), "exceeds the bound", True),
        "nan_delta": (dict(tensors=_scale_delta(float("nan"))), "NaN/inf", True),
        "duplicate_row": (dict(tensors=_first_rows(2), meta=_layers({"unet": {mod: [target, target]}})), "listed twice", True),
        "alias_00": (dict(tensors=_first_rows(1), meta=_layers({"unet": {mod: ["to_out.00"]}})), "not a UNet attention projection|not canonical", True),
        "arabic_digit": (dict(tensors=_first_rows(1), meta=_layers({"unet": {mod.replace("0", "\u0660", 1): [target]}})), "not canonical", True),
        "text_model_unet": (dict(tensors=_first_rows(1), meta=_layers({"unet": {"text_model." + mod: [target]}})), "not a UNet attention projection", True),
        "unapplied_target": (dict(tensors=_first_rows(1), meta=_layers({"unet": {mod: ["add_q_proj"]}})), "not a UNet attention projection", True),
        "zero_layers": (dict(meta=_layers({})), "holds no layers|unexpected tensor", True),
        "empty_component": (dict(meta=_layers({"unet": {}})), "is empty", True),
        "version_true": (dict(meta=_set("version", True)), "version True is not supported", True),
        "unknown_component": (dict(meta=_layers({"vae": {mod: [target]}})), "unknown component 'vae'", True),
        "repeated_key": (dict(raw=lambda s: '{"format":"x",' + s[1:]), "not valid JSON \\(or repeats a key\\)", True),
        "repeated_pivot": (dict(tensors=lambda t: t["unet.pivots"][0].fill_(0)), "repeats a row index", True),
        "many_tensors": (dict(tensors=lambda t: t.update({f"x{i}": torch.zeros(1) for i in range(10)})), "at most 9", True),
        "huge_header": (dict(extra_meta={"pad": "x" * (2**20 + 1)}), "header of .* bytes is larger", True),
        "over_max_layers": (dict(tensors=over_max, meta=over_max_meta), f"more than {MAX_LAYERS} layers", True),
        "more_rows_than_base": (dict(tensors=over_base, meta=over_base_meta), "but this base model has only", False),
    }
    out = {}
    for name, (kw, match, file_level) in cases.items():
        out[name] = (craft(good, str(d / f"{name}.safetensors"), **kw), match, file_level)
    fifo = str(d / "fifo.safetensors")
    os.mkfifo(fifo)
    out["fifo"] = (fifo, "not a regular file", True)
    return out


@pytest.fixture(scope="module")
def hostile(good, tiny_sd_path, tmp_path_factory):
    from loldu_diffusion.pipeline import load_base

    n = len(adaptable_layers(load_base(tiny_sd_path).unet, "unet"))
    return hostile_files(good, tmp_path_factory.mktemp("hostile"), n)


CASES = ["huge_delta", "max_float_delta", "nan_delta", "duplicate_row", "alias_00", "arabic_digit", "text_model_unet",
         "unapplied_target", "zero_layers", "empty_component", "version_true", "unknown_component", "repeated_key",
         "repeated_pivot", "many_tensors", "huge_header", "over_max_layers", "more_rows_than_base", "fifo"]


@pytest.fixture(scope="module")
def served(tiny_sd_path, good):
    """A pipeline with a good adapter loaded, as a busy app would hold it."""
    from loldu_diffusion.pipeline import load_base

    pipe = load_base(tiny_sd_path)
    load_adapter(pipe, good, adapter_name="good")
    return pipe


def test_every_case_is_covered(hostile):
    assert sorted(hostile) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_library_refuses_and_the_model_is_unchanged(served, hostile, case):
    path, match, _ = hostile[case]
    ref = unet_out(served)
    state = {k: v.clone() for k, v in served.unet.state_dict().items()}
    with pytest.raises(AdapterFileError, match=match) as e:
        load_adapter(served, path)
    assert "\n" not in str(e.value) and os.path.basename(path) in str(e.value)
    assert torch.equal(unet_out(served), ref)
    assert all(torch.equal(v, state[k]) for k, v in served.unet.state_dict().items())
    assert {n for *_, layer in iter_layers(served) for n in layer.adapters} == {"good"}


@pytest.mark.parametrize("case", CASES)
def test_cli_refuses_with_one_line(hostile, tiny_sd_path, tmp_path, capsys, case):
    path, match, file_level = hostile[case]
    commands = [["export-lora", path, "--base", tiny_sd_path, "-o", str(tmp_path / "lora.safetensors")]]
    if file_level:
        commands += [["inspect", path], ["blend", f"{path}:0.5", "-o", str(tmp_path / "blend.safetensors")]]
    for argv in commands:
        assert loldu(argv) == 2, argv
        full = capsys.readouterr().err
        err = full.strip().splitlines()[-1]  # after the base's loading bars, if it got that far
        assert "Traceback" not in full and err.startswith(f"loldu {argv[0]}: error: "), full
        if file_level:
            assert "\n" not in full.strip(), full  # refused before the base loads: nothing else printed
        assert re.search(match, err), (argv[0], err)
    assert os.listdir(tmp_path) == []  # nothing written, no temp file


@pytest.fixture(scope="module")
def studio(tiny_sd_path):
    from loldu_diffusion.app import Studio

    return Studio(tiny_sd_path)


@pytest.mark.parametrize("case", CASES)
def test_app_refuses_and_the_shared_base_is_unchanged(studio, hostile, case):
    path, match, _ = hostile[case]
    ref = unet_out(studio.pipe)
    session = studio.new_session()
    with pytest.raises(AdapterFileError, match=match):
        session.add(path)
    assert session.loaded == {} and studio.users == {} and list(iter_layers(studio.pipe)) == []
    assert torch.equal(unet_out(studio.pipe), ref)


def test_a_stranger_s_file_is_opened_once_and_keyed_by_the_bytes_checked(good, tiny_sd_path, monkeypatch):
    """Size, header and tensors are checked on one read, and the app keys a loaded file by those bytes' hash: a reader
    that opened the file three times (stat, header, safetensors) and hashed it a fourth could be handed another file in
    between, past the size and header limits, and put it on the shared base under a good file's key."""
    import builtins
    import hashlib

    from loldu_diffusion import AdapterFile
    from loldu_diffusion.assets import bundled_adapters_dir
    from loldu_diffusion.embeddings import read_embedding_rows

    emb = os.path.join(bundled_adapters_dir(), "sks-heart.learned_embeds.safetensors")
    opened = []
    real_open, real_os_open = builtins.open, os.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(str(p)) or real_os_open(p, *a, **k))
    f = AdapterFile.read(good)
    digest = []
    read_embedding_rows(emb, digest=digest)
    monkeypatch.undo()
    assert opened.count(good) == 1 and opened.count(emb) == 1
    assert f.sha256 == hashlib.sha256(open(good, "rb").read()).hexdigest()
    assert digest == [hashlib.sha256(open(emb, "rb").read()).hexdigest()]


def test_file_names_with_dots_spaces_and_unicode_load_everywhere(good, tiny_sd_path, tmp_path, capsys):
    import shutil

    from loldu_diffusion.app import Studio
    from loldu_diffusion.pipeline import load_base

    names = ["sks.v2.safetensors", "my dog (1).safetensors", "hündchen ☃.safetensors", "items.safetensors"]
    paths = [shutil.copy(good, tmp_path / n) for n in names]
    pipe = load_base(tiny_sd_path)
    loaded = [load_adapter(pipe, str(p)) for p in paths]
    assert len(loaded) == 4 and len({n for *_, layer in iter_layers(pipe) for n in layer.adapters}) == 4
    studio = Studio(tiny_sd_path)
    assert studio.new_session().add(str(paths[0])).name == "sks_v2"
    out = tmp_path / "out" / "lora.safetensors"
    out.parent.mkdir()
    assert loldu(["export-lora", str(paths[0]), "--base", tiny_sd_path, "-o", str(out)]) == 0, capsys.readouterr().err
    with pytest.raises(ValueError, match="adapter_name 'a.b' is not usable"):
        load_adapter(pipe, good, adapter_name="a.b")


def test_the_largest_delta_a_file_may_hold_draws_finite_images_in_fp16(tiny_sd_path, good, tmp_path):
    """At the old bound (1000 × max|d|; 50× sufficed) every image of the tiny base in fp16 was NaN."""
    from loldu_diffusion.pipeline import load_base

    d = load_file(good)["unet.d"]
    big = craft(good, str(tmp_path / "edge.safetensors"), tensors=lambda t: t["unet.delta"].copy_(
        0.99 * DELTA_BOUND * d.abs().amax(dim=1, keepdim=True) * torch.sign(d)))
    pipe = load_base(tiny_sd_path)
    pipe.to(dtype=torch.float16)
    load_adapter(pipe, big)
    image = pipe("a photo of sks heart", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.isfinite(image).all()
    with pytest.raises(AdapterFileError, match=r"exceeds the bound 20 × max\|d\|"):
        load_adapter(pipe, craft(good, str(tmp_path / "over.safetensors"), tensors=lambda t: t["unet.delta"].copy_(
            1.5 * DELTA_BOUND * d.abs().amax(dim=1, keepdim=True) * torch.sign(d))), adapter_name="over")


def test_fuse_unfuse_remove_restores_the_base_bit_identically(tiny_sd_path, good, tmp_path):
    from loldu_diffusion.pipeline import load_base

    pipe = load_base(tiny_sd_path)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    ref = unet_out(pipe)
    # the largest δ the reader accepts, beside an ordinary adapter
    d = load_file(good)["unet.d"].abs().amax(dim=1)
    big = craft(good, str(tmp_path / "big.safetensors"), tensors=lambda t: t["unet.delta"].copy_(
        0.99 * DELTA_BOUND * d[:, None] * torch.sign(torch.randn_like(t["unet.delta"]))))
    load_adapter(pipe, good, adapter_name="a")
    load_adapter(pipe, big, adapter_name="b", weight=0.7)
    for _ in range(3):
        fuse_loldu(pipe)
        assert not all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items() if k in before)
        unfuse_loldu(pipe)
    remove_loldu(pipe)
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(unet_out(pipe), ref)


def test_app_restores_the_base_when_a_fused_generation_fails(tiny_sd_path, good, monkeypatch):
    from loldu_diffusion.app import Studio

    studio = Studio(tiny_sd_path)
    session = studio.new_session()
    session.add(good)
    with torch.no_grad():
        weights = {k: v.clone() for k, v in studio.pipe.unet.state_dict().items() if "processor" not in k}

    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(type(studio.pipe), "__call__", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        session.generate("a photo of sks heart", steps=1, seed=0, fuse=True)
    assert studio.fused is None
    now = studio.pipe.unet.state_dict()
    assert all(torch.equal(now[k], v) for k, v in weights.items())


def test_a_blend_of_16_adapters_uses_the_cached_delta(tiny_sd_path, good, tmp_path, monkeypatch):
    from loldu_diffusion import AdapterFile, set_adapter_weights
    from loldu_diffusion.layer import LoadedDelta
    from loldu_diffusion.pipeline import load_base

    pipe = load_base(tiny_sd_path)
    f = AdapterFile.read(good)
    torch.manual_seed(0)
    for k in range(16):
        f.delta["unet"] = f.delta["unet"] * (1 + 0.1 * torch.randn_like(f.delta["unet"]))
        load_adapter(pipe, f, adapter_name=f"a{k}", weight=1 / 16)
    calls = []
    real = LoadedDelta.delta
    monkeypatch.setattr(LoadedDelta, "delta", lambda self: calls.append(1) or real(self))
    first = unet_out(pipe)
    layers = [layer for *_, layer in iter_layers(pipe)]
    assert len(calls) == 16 * len(layers)  # computed once per layer
    calls.clear()
    for _ in range(3):
        assert torch.equal(unet_out(pipe), first)
    assert calls == []  # never per forward
    # the live computation (as while training: values that train, gradients recorded) gives the
    # same output, bit for bit; under no_grad a value that could train still uses the cache
    tables = {id(t): t for layer in layers for vec in layer.adapters.values() for t in vec.tensors()}.values()
    assert len(tables) == 16  # one per loaded adapter (and component: these adapt the UNet alone)
    for t in tables:
        t.requires_grad_(True)
    assert torch.equal(unet_out(pipe), first) and calls == []
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, pipe.unet.config.cross_attention_dim, generator=g)
    assert torch.equal(pipe.unet(x, torch.tensor([400]), c).sample.detach(), first) and len(calls) > 0
    for t in tables:
        t.requires_grad_(False)
    # new weights and in-place edits of an adapter's values are seen
    calls.clear()
    set_adapter_weights(pipe, {"a0": 1.0})
    only = unet_out(pipe)
    assert not torch.equal(only, first) and len(calls) == len(layers)
    with torch.no_grad():
        layers[0].adapters["a0"].z.mul_(2)
    assert not torch.equal(unet_out(pipe), only)


def test_an_interrupted_call_leaves_the_blend_check_working(tiny_sd_path, good):
    """torch runs always_call forward hooks after an Exception only: a KeyboardInterrupt (a notebook's stop button) in a
    UNet call skipped the guard's `leave`, the guard stayed "running", and in-place edits of an adapter were never seen
    again."""
    from loldu_diffusion.pipeline import load_base

    pipe = load_base(tiny_sd_path)
    load_adapter(pipe, good, adapter_name="a")
    before = unet_out(pipe)
    inner = pipe.unet.up_blocks[-1]

    def stop(module, args):
        raise KeyboardInterrupt

    handle = inner.register_forward_pre_hook(stop)
    with pytest.raises(KeyboardInterrupt):
        unet_out(pipe)
    handle.remove()
    assert torch.equal(unet_out(pipe), before)
    with torch.no_grad():
        for *_, layer in iter_layers(pipe):
            layer.adapters["a"].z.mul_(3)
    after = unet_out(pipe)
    assert not torch.equal(after, before)
    fresh = load_base(tiny_sd_path)  # the same values loaded anew: what the edited adapter must draw
    load_adapter(fresh, good, adapter_name="a")
    with torch.no_grad():
        for *_, layer in iter_layers(fresh):
            layer.adapters["a"].z.mul_(3)
    assert torch.allclose(after, unet_out(fresh), atol=1e-6)


def test_a_loaded_adapter_is_one_tensor_per_component_not_a_module_per_layer(tiny_sd_path, good):
    """What a server holding thousands of adapters needs: each file loaded adds one (layers, r)
    tensor per component and a small row object per layer (no module, nothing in the model's
    state dict), holding the file's δ; moving the model moves that tensor once, and the model
    still pickles."""
    import gc
    import pickle
    import weakref

    from loldu_diffusion import AdapterFile, delete_adapter, set_adapter_weights
    from loldu_diffusion.pipeline import load_base

    pipe = load_base(tiny_sd_path)
    load_adapter(pipe, good, adapter_name="a0")
    modules, keys = len(list(pipe.unet.modules())), set(pipe.unet.state_dict())
    load_adapter(pipe, good, adapter_name="a1", weight=0.0)
    assert len(list(pipe.unet.modules())) == modules and set(pipe.unet.state_dict()) == keys
    f = AdapterFile.read(good)
    layers = {(path, target): layer for _, path, target, layer in iter_layers(pipe.unet)}
    rows = [layers[m, t].adapters["a1"] for m, t in f.layers["unet"]]
    assert all(row.table is rows[0].table for row in rows) and rows[0].table.z.shape == f.delta["unet"].shape
    for i, (row, rank) in enumerate(zip(rows, f.row_ranks("unet").tolist())):
        assert torch.equal(row.delta(), f.delta["unet"][i, :rank])
    set_adapter_weights(pipe, {"a1": 1.0})
    one = unet_out(pipe)
    pipe.unet.to("cpu")  # a move: the table's last move is remembered (a closure) and must not stop a pickle
    twin = pickle.loads(pickle.dumps(pipe.unet))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, twin.config.cross_attention_dim, generator=g)
        torch.testing.assert_close(twin(x, torch.tensor([400]), c).sample, one, atol=1e-6, rtol=1e-6)  # (new addresses)
    table = weakref.ref(rows[0].table.z)
    del rows, row, twin
    delete_adapter(pipe, "a1")  # and nothing else holds it: a server can load and drop adapters all day
    gc.collect()
    assert table() is None


def test_moving_some_layers_moves_their_rows_of_a_loaded_adapter_only():
    """A loaded adapter's rows share one table, yet a move of part of a model (one block to
    another device or dtype) takes only the moved layers' rows: the others keep working and
    keep seeing in-place edits; a table made to train stays a leaf; a layer's cached δ is never
    the adapter's own memory."""
    from torch import nn

    from loldu_diffusion.layer import LoadedDelta, LoLDULayer

    torch.manual_seed(0)
    layers = nn.ModuleList([LoLDULayer(nn.Linear(8, 8), 4) for _ in range(2)])
    rows = LoadedDelta.rows(torch.randn(2, 4), [4, 4])
    for layer, row in zip(layers, rows):
        layer.add_adapter("a", row, 1.0)
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = [layer(x) for layer in layers]
        layers[0].double()
        assert rows[0].table.z.dtype == torch.float64 and rows[1].table.z.dtype == torch.float32
        layers[1].weights = {"a": 1.0}  # recomputes its blend from its own rows
        assert torch.equal(layers[1](x), before[1])
        layers[1].delta_vector().mul_(0)  # the cache is a copy: the adapter is untouched
        rows[1].z.mul_(2)  # an edit after the other layer moved is seen
        assert torch.allclose(layers[1](x), 2 * before[1], atol=1e-5) and rows[1].z.abs().sum() > 0
        torch.testing.assert_close(layers[0](x.double()).float(), before[0])
    rows[1].table.z.requires_grad_(True)
    layers[1].double()
    assert rows[1].table.z.is_leaf and rows[1].table.z.requires_grad and rows[1].table.z.dtype == torch.float64


def test_the_per_call_check_of_a_blend_does_not_grow_with_layers(tiny_sd_path, good):
    """The UNet's guard reads one version counter per loaded adapter (the rows of all its layers
    are one tensor), whatever the number of layers, also after .to() moved them; an edit of one
    layer's values is seen."""
    from loldu_diffusion import set_adapter_weights
    from loldu_diffusion.pipeline import load_base

    pipe = load_base(tiny_sd_path)
    for k in range(4):
        load_adapter(pipe, good, adapter_name=f"a{k}", weight=0.25)
    before = unet_out(pipe)
    guard = pipe.unet.__dict__["_loldu_guard"]
    layers = [layer for *_, layer in iter_layers(pipe.unet)]
    assert len(guard.layers) == len(layers) > 4 and len(guard.values) == 4
    tables = [layer.adapters["a0"].table.z for layer in layers]
    pipe.unet._apply(torch.clone)  # as .to() to another device does: new tensors
    moved = [layer.adapters["a0"].table.z for layer in layers]
    assert all(t is moved[0] for t in moved) and moved[0] is not tables[0]  # the table moved once, for every layer
    set_adapter_weights(pipe, {f"a{k}": 0.25 for k in range(4)})
    after = unet_out(pipe)  # (equal up to rounding: kernels may sum differently at new addresses)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    assert len(guard.values) == 4
    with torch.no_grad():
        layers[-1].adapters["a3"].z.mul_(3)
    edited = unet_out(pipe)
    assert (edited - after).abs().max() > 1e-4
    # a deep copy of the pipeline has a guard of its own, which sees edits of the copy's values only
    twin = copy.deepcopy(pipe)
    torch.testing.assert_close(unet_out(twin), edited, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        next(layer for *_, layer in iter_layers(twin.unet)).adapters["a0"].z.mul_(-2)
    assert (unet_out(twin) - edited).abs().max() > 1e-4 and torch.equal(unet_out(pipe), edited)


# ---- the trainer's image folders and output folder -------------------------------------------
def png_header_only(path, w, h):
    """A PNG that declares w×h pixels in a few bytes (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_hostile_image_folders_are_skipped_by_name(tmp_path):
    from loldu_diffusion.training.data import DataError, ImageSet

    Image.new("RGB", (16, 16), (200, 0, 200)).save(tmp_path / "good.png")
    png_header_only(tmp_path / "bomb.png", 20000, 20000)
    png_header_only(tmp_path / "huge.png", 9000, 9000)  # under PIL's own limit, over ours
    Image.new("RGB", (1, 2000)).save(tmp_path / "strip.png")
    os.mkfifo(tmp_path / "fifo.png")
    os.mkfifo(tmp_path / "fifo.txt")  # a caption that is a FIFO is not opened
    warnings = []
    s = ImageSet.from_folder(str(tmp_path), "a photo of sks heart", 8, warn=warnings.append)
    assert len(s) == 1 and s.images[0].shape == (3, 8, 8) and len(warnings) == 1
    for name in ("bomb.png (more than", "huge.png (9000×9000 is more than", "strip.png (1×2000: aspect ratio", "fifo.png (not a regular file)"):
        assert name in warnings[0], name
    (tmp_path / "good.txt").write_bytes(b"\xff\xfe\x00 caption in UTF-16?")
    with pytest.raises(DataError, match=r"caption .*good.txt: not UTF-8 text \(byte 0\); save it as UTF-8") as e:
        ImageSet.from_folder(str(tmp_path), "a photo of sks heart", 8, warn=lambda m: None)
    assert "\n" not in str(e.value)


def trainer_argv(tiny_sd_path, concept_dir, out):
    return ["--pretrained_model_name_or_path", tiny_sd_path, "--instance_data_dir", concept_dir,
            "--instance_prompt", "a photo of sks heart", "--output_dir", str(out), "--max_train_steps", "1"]


def test_second_trainer_on_one_output_dir_refuses(tiny_sd_path, concept_dir, tmp_path, capsys):
    from loldu_diffusion.training import main
    from loldu_diffusion.training.outdir import lock_output_dir

    held = lock_output_dir(str(tmp_path / "out"))  # the first run
    try:
        assert main(trainer_argv(tiny_sd_path, concept_dir, tmp_path / "out")) == 2
    finally:
        held.close()
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is in use by another training run" in err


def test_resume_latest_without_checkpoint_does_not_replace_an_adapter(tiny_sd_path, concept_dir, tmp_path, capsys):
    from loldu_diffusion.training import main

    (tmp_path / "loldu_adapter.safetensors").write_bytes(b"a finished run's adapter")
    assert main(trainer_argv(tiny_sd_path, concept_dir, tmp_path) + ["--resume_from_checkpoint", "latest"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no checkpoint in" in err and "--overwrite" in err
    assert (tmp_path / "loldu_adapter.safetensors").read_bytes() == b"a finished run's adapter"


def test_a_failed_run_lets_go_of_the_output_dir_while_its_error_is_still_held(tiny_sd_path, concept_dir, tmp_path):
    """The folder's lock is released when train() ends, not when its frame is collected: an error's
    traceback (held by a caller, a notebook, a test runner) keeps that frame alive, and the next
    run in the same process was refused as 'in use by another training run'."""
    from loldu_diffusion.training import TrainingError, parse_args, train
    from loldu_diffusion.training.outdir import lock_output_dir

    fast = ["--num_validation_images", "0", "--report_to", "none", "--checkpointing_steps", "1", "--max_train_steps", "1"]
    train(parse_args(trainer_argv(tiny_sd_path, concept_dir, tmp_path) + fast))
    with pytest.raises(TrainingError, match="--resume_from_checkpoint") as failed:  # fails after the lock is taken
        train(parse_args(trainer_argv(tiny_sd_path, concept_dir, tmp_path) + fast + ["--max_train_steps", "2", "--rank", "3",
                                                                                    "--resume_from_checkpoint", "checkpoint-1"]))
    assert failed.value.__traceback__ is not None  # the error, and the frames it holds, are still alive here
    lock_output_dir(str(tmp_path)).close()  # raised "in use by another training run" before


def test_resume_with_other_trained_values_is_one_line(tiny_sd_path, concept_dir, tmp_path, capsys):
    """A checkpoint made without pivotal tuning, resumed with it (or with another rank): one line naming what differs,
    before anything is loaded (it was a KeyError traceback, or silently ignored keys for PEFT's methods)."""
    from loldu_diffusion.training import main

    fast = ["--num_validation_images", "0", "--report_to", "none", "--checkpointing_steps", "1", "--max_train_steps", "2"]
    assert main(trainer_argv(tiny_sd_path, concept_dir, tmp_path) + fast) == 0
    capsys.readouterr()
    for other, said in ((["--train_text_encoder_ti", "--class_prompt", "a photo of a heart"], "lacks ['text_encoder.token_embedding']"),
                        (["--rank", "3"], "has other shapes for ['unet.")):
        assert main(trainer_argv(tiny_sd_path, concept_dir, tmp_path) + fast + ["--max_train_steps", "3", "--resume_from_checkpoint",
                                                                                "checkpoint-2", *other]) == 2
        err = capsys.readouterr().err.strip()  # after the base's loading bars: one line, no traceback
        last = err.splitlines()[-1]
        assert "Traceback" not in err and last.startswith("error: --resume_from_checkpoint") and said in last
        assert last.endswith("resume with the flags it was made with (--method, --rank, --unet_targets, --train_text_encoder, "
                             "--train_text_encoder_ti; an embedded-base run from before session 14 trained at --rank 32)")


def test_a_phase_longer_than_an_epoch_counted_run_is_one_line(tiny_sd_path, concept_dir, tmp_path, capsys):
    from loldu_diffusion.training import main

    argv = trainer_argv(tiny_sd_path, concept_dir, tmp_path)[:-2] + ["--num_train_epochs", "1", "--train_text_encoder_ti", "--class_prompt",
                                                                     "a photo of a heart", "--ti_only_steps", "100", "--report_to", "none"]
    assert main(argv) == 2  # the length is known once the images are counted, after the base has loaded
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: --ti_only_steps 100: give fewer steps than the run's ")


def test_stale_temp_files_are_removed_under_the_lock(tmp_path):
    from loldu_diffusion.training.outdir import lock_output_dir, remove_stale_temp

    (tmp_path / ".tmp-abc123.safetensors").write_bytes(b"half an adapter")
    (tmp_path / "checkpoint-4.tmp").mkdir()
    (tmp_path / "train_summary.json.tmp").write_text("{")
    (tmp_path / "loldu_adapter.safetensors").write_bytes(b"keep")
    lock = lock_output_dir(str(tmp_path))
    try:
        assert remove_stale_temp(str(tmp_path)) == [".tmp-abc123.safetensors", "checkpoint-4.tmp", "train_summary.json.tmp"]
    finally:
        lock.close()
    assert sorted(os.listdir(tmp_path)) == [".loldu-train.lock", "loldu_adapter.safetensors"]


def test_read_only_output_folder_is_one_line(tiny_sd_path, concept_dir, tmp_path, capsys, monkeypatch):
    from loldu_diffusion.training import main, outdir

    def read_only(path, exist_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(outdir.os, "makedirs", read_only)
    assert main(trainer_argv(tiny_sd_path, concept_dir, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'out'}: Read-only file system (write to another folder)"


def test_full_disk_in_the_cli_is_one_line(good, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def disk_full(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    out = tmp_path / "out"
    out.mkdir()
    assert loldu(["blend", f"{good}:0.5", "-o", str(out / "b.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "b.safetensors" in err and "free some space" in err
    assert os.listdir(out) == []


def test_app_auth_and_loopback():
    from loldu_diffusion.app import is_loopback, parse_auth

    assert parse_auth("ann:s3cret:x") == ("ann", "s3cret:x") and parse_auth(None) is None
    with pytest.raises(ValueError, match="--auth must be USER:PASSWORD"):
        parse_auth("ann")
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")


def test_components_of_different_ranks_blend_alone_and_together(tiny_sd_path, tmp_path, capsys):
    src = tmp_path / "te.safetensors"
    trained_adapter(tiny_sd_path, src, 3, text=True)
    mixed = craft(str(src), str(tmp_path / "mixed.safetensors"), tensors=lambda t: t.update(
        {f"text_encoder.{k}": t[f"text_encoder.{k}"][:, :2].contiguous() for k in ("delta", "pivots", "d")}))
    out = tmp_path / "out.safetensors"
    assert loldu(["blend", f"{mixed}:0.5", f"{src}:0.5", "-o", str(out)]) == 0, capsys.readouterr().err
    from loldu_diffusion import AdapterFile

    f = AdapterFile.read(str(out))
    assert f.delta["text_encoder"].shape[1] == 4 and f.delta["unet"].shape[1] == 4
    assert loldu(["blend", mixed, "-o", str(tmp_path / "alone.safetensors")]) == 0, capsys.readouterr().err
    assert AdapterFile.read(str(tmp_path / "alone.safetensors")).delta["text_encoder"].shape[1] == 2


def test_saving_a_blend_of_ranks_does_not_grow_the_model(tiny_sd_path, tmp_path):
    """The file stores every row at the largest rank; the layers that hold only the smaller
    adapter keep their own rank (saving does not change the model)."""
    from loldu_diffusion import save_adapter

    src = tmp_path / "te.safetensors"
    trained_adapter(tiny_sd_path, src, 3, text=True)
    small = craft(str(src), str(tmp_path / "small.safetensors"), tensors=lambda t: t.update(
        {f"text_encoder.{k}": t[f"text_encoder.{k}"][:, :2].contiguous() for k in ("delta", "pivots", "d")}))
    from loldu_diffusion.pipeline import load_base

    pipe = load_base(tiny_sd_path)
    load_adapter(pipe, small, adapter_name="small")
    ranks = {(c, m, t): layer.rank for c, m, t, layer in iter_layers(pipe)}
    assert {r for (c, *_), r in ranks.items() if c == "text_encoder"} == {2}
    f = save_adapter(pipe, str(tmp_path / "blend.safetensors"))
    assert {(c, m, t): layer.rank for c, m, t, layer in iter_layers(pipe)} == ranks
    ref = load_file(str(src))
    assert f.delta["text_encoder"].shape[1] == 4
    assert torch.equal(f.pivots["text_encoder"], ref["text_encoder.pivots"])  # the rank-4 LDU's pivots, computed aside
    assert torch.allclose(f.d["text_encoder"].float(), ref["text_encoder.d"].float(), rtol=2e-3, atol=1e-3)  # the file holds d in fp16


def test_a_large_rank_adapter_leaves_nothing_behind_when_deleted(tiny_sd_path, good, tmp_path):
    """A served base's factors grow to the largest rank loaded; when that adapter goes they shrink back to what the rest
    need (never below what a layer was made with), and outputs are bit-identical to before it came."""
    from loldu_diffusion import delete_adapter
    from loldu_diffusion.pipeline import load_base

    big = tmp_path / "big.safetensors"
    trained_adapter(tiny_sd_path, big, 5, rank=16)
    pipe = load_base(tiny_sd_path)
    load_adapter(pipe, good, adapter_name="small")
    ranks = {tuple(key): layer.rank for *key, layer in iter_layers(pipe)}
    before = unet_out(pipe)
    load_adapter(pipe, big, adapter_name="big", weight=0.0)
    assert all(layer.rank == 16 for *_, layer in iter_layers(pipe) if "big" in layer.adapters)
    assert torch.equal(unet_out(pipe), before)
    delete_adapter(pipe, "big")
    assert {tuple(key): layer.rank for *key, layer in iter_layers(pipe)} == ranks
    assert all(layer.L.untyped_storage().nbytes() == layer.L.nbytes for *_, layer in iter_layers(pipe))  # no view of the large ones
    assert torch.equal(unet_out(pipe), before)


def test_the_app_refuses_a_rank_above_what_it_serves(tiny_sd_path, good, monkeypatch):
    from loldu_diffusion import app

    studio = app.Studio(tiny_sd_path)
    monkeypatch.setattr(app, "MAX_RANK", 2)
    with pytest.raises(AdapterFileError, match=r"rank 4 is above the 2 this app serves on its shared base; generate with it through"):
        studio.acquire(good)
    assert studio.on_base == {}


def test_a_saved_folder_replaces_only_itself_and_never_the_folder_we_are_in(tmp_path, monkeypatch):
    from loldu_diffusion.io import atomic_save_dir

    def save(tag):
        def write(d):
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "model.txt"), "w") as f:
                f.write(tag)
        return write

    out = tmp_path / "model"
    (tmp_path / "model.tmp").mkdir()  # a neighbour that happens to have the old temp name
    (tmp_path / "model.tmp" / "notes.txt").write_text("mine")
    atomic_save_dir(save("v1"), str(out))
    with pytest.raises(FileExistsError, match="--overwrite"):
        atomic_save_dir(save("v2"), str(out))

    def killed(d):
        save("half")(d)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_save_dir(killed, str(out), overwrite=True)
    assert (out / "model.txt").read_text() == "v1"  # the old folder stays whole until the new one is complete
    atomic_save_dir(save("v2"), str(out), overwrite=True)
    assert (out / "model.txt").read_text() == "v2"
    assert sorted(os.listdir(tmp_path)) == ["model", "model.tmp"] and (tmp_path / "model.tmp" / "notes.txt").read_text() == "mine"

    (tmp_path / "file").write_text("keep")
    monkeypatch.chdir(out)
    os.symlink(tmp_path, tmp_path.parent / f"{tmp_path.name}-link")  # the current folder by another path
    for where, what in ((".", "the current folder"), (str(tmp_path), "the current folder"), (str(tmp_path / "file"), "a file"),
                        (str(tmp_path.parent / f"{tmp_path.name}-link" / "model"), "the current folder")):
        with pytest.raises(OSError, match=what):
            atomic_save_dir(save("v3"), where, overwrite=True)
    assert (out / "model.txt").read_text() == "v2" and (tmp_path / "file").read_text() == "keep"


def test_fuse_refuses_the_folder_it_runs_in_before_loading_anything(tiny_sd_path, tmp_path, capsys, monkeypatch):
    (tmp_path / "important.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    from loldu_diffusion.assets import ASSETS

    bundled = os.path.join(ASSETS, "adapters", "sks-heart.safetensors")
    assert loldu(["fuse", bundled, "--base", "/nonexistent-base", "-o", ".", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the current folder" in err and "/nonexistent-base" not in err
    assert os.listdir(tmp_path) == ["important.txt"]
