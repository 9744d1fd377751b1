"""The embedded base model, its judge and the example subject (assets/)."""
import os

import pytest
import torch

from loldu_diffusion.toy import default_base_path, default_concept_path, default_judge_path, world
from loldu_diffusion.toy.concepts import DEFAULT_SUBJECT
from loldu_diffusion.toy.evaluate_base import evaluate, generate, load_pipeline, prompt_set
from loldu_diffusion.toy.judge import load_judge


@pytest.fixture(scope="module")
def pipe():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return load_pipeline()


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def test_assets_are_small_enough_to_commit():
    total = sum(os.path.getsize(os.path.join(r, f)) for d in (default_base_path(), default_judge_path()) for r, _, fs in os.walk(d) for f in fs)
    assert total <= 25 * 2**20


def test_pipeline_loads_offline_and_generates_64px(pipe):
    from diffusers import StableDiffusionPipeline

    assert isinstance(pipe, StableDiffusionPipeline)
    img = generate(pipe, ["a red star on a navy background"], seed=0)[0]
    assert img.size == (64, 64)


def test_attention_reaches_the_full_latent_resolution(pipe):
    """As on SD (5 of 16 transformer blocks at full latent resolution): otherwise what an
    attention adapter can learn about a subject's layout is capped by the base, not the method."""
    unet = pipe.unet
    full = [b for b in unet.down_blocks[:1] + unet.up_blocks[-1:] if getattr(b, "attentions", None)]
    assert sum(len(b.attentions) for b in full) >= 3
    x = torch.zeros(1, 4, unet.config.sample_size, unet.config.sample_size)
    shapes = []
    hook = full[0].attentions[0].register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape[-2:])))
    with torch.no_grad():
        unet(x, 1, pipe.text_encoder(pipe.tokenizer([""], return_tensors="pt", padding="max_length").input_ids)[0])
    hook.remove()
    assert shapes == [(unet.config.sample_size, unet.config.sample_size)]


def test_tokenizer_knows_every_word_and_the_rare_identifiers(pipe):
    for w in world.vocabulary():
        assert len(pipe.tokenizer(w, add_special_tokens=False).input_ids) == 1, w
    assert "sks" in world.RARE_WORDS


@pytest.mark.parametrize("softened", [False, True])
def test_judge_reads_fresh_renders(judge, softened):
    """Also softened (blurred + noise): generated images are soft-edged, and a judge trained on
    crisp renders alone read clear, soft stars as rings and capped the base model at 0.875 shape."""
    from loldu_diffusion.toy.train_base import judge_accuracy

    acc = judge_accuracy(judge, 400, seed=434343 if softened else 424242, softened=softened)
    assert min(acc.values()) >= 0.97, acc


def test_short_evaluation_meets_the_target(pipe, judge):
    r = evaluate(pipe, judge, n=12, seed=0, sheet=None)
    assert r["n"] == 12 and r["all"] >= 0.8 and min(r["shape"], r["object_color"], r["background_color"], r["marking"]) >= 0.9, r


def test_prompt_set_covers_every_attribute():
    ps = prompt_set(48)
    assert len({p["prompt"] for p in ps}) == 48
    assert {p["shape"] for p in ps} == set(world.SHAPES) and {p["object_color"] for p in ps} == set(world.OBJECT_COLORS)
    assert {p["background_color"] for p in ps} == set(world.BACKGROUND_COLORS) and {p["marking"] for p in ps} == set(world.MARKINGS)


def test_example_subject(judge):
    from PIL import Image

    files = sorted(f for f in os.listdir(default_concept_path()) if f.endswith(".png"))
    assert 4 <= len(files) <= 6
    read = judge.read([Image.open(os.path.join(default_concept_path(), f)) for f in files])
    assert all(DEFAULT_SUBJECT.shown_in(a) for a in read)
    readme = open(os.path.join(default_concept_path(), "README.md")).read()
    assert "a photo of sks heart" in readme and "a photo of a heart" in readme


def test_identifier_rows_copy_changes_only_the_identifiers_rows(tmp_path):
    """The learning bench's experimental base: identifiers get rows of a trained word's size;
    the class and explicit prompts are encoded exactly as by the embedded base."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from loldu_diffusion.toy import default_base_path
    from loldu_diffusion.toy.identifier_rows import identifier_rows
    from loldu_diffusion.toy.world import RARE_WORDS

    base, out = default_base_path(), str(tmp_path / "rows")
    norm = identifier_rows(base, out)
    tok = CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer"))
    old, new = (CLIPTextModel.from_pretrained(os.path.join(p, "text_encoder")) for p in (base, out))
    ids = [tok(w, add_special_tokens=False).input_ids[0] for w in RARE_WORDS]
    t_old, t_new = old.get_input_embeddings().weight, new.get_input_embeddings().weight
    assert 0.4 < norm < 0.8 and torch.allclose(t_new[ids].norm(dim=1), torch.full((len(ids),), norm), atol=1e-5)
    assert float(t_old[ids].norm(dim=1).max()) < 0.3  # never trained: still at their initial scale
    others = torch.ones(t_old.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(t_old[others], t_new[others])
    for k, v in old.state_dict().items():
        if "token_embedding" not in k:
            assert torch.equal(v, new.state_dict()[k]), k
    with pytest.raises(Exception, match="exists"):
        identifier_rows(base, out)
