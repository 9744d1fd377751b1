"""The app's functions on a tiny base: sessions over one shared base; load, validate, blend, generate, export."""
import copy
import json
import os
import shutil
import threading

import pytest
import torch

from loldu_diffusion import AdapterFile, AdapterFileError
from loldu_diffusion.app import MAX_SLOTS, Studio
from loldu_diffusion.model import adapter_names
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


@pytest.fixture()
def session(studio):
    return studio.new_session()


def pixels(img):
    import numpy as np

    return torch.from_numpy(np.asarray(img).astype("float32"))


def test_lists_loads_and_describes_adapters(studio, session, adapter_dir):
    assert [os.path.basename(p) for p in studio.folder_adapters()] == ["dog.safetensors", "style.safetensors"]
    a = session.add(str(adapter_dir / "dog.safetensors"))
    text = a.describe()
    assert "trigger `a photo of sks heart`" in text and "rank 4" in text and f"{a.file.nbytes:,} bytes" in text
    assert session.add(str(adapter_dir / "dog.safetensors")) is a  # the same file twice loads once
    assert adapter_names(studio.pipe) == ["dog"] and studio.users == {a.key: 1}


def test_generation_with_blend_side_by_side_and_fuse(session, adapter_dir):
    base_only = session.generate("a photo of sks heart", steps=2, seed=3, num_images=1)
    assert len(base_only) == 1 and "no adapter" in base_only[0][1]
    session.add(str(adapter_dir / "dog.safetensors"))
    session.add(str(adapter_dir / "style.safetensors"))
    secs = session.set_weights({"dog": 0.8, "style": -0.5})
    out = session.generate("a photo of sks heart", steps=2, seed=3, num_images=1, compare=True)
    assert [c.split(" · ")[-1] for _, c in out] == ["dog:0.8, style:-0.5", "base model"]
    assert torch.equal(pixels(out[1][0]), pixels(base_only[0][0]))  # the side-by-side base is the base
    assert not torch.equal(pixels(out[0][0]), pixels(base_only[0][0]))
    fused = session.generate("a photo of sks heart", steps=2, seed=3, num_images=1, fuse=True)
    assert (pixels(fused[0][0]) - pixels(out[0][0])).abs().max() <= 2  # fused = unfused, up to rounding
    assert secs < 1.0  # re-weighting never reloads the base (measured by benchmarks; a loose sanity bound)


def test_bad_uploads_are_refused_and_the_studio_keeps_working(studio, session, adapter_dir, tmp_path, tiny_sd_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        session.add(str(bad))
    with pytest.raises(AdapterFileError, match="only .safetensors"):
        session.add(str(adapter_dir / "notes.txt"))
    from pipelines import make_tiny_sd

    other = make_tiny_sd(str(tmp_path / "other"), seed=4)
    trained_adapter(other, tmp_path / "foreign.safetensors", 1)
    with pytest.raises(AdapterFileError, match="does not match this base model"):
        session.add(str(tmp_path / "foreign.safetensors"))
    assert session.loaded == {}
    assert len(session.generate("a red star", steps=2, seed=0)) == 1


def distinct_copy(src, dst, i):
    """The same adapter in a file of other bytes (a copy with the same bytes is the same adapter)."""
    f = AdapterFile.read(str(src))
    f.metadata = {**f.metadata, "instance_prompt": f"a photo of sks heart {i}"}
    f.save(str(dst))
    return str(dst)


def test_slots_are_limited(session, adapter_dir, tmp_path):
    for i in range(MAX_SLOTS):
        session.add(distinct_copy(adapter_dir / "dog.safetensors", tmp_path / f"d{i}.safetensors", i))
    with pytest.raises(ValueError, match=f"at most {MAX_SLOTS}"):
        session.add(str(adapter_dir / "style.safetensors"))


def test_export_of_the_active_blend(session, adapter_dir):
    from safetensors.torch import load_file

    with pytest.raises(ValueError, match="load an adapter"):
        session.export_lora()
    session.add(str(adapter_dir / "dog.safetensors"))
    path = session.export_lora("kohya")
    assert path.endswith(".safetensors") and any(k.startswith("lora_unet_") for k in load_file(path))


# ---- sessions: one shared base, nothing shared between tabs -----------------------------------
PROMPT = "a photo of sks heart"


def test_sessions_never_see_each_others_adapters(studio, adapter_dir):
    a, b = studio.new_session(), studio.new_session()
    a.add(str(adapter_dir / "dog.safetensors"))
    assert b.loaded == {}  # a fresh tab shows no adapter, and generates with none
    base = b.generate(PROMPT, steps=2, seed=3)
    mine = a.generate(PROMPT, steps=2, seed=3)
    assert base[0][1].endswith("no adapter") and mine[0][1].endswith("dog:1")
    assert not torch.equal(pixels(mine[0][0]), pixels(base[0][0]))
    # in turns, fused or not: each gets its own images, bit for bit
    for fuse in (False, True):
        again_b = b.generate(PROMPT, steps=2, seed=3)
        again_a = a.generate(PROMPT, steps=2, seed=3, fuse=fuse)
        assert torch.equal(pixels(again_b[0][0]), pixels(base[0][0]))
        assert (pixels(again_a[0][0]) - pixels(mine[0][0])).abs().max() <= (2 if fuse else 0)
    assert torch.equal(pixels(b.generate(PROMPT, steps=2, seed=3)[0][0]), pixels(base[0][0]))  # after a fused turn
    # re-weighting one tab changes nothing for the other
    a.set_weights({"dog": -1.0})
    assert torch.equal(pixels(b.generate(PROMPT, steps=2, seed=3)[0][0]), pixels(base[0][0]))


def test_concurrent_generations_do_not_leak(studio, adapter_dir):
    a, b = studio.new_session(), studio.new_session()
    a.add(str(adapter_dir / "dog.safetensors"))
    b.add(str(adapter_dir / "style.safetensors"))
    b.set_weights({"style": 1.5})
    want = {s: s.generate(PROMPT, steps=2, seed=5)[0][0] for s in (a, b)}
    got, errors = {a: [], b: []}, []

    def work(s):
        try:
            for _ in range(3):
                got[s].append(s.generate(PROMPT, steps=2, seed=5)[0][0])
        except Exception as e:  # noqa: BLE001 — reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in (a, b):
        assert len(got[s]) == 3 and all(torch.equal(pixels(im), pixels(want[s])) for im in got[s])


def test_a_file_is_loaded_once_on_the_shared_base_and_released_by_its_last_user(studio, adapter_dir, tmp_path):
    a, b = studio.new_session(), studio.new_session()
    a.add(str(adapter_dir / "dog.safetensors"))
    b.add(str(shutil.copy(adapter_dir / "dog.safetensors", tmp_path / "same bytes.safetensors")))
    assert adapter_names(studio.pipe) == ["dog"] and list(studio.users.values()) == [2]
    a.close()
    assert a.loaded == {} and adapter_names(studio.pipe) == ["dog"]  # b still uses it
    b.remove("same_bytes")
    assert adapter_names(studio.pipe) == [] and studio.users == {}


def test_every_new_session_starts_with_the_preloaded_adapter_loaded_once(tiny_sd_path, adapter_dir):
    studio = Studio(tiny_sd_path, str(adapter_dir), preload=[str(adapter_dir / "dog.safetensors")])
    assert studio.default_prompt == "a photo of sks heart"  # the adapter's trigger prompt
    tabs = [studio.new_session() for _ in range(3)]  # a page and two reloads of it
    assert all(list(t.loaded) == ["dog"] for t in tabs)
    assert adapter_names(studio.pipe) == ["dog"]
    assert tabs[0].add(str(adapter_dir / "dog.safetensors")) is tabs[0].loaded["dog"]  # loading it again: still once
    for t in tabs:
        t.close()
    assert adapter_names(studio.pipe) == ["dog"]  # the next tab needs it too
    fresh = studio.new_session()
    assert fresh.generate(PROMPT, steps=2, seed=0)[0][1].endswith("dog:1")
    # Gradio deep-copies state values: a session copies as itself, never the shared base
    assert copy.deepcopy(fresh) is fresh


def test_a_preload_the_base_refuses_is_reported_and_the_app_starts_without_it(tiny_sd_path, adapter_dir, tmp_path):
    from pipelines import make_tiny_sd

    other = make_tiny_sd(str(tmp_path / "other"), seed=4)
    trained_adapter(other, tmp_path / "foreign.safetensors", 1)
    studio = Studio(tiny_sd_path, preload=[str(tmp_path / "foreign.safetensors"), str(adapter_dir / "dog.safetensors")])
    assert len(studio.preload_errors) == 1 and studio.preload_errors[0].startswith("foreign.safetensors is not preloaded: ")
    assert "does not match this base model" in studio.preload_errors[0]
    assert list(studio.new_session().loaded) == ["dog"] and adapter_names(studio.pipe) == ["dog"]


def test_the_default_prompt_is_the_one_the_adapter_was_validated_with(tiny_sd_path, adapter_dir, tmp_path):
    f = AdapterFile.read(str(adapter_dir / "dog.safetensors"))
    f.metadata = {**f.metadata, "validation_prompt": "a photo of sks heart, close up"}
    f.save(str(tmp_path / "validated.safetensors"))
    assert Studio(tiny_sd_path, preload=[str(tmp_path / "validated.safetensors")]).default_prompt == "a photo of sks heart, close up"


def test_sizes_above_the_native_size_are_refused(session, studio):
    with pytest.raises(ValueError, match=f"above the base model's native {studio.native} px.*choose {studio.native} or less"):
        session.generate(PROMPT, steps=2, size=studio.native * 2)
    assert len(session.generate(PROMPT, steps=1, size=studio.native // 2)) == 1


def test_results_are_saved_with_their_settings_and_kept_in_the_history(tiny_sd_path, adapter_dir, tmp_path):
    from PIL import Image

    studio = Studio(tiny_sd_path, str(adapter_dir), outputs_dir=str(tmp_path / "out"))
    s = studio.new_session()
    s.add(str(adapter_dir / "dog.safetensors"))
    first = s.generate(PROMPT, "blurry", steps=2, seed=7, num_images=1, compare=True, sampler="Euler a")
    second = s.generate(PROMPT, steps=2, seed=7, num_images=1)
    assert s.history == second + first  # newest first
    path, caption = first[0]
    saved = tmp_path / "out" / os.path.basename(path)
    # the page gets a link outside the outputs folder (which is never served); the PNG is the same file
    assert not path.startswith(str(tmp_path)) and os.path.samefile(path, saved) and "Euler a" in caption
    with Image.open(saved) as im:
        settings = json.loads(im.text["parameters"])
    assert settings == {"prompt": PROMPT, "negative_prompt": "blurry", "seed": 7, "steps": 2, "guidance": 4.0,
                        "size": studio.native, "base": tiny_sd_path, "adapters": {"dog": 1.0}, "embeddings": [],
                        "sampler": "Euler a"}
    with Image.open(first[1][0]) as im:
        assert json.loads(im.text["parameters"])["adapters"] == {}  # the side-by-side base image
    assert len(set(p for p, _ in s.history)) == 3 and len(os.listdir(tmp_path / "out")) == 3  # never one file over another


def test_pages_links_go_with_the_history_and_the_pngs_stay(tiny_sd_path, tmp_path, monkeypatch):
    import loldu_diffusion.app as app

    monkeypatch.setattr(app, "MAX_HISTORY", 2)
    studio = Studio(tiny_sd_path, outputs_dir=str(tmp_path / "out"))
    s = studio.new_session()
    made = [s.generate(PROMPT, steps=1, seed=i)[0][0] for i in range(3)]

    def linked():
        return sorted(os.path.join(r, f) for r, _, fs in os.walk(studio.shown_dir) for f in fs)

    # the oldest fell off; its link goes one round late (Gradio may still be copying the gallery just returned)
    assert [p for p, _ in s.history] == made[:0:-1] and linked() == sorted(made)
    s.clear_history()
    assert linked() == sorted(made[1:])
    s.close()
    assert linked() == [] and len(os.listdir(tmp_path / "out")) == 3  # the saved PNGs are the user's


def test_what_an_image_says_it_was_drawn_with_is_what_it_was_drawn_with(tiny_sd_path, adapter_dir, tmp_path):
    from PIL import Image

    studio = Studio(tiny_sd_path, str(adapter_dir), outputs_dir=str(tmp_path / "out"))
    s = studio.new_session()
    s.add(str(adapter_dir / "dog.safetensors"))
    emb = _embedding(tmp_path / "sks.safetensors", studio.pipe)
    s.add_embedding(emb)

    def moved(*args, **kwargs):  # a slider moved while the image is drawn (another thread, no lock)
        s.set_weights({"dog": -2})

    (path, caption), = s.generate(PROMPT, steps=2, seed=1, progress=moved)
    assert caption.endswith("dog:1 + embedding of sks") and s.last_drawn.text == "dog:1 + embedding of sks"  # the status line's
    with Image.open(path) as im:
        settings = json.loads(im.text["parameters"])
    assert settings["adapters"] == {"dog": 1.0} and settings["embeddings"] == [emb]  # reproducible with loldu generate


@pytest.mark.parametrize("seed", [None, float("nan"), 1.5, 2**63])
def test_a_seed_the_generator_cannot_take_is_one_line(session, seed):
    if seed is None:  # the library's None: a random seed
        assert len(session.generate(PROMPT, steps=1, seed=None)) == 1
        return
    with pytest.raises(ValueError, match="the seed must be a whole number from 0 to 9223372036854775807"):
        session.generate(PROMPT, steps=1, seed=seed)


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "DPM++ 2M Karras", "Euler a", "Euler", "DDIM", "UniPC"])
def test_samplers_by_their_a1111_names(session, studio, sampler):
    import numpy as np

    from loldu_diffusion.schedulers import SAMPLERS, make_scheduler

    before = studio.pipe.scheduler
    (image, caption), = session.generate(PROMPT, steps=3, seed=0, sampler=sampler)
    assert sampler in caption and np.isfinite(np.asarray(image, dtype="float32")).all()
    assert studio.pipe.scheduler is before  # the base's own scheduler is back for the next user
    made = make_scheduler(sampler, before)
    assert type(made).__name__ == SAMPLERS[sampler][0] and made.config.prediction_type == before.config.prediction_type
    assert make_scheduler("default", before) is before
    assert not getattr(made.config, "clip_sample", False)  # latents are not bounded to [-1, 1] (DDIM's default clips)
    with pytest.raises(ValueError, match="unknown sampler 'k_lms'; choose one of"):
        session.generate(PROMPT, steps=1, sampler="k_lms")


def _embedding(path, pipe, seed=0):
    from safetensors.torch import save_file

    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    save_file({"sks": torch.randn(1, width, generator=torch.Generator().manual_seed(seed)) * 0.5}, str(path))
    return str(path)


def test_an_embedding_beside_its_adapter_loads_with_it_draws_as_the_library_does_and_stays_in_its_session(studio, adapter_dir,
                                                                                                         tmp_path):
    from loldu_diffusion.embeddings import load_token_embeddings

    out = tmp_path / "run"  # a trainer's output folder: the adapter and the identifier's embedding
    out.mkdir()
    shutil.copy(adapter_dir / "dog.safetensors", out / "loldu_adapter.safetensors")
    emb = _embedding(out / "learned_embeds.safetensors", studio.pipe)
    table = studio.pipe.text_encoder.get_input_embeddings().weight
    before = table.detach().clone()
    mine, other = studio.new_session(), studio.new_session()
    msg = mine.add_any(str(out / "loldu_adapter.safetensors"))
    assert "embedding of `sks` from `learned_embeds.safetensors`" in msg and len(mine.embeddings) == 1
    other.add(str(adapter_dir / "dog.safetensors"))  # the same adapter, no embedding
    got = mine.generate(PROMPT, steps=2, seed=3, compare=True)
    plain = other.generate(PROMPT, steps=2, seed=3, compare=True)
    assert torch.equal(table, before)  # the shared table is the base's again after every generation
    assert got[0][1].endswith("+ embedding of sks") and got[1][1].endswith("base model")
    assert torch.equal(pixels(got[1][0]), pixels(plain[1][0]))  # the side-by-side base has no embedding either
    assert not torch.equal(pixels(got[0][0]), pixels(plain[0][0]))  # the row is used
    try:  # the library's path (what `loldu generate --embedding` does) draws the same image
        load_token_embeddings(studio.pipe, emb)
        ref = other.generate(PROMPT, steps=2, seed=3)
    finally:
        with torch.no_grad():
            table.copy_(before)
    assert torch.equal(pixels(got[0][0]), pixels(ref[0][0]))
    # batched with the session without it, each image equals the one its session draws alone
    from loldu_diffusion.app_batch import Request, generate_batch

    requests = [Request(mine, PROMPT, steps=2, seed=3, compare=True), Request(other, PROMPT, steps=2, seed=3)]
    generate_batch(studio, requests)
    assert all((pixels(a) - pixels(b)).abs().max() <= 1 for (a, _), (b, _) in zip(requests[0].result, got))
    assert (pixels(requests[1].result[0][0]) - pixels(plain[0][0])).abs().max() <= 1
    assert torch.equal(table, before)
    mine.clear()
    assert mine.embeddings == {} and mine.token_rows() == {}


def test_a_preloaded_adapter_brings_its_named_embedding_and_the_list_shows_only_adapters(tiny_sd_path, adapter_dir, tmp_path):
    # the bundled example's layout: NAME.safetensors and NAME.learned_embeds.safetensors in one folder of several adapters
    folder = tmp_path / "adapters"
    folder.mkdir()
    shutil.copy(adapter_dir / "dog.safetensors", folder / "dog.safetensors")
    shutil.copy(adapter_dir / "dog.safetensors", folder / "cat.safetensors")
    studio = Studio(tiny_sd_path, str(folder), preload=[str(folder / "dog.safetensors")])
    _embedding(folder / "dog.learned_embeds.safetensors", studio.pipe)
    studio = Studio(tiny_sd_path, str(folder), preload=[str(folder / "dog.safetensors")])
    assert [name for name, _ in studio.adapter_choices()] == ["cat.safetensors", "dog.safetensors"]
    tab = studio.new_session()
    assert [e.path for e in tab.embeddings.values()] == [str(folder / "dog.learned_embeds.safetensors")]
    assert studio.new_session().generate(PROMPT, steps=2, seed=0)[0][1].endswith("+ embedding of sks")
    cat = studio.new_session()
    cat.clear()
    cat.add(str(folder / "cat.safetensors"))  # another adapter of the folder does not take dog's embedding
    assert cat.embeddings == {}
    # two preloaded adapters whose embeddings give `sks` different rows: the second is not preloaded, and says why
    _embedding(folder / "cat.learned_embeds.safetensors", studio.pipe, seed=1)
    both = Studio(tiny_sd_path, str(folder), preload=[str(folder / "dog.safetensors"), str(folder / "cat.safetensors")])
    assert [e[3] for e in both.preload] == [str(folder / "dog.safetensors")]
    assert both.preload_errors == ["cat.safetensors is not preloaded: cat.learned_embeds.safetensors: the token(s) ['sks'] already "
                                   "have an embedding in the preloaded adapters (dog.learned_embeds.safetensors); remove it first"]


def test_bad_embeddings_are_refused_and_a_token_loaded_again_replaces_the_older_file(studio, session, tmp_path):
    from safetensors.torch import save_file

    from loldu_diffusion.embeddings import EmbeddingFileError

    first = session.add_any(_embedding(tmp_path / "sks_a.safetensors", studio.pipe, seed=1))
    assert first.startswith("loaded the embedding of `sks`")
    save_file({"sks": torch.zeros(1, 3)}, str(tmp_path / "learned_embeds.safetensors"))
    with pytest.raises(EmbeddingFileError, match=r"learned_embeds.safetensors: 'sks' has shape \(1, 3\)"):
        session.add_any(str(tmp_path / "learned_embeds.safetensors"))
    assert [os.path.basename(e.path) for e in session.embeddings.values()] == ["sks_a.safetensors"]
    said = session.add_any(_embedding(tmp_path / "sks_b.safetensors", studio.pipe, seed=2))  # one token, one row: the newer
    assert said.endswith("it replaces the embedding of `sks` from `sks_a.safetensors` (a token has one embedding at a time)")
    assert [os.path.basename(e.path) for e in session.embeddings.values()] == ["sks_b.safetensors"]


def test_a_run_trained_with_the_preloaded_examples_trigger_replaces_it_in_the_page(tiny_sd_path, adapter_dir, tmp_path):
    # the app's Train tab defaults to the trigger `sks`, which the bundled example's embedding also defines
    example, run = tmp_path / "adapters", tmp_path / "trained" / "sks-heart"
    example.mkdir()
    run.mkdir(parents=True)
    shutil.copy(adapter_dir / "dog.safetensors", example / "sks-heart.safetensors")
    shutil.copy(adapter_dir / "style.safetensors", run / "loldu_adapter.safetensors")
    studio = Studio(tiny_sd_path, str(example), preload=[str(example / "sks-heart.safetensors")])
    _embedding(example / "sks-heart.learned_embeds.safetensors", studio.pipe, seed=1)
    _embedding(run / "learned_embeds.safetensors", studio.pipe, seed=2)
    studio = Studio(tiny_sd_path, str(example), preload=[str(example / "sks-heart.safetensors")])
    page = studio.new_session()
    said = page.add_any(str(run / "loldu_adapter.safetensors"), display_name="sks-heart")
    assert said == ("loaded sks-heart with the embedding of `sks` from `learned_embeds.safetensors`; it replaces sks-heart and "
                    "the embedding of `sks` from `sks-heart.learned_embeds.safetensors` (a token has one embedding at a time)")
    # the run keeps its name (the example it replaced gave it up first)
    assert list(page.loaded) == ["sks-heart"] and page.loaded["sks-heart"].path == str(run / "loldu_adapter.safetensors")
    assert [e.path for e in page.embeddings.values()] == [str(run / "learned_embeds.safetensors")]
    assert list(studio.new_session().loaded) == ["sks-heart"]  # other pages keep the example
    # retrained in place (--overwrite) and loaded again: the new row replaces the old; the adapter stays
    _embedding(run / "learned_embeds.safetensors", studio.pipe, seed=3)
    said = page.add_any(str(run / "loldu_adapter.safetensors"), display_name="sks-heart")
    assert list(page.loaded) == ["sks-heart"] and len(page.embeddings) == 1 and said.startswith("loaded sks-heart with")


def test_a_strangers_text_stays_inside_its_code_span(session, adapter_dir, tmp_path):
    import dataclasses

    f = AdapterFile.read(str(adapter_dir / "dog.safetensors"))
    evil = "sks` ![x](http://attacker.example/x.png) `"
    dataclasses.replace(f, metadata=dict(f.metadata, instance_prompt=evil, base_model="b`[link](http://attacker.example)")).save(
        str(tmp_path / "evil.safetensors"))
    text = session.add(str(tmp_path / "evil.safetensors")).describe()
    assert text.count("`") == 4 and "\n" not in text  # two code spans: the trigger's and the base's
    # text that is no one line of printable text is refused as it is read (terminals, cards and pages quote it) …
    with pytest.raises(AdapterFileError, match="metadata 'base_model' must be one line of printable text"):  # not written …
        dataclasses.replace(f, metadata=dict(f.metadata, base_model="x\x1b[2J\nsecond line")).save(str(tmp_path / "esc.safetensors"))
    from tiny import craft

    craft(str(adapter_dir / "dog.safetensors"), str(tmp_path / "esc.safetensors"), meta=lambda m: m.update(base_model="x\x1b[2J\nline"))
    with pytest.raises(AdapterFileError, match="metadata 'base_model' must be one line of printable text"):  # … nor read
        session.add(str(tmp_path / "esc.safetensors"))
    # … and an error that quotes a stranger's text is escaped for the page's Markdown: no link, no image it would load
    from loldu_diffusion.app import _one_line

    shown = _one_line(AdapterFileError("evil.safetensors: trained on ![x](http://attacker.example/x.png) [click](http://e) \x1b[2J"))
    assert "![" not in shown and "](" not in shown and "\x1b" not in shown and "\\!\\[x\\]\\(http" in shown


def test_a_mistyped_adapters_folder_is_one_line_before_the_base_loads(tmp_path, monkeypatch):
    from loldu_diffusion import app

    monkeypatch.setattr(app, "Studio", None)  # never reached
    with pytest.raises(ValueError, match=f"^--adapters {tmp_path}/typo: no such folder$"):
        app.launch(adapters_dir=str(tmp_path / "typo"), outputs=str(tmp_path), block=False)


def test_a_closed_tab_lets_go_of_its_session(studio, adapter_dir):
    """Gradio's own bookkeeping, as the server runs it: page load, an adapter added, the tab closed and expired
    (Gradio calls delete_callback only for a State an event wrote: its value is a function, so page load writes it)."""
    import asyncio

    from gradio.state_holder import StateHolder

    from loldu_diffusion.app import Session, build_ui

    demo = build_ui(studio)
    holder = StateHolder()
    holder.set_blocks(demo)
    page = holder["a-tab"]
    on_load = [fn for fn in demo.fns.values() if any(t[1] == "load" for t in fn.targets)]  # Gradio writes the State there
    for fn in on_load:
        asyncio.run(demo.process_api(fn, [None] * len(fn.inputs), state=page))
    session = next(v for v in page.state_data.values() if isinstance(v, Session))
    session.add(str(adapter_dir / "dog.safetensors"))
    key = session.loaded["dog"].key
    assert studio.users[key] == 1
    page.is_closed, page.STATE_TTL_WHEN_CLOSED = True, 0  # closed an hour ago
    holder.delete_all_expired_state()
    assert session.closed and key not in studio.users  # the adapter left the base with its last user


def test_an_upload_takes_no_embedding_from_the_shared_upload_cache(session, adapter_dir, tmp_path):
    """Gradio keeps each upload in a folder named by its content's hash: a user who uploads a public adapter's bytes as
    NAME.learned_embeds.safetensors puts that file beside every later upload of the adapter. Uploads are loaded without
    looking beside them (a folder's adapters still bring their embedding)."""
    import shutil

    from loldu_diffusion.embeddings import EmbeddingFileError

    up = tmp_path / "gradio" / "abc123"
    up.mkdir(parents=True)
    shutil.copy(adapter_dir / "dog.safetensors", up / "dog.safetensors")
    shutil.copy(adapter_dir / "dog.safetensors", up / "dog.learned_embeds.safetensors")  # not an embedding: refused if read
    with pytest.raises(EmbeddingFileError):
        session.add_any(str(up / "dog.safetensors"))
    assert session.add_any(str(up / "dog.safetensors"), beside=False).startswith("loaded dog") and session.embeddings == {}
