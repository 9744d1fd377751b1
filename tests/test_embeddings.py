"""`--embedding`: a trained identifier embedding ({token: (1, width)}) loaded into the text
encoder's table for generation; files from strangers refused with one line naming the file."""
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from loldu_diffusion.cli import main as loldu
from loldu_diffusion.embeddings import EmbeddingFileError, load_token_embeddings


@pytest.fixture(scope="module")
def pipe():
    from loldu_diffusion.pipeline import load_base

    return load_base()  # the embedded base


def test_the_row_is_written_and_only_that_row(pipe, tmp_path):
    table = pipe.text_encoder.get_input_embeddings().weight
    before = table.detach().clone()
    sks = pipe.tokenizer("sks", add_special_tokens=False).input_ids[0]
    row = before[pipe.tokenizer("heart", add_special_tokens=False).input_ids[0]] * 1.5
    path = str(tmp_path / "e.safetensors")
    save_file({"sks": row[None].clone()}, path)
    try:
        assert load_token_embeddings(pipe, path) == ["sks"]
        after = table.detach()
        torch.testing.assert_close(after[sks], row, atol=0, rtol=0)
        changed = (after != before).any(dim=1).nonzero().flatten().tolist()
        assert changed == [sks]
    finally:
        with torch.no_grad():
            table.copy_(before)


@pytest.mark.parametrize("tensors,match", [
    ({"sks": torch.zeros(1, 7)}, r"shape \(1, 7\); this text encoder needs \(1, 128\)"),
    ({"sks": torch.full((1, 128), float("nan"))}, "not finite or far out of scale"),
    ({"sks": torch.full((1, 128), 50.0)}, "not finite or far out of scale"),
    ({"sks": torch.zeros(1, 128, dtype=torch.int32)}, "not a float tensor"),
    ({"sks heart": torch.zeros(1, 128)}, "is 2 tokens of this tokenizer"),
    ({"<|endoftext|>": torch.zeros(1, 128)}, "is a special token of the tokenizer"),  # it ends and pads every prompt
    ({"sks": torch.zeros(1, 128), "SKS": torch.ones(1, 128)}, "'SKS' and 'sks' are the same token of this tokenizer"),
    ({"clip_l": torch.zeros(1, 128), "clip_g": torch.zeros(1, 256)}, r"an SDXL embedding \(clip_l, clip_g\) for a base with two text "
                                                                      "encoders; this base has 1"),
])
def test_bad_files_are_refused_by_name(pipe, tmp_path, tensors, match):
    path = str(tmp_path / "bad.safetensors")
    save_file(tensors, path)
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    with pytest.raises(EmbeddingFileError, match=match) as e:
        load_token_embeddings(pipe, path)
    assert "bad.safetensors" in str(e.value) and "\n" not in str(e.value)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, before)


def test_not_safetensors_is_refused(pipe, tmp_path):
    path = tmp_path / "learned_embeds.bin"
    torch.save({"sks": torch.zeros(1, 128)}, path)  # a pickle: never unpickled
    with pytest.raises(EmbeddingFileError, match="not a readable safetensors file"):
        load_token_embeddings(pipe, str(path))


def test_generate_uses_the_embedding(tmp_path, capsys):
    from loldu_diffusion.toy import default_base_path

    emb = str(tmp_path / "learned_embeds.safetensors")
    save_file({"sks": torch.randn(1, 128) * 0.5}, emb)
    common = ["generate", "--base", default_base_path(), "--prompt", "a photo of sks heart", "--steps", "2", "--num_images", "1",
              "--seed", "3"]
    assert loldu(common + ["-o", str(tmp_path / "plain")]) == 0
    assert loldu(common + ["--embedding", emb, "-o", str(tmp_path / "emb")]) == 0
    assert "token embedding for sks" in capsys.readouterr().out
    plain, with_emb = (Image.open(tmp_path / d / "0000_seed3.png") for d in ("plain", "emb"))
    assert json.loads(with_emb.text["parameters"])["embeddings"] == [emb]
    assert plain.tobytes() != with_emb.tobytes()
    assert loldu(common + ["--embedding", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "x")]) == 2
    assert "--embedding" in capsys.readouterr().err and not os.path.exists(tmp_path / "x")


def test_generate_checks_embeddings_before_the_base_loads_and_never_draws_one_token_two_ways(tmp_path, capsys):
    import shutil

    from loldu_diffusion.assets import bundled_adapters_dir

    bundled = os.path.join(bundled_adapters_dir(), "sks-heart.safetensors")
    runs = []
    for k in range(2):  # two trainer outputs whose identifier is sks, each with its own row
        (tmp_path / f"run{k}").mkdir()
        runs.append(str(shutil.copy(bundled, tmp_path / f"run{k}" / "loldu_adapter.safetensors")))
        save_file({"sks": torch.randn(1, 128) * 0.5}, str(tmp_path / f"run{k}" / "learned_embeds.safetensors"))
    common = ["generate", "--base", "/nonexistent-base", "--prompt", "a photo of sks heart", "-o", str(tmp_path / "x")]
    assert loldu(common + ["--adapter", runs[0], "--prompt", "a photo of sks heart", "--prompt_adapters", "none",
                           "--prompt_adapters", runs[1]]) == 2
    err = capsys.readouterr().err
    assert "give `sks` different rows; a token has one per image" in err and "nonexistent" not in err
    save_file({"sks": torch.zeros(1, 128, dtype=torch.int32)}, str(tmp_path / "run1" / "learned_embeds.safetensors"))
    assert loldu(common + ["--adapter", runs[1]]) == 2  # a bad file found beside an adapter: said so, before the base loads
    err = capsys.readouterr().err
    assert f"the embedding beside {runs[1]}: {tmp_path}/run1/learned_embeds.safetensors: 'sks' is torch.int32" in err
    assert "--embedding" not in err and "nonexistent" not in err
    # an --embedding chooses the row: the file beside the adapter is left out, and that is said
    from loldu_diffusion.toy import default_base_path

    mine = str(tmp_path / "mine.safetensors")
    save_file({"sks": torch.randn(1, 128) * 0.5}, mine)
    argv = ["generate", "--base", default_base_path(), "--prompt", "a photo of sks heart", "--steps", "1", "--num_images", "1",
            "--seed", "0", "--adapter", runs[0], "--embedding", mine, "-o", str(tmp_path / "out")]
    assert loldu(argv) == 0
    out = capsys.readouterr().out
    assert f"the embedding beside {runs[0]} is not used: --embedding {mine} gives `sks` its row" in out
    meta = json.loads(Image.open(tmp_path / "out" / "0000_seed0.png").text["parameters"])
    assert meta["embeddings"] == [mine]


def test_the_trainers_embedding_goes_with_the_trainers_adapter_only(tmp_path):
    """learned_embeds.safetensors beside loldu_adapter.safetensors is one run's; other adapters copied into that
    folder do not take its token; NAME.learned_embeds.safetensors goes with NAME.safetensors."""
    from loldu_diffusion.embeddings import embedding_beside

    for name in ("loldu_adapter.safetensors", "cat.safetensors", "learned_embeds.safetensors", "cat.learned_embeds.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert embedding_beside(str(tmp_path / "loldu_adapter.safetensors")) == str(tmp_path / "learned_embeds.safetensors")
    assert embedding_beside(str(tmp_path / "cat.safetensors")) == str(tmp_path / "cat.learned_embeds.safetensors")
    (tmp_path / "cat.learned_embeds.safetensors").unlink()
    assert embedding_beside(str(tmp_path / "cat.safetensors")) is None


def test_an_sd15_embedding_is_refused_on_sdxl(tiny_sdxl_path, tmp_path):
    """SDXL draws with both text encoders' tables: a one-table file wrote the first table and left clip_g as it was."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from loldu_diffusion.embeddings import EmbeddingFileError, read_pipeline_embeddings

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    save_file({"sks": torch.zeros(1, width)}, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(EmbeddingFileError, match=r"one row per token .* but this base has two text encoders \(SDXL\)"):
        read_pipeline_embeddings(pipe, str(tmp_path / "sd15.safetensors"))
