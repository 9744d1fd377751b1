"""Each `loldu` command on tiny models, with its errors."""
import json
import os
import shutil

import pytest
import torch
from PIL import Image

from loldu_diffusion import AdapterFile, AdapterFileError, LoLDUConfig, inject_loldu, load_adapter, loldu_parameters, save_adapter
from loldu_diffusion.cli import main as loldu
from loldu_diffusion.config import DEFAULT_TEXT_ENCODER_TARGETS


def trained_adapter(base, path, seed, rank=4, text=False):
    from loldu_diffusion.pipeline import load_base

    pipe = load_base(base)
    inject_loldu(pipe, LoLDUConfig(rank=rank, init="uniform", text_encoder_targets=DEFAULT_TEXT_ENCODER_TARGETS if text else None))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in loldu_parameters(pipe):
            p.add_(0.2 * torch.randn_like(p))
    save_adapter(pipe, str(path), metadata={"instance_prompt": "a photo of sks heart"})
    return pipe


def unet_out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    c = torch.randn(1, 7, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([400]), c).sample


@pytest.fixture(scope="module")
def embedded():
    from loldu_diffusion.toy import default_base_path

    return default_base_path()


@pytest.fixture(scope="module")
def adapters(embedded, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    trained_adapter(embedded, d / "a.safetensors", 1, rank=4, text=True)
    trained_adapter(embedded, d / "b.safetensors", 2, rank=2, text=True)
    return d


def same_unet_as_diffusers_lora(base, spec, lora_file):
    """(the base with the adapters, the base with diffusers' load_lora_weights of the export), after checking their UNets agree."""
    from loldu_diffusion.pipeline import load_adapter_specs, load_base

    ref = load_base(base)
    load_adapter_specs(ref, spec)
    lora = load_base(base)
    lora.load_lora_weights(str(lora_file))
    a, b = unet_out(ref), unet_out(lora)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * a.abs().max())
    return ref, lora


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_export_lora_gives_the_same_unet_output_in_diffusers(embedded, adapters, tmp_path, fmt):
    out = tmp_path / f"lora_{fmt}.safetensors"
    spec = [str(adapters / "a.safetensors") + ":0.8", str(adapters / "b.safetensors") + ":-0.5"]  # a blend
    assert loldu(["export-lora", *spec, "--base", embedded, "--format", fmt, "-o", str(out)]) == 0
    ref, lora = same_unet_as_diffusers_lora(embedded, spec, out)
    ids = ref.tokenizer(["a photo of sks heart"], padding="max_length", max_length=ref.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(ref.text_encoder(ids)[0], lora.text_encoder(ids)[0], atol=1e-4)
    if fmt == "kohya":
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            keys, meta = list(f.keys()), f.metadata()
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys) and meta["ss_network_dim"] == "4"
    # an existing output is refused
    assert loldu(["export-lora", str(adapters / "a.safetensors"), "--base", embedded, "-o", str(out)]) == 2


def test_export_of_layers_at_other_ranks_is_exact_one_rank_and_warns_of_the_embedding(embedded, adapters, tmp_path, capsys):
    """diffusers' format has no alpha: its loaders scale every layer by alpha / r with one alpha, so a blend whose
    layers have other ranks (here 4 on to_k, 2 elsewhere) is written at one rank, zero-padded; each rank-1 term's
    two factors are balanced (fp16 tools); and the subject's token embedding, which no LoRA file holds, is named."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from loldu_diffusion.pipeline import load_base

    pipe = load_base(embedded)
    inject_loldu(pipe, LoLDUConfig(rank=4, init="uniform", unet_targets=("to_k",)))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in loldu_parameters(pipe):
            p.add_(0.2 * torch.randn_like(p))
    save_adapter(pipe, str(tmp_path / "k.safetensors"))
    save_file({"sks": torch.zeros(1, pipe.text_encoder.config.hidden_size)}, str(tmp_path / "k.learned_embeds.safetensors"))
    spec = [str(adapters / "b.safetensors"), str(tmp_path / "k.safetensors") + ":0.5"]
    out = tmp_path / "mixed.safetensors"
    assert loldu(["export-lora", *spec, "--base", embedded, "--format", "diffusers", "-o", str(out)]) == 0
    assert f"warning: the token embedding {tmp_path / 'k.learned_embeds.safetensors'} is not part of a LoRA file" in capsys.readouterr().err
    with safe_open(str(out), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    assert {v.shape[0] for k, v in t.items() if k.endswith("lora_A.weight")} == {4}
    down, up = next((t[k], t[k.replace("lora_A", "lora_B")]) for k in t if k.endswith("to_q.lora_A.weight"))
    assert torch.equal(down[2:], torch.zeros_like(down[2:]))  # a rank-2 layer, padded
    assert torch.allclose(down[:2].norm(dim=1), up[:, :2].norm(dim=0), rtol=1e-4)
    same_unet_as_diffusers_lora(embedded, spec, out)
    # kohya's format too: diffusers reads per-layer alphas into an alpha_pattern that matches no module, so layers at
    # another rank than the first came out scaled by r/R; every layer is written at the largest rank, alpha = R
    kohya = tmp_path / "mixed_kohya.safetensors"
    assert loldu(["export-lora", *spec, "--base", embedded, "--format", "kohya", "-o", str(kohya)]) == 0
    with safe_open(str(kohya), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    assert {float(v) for k, v in t.items() if k.endswith(".alpha")} == {4.0}
    assert {v.shape[0] for k, v in t.items() if k.endswith("lora_down.weight")} == {4}
    same_unet_as_diffusers_lora(embedded, spec, kohya)


def test_blend_command_equals_runtime_blend(embedded, adapters, tmp_path, capsys):
    from loldu_diffusion.pipeline import load_adapter_specs, load_base

    out = tmp_path / "ab.safetensors"
    assert loldu(["blend", f"{adapters}/a.safetensors:0.7", f"{adapters}/b.safetensors:0.3", "-o", str(out)]) == 0
    f = AdapterFile.read(str(out))
    assert f.rank == 4 and [b["weight"] for b in f.metadata["blend"]] == [0.7, 0.3]
    one = load_base(embedded)
    load_adapter(one, str(out))
    two = load_base(embedded)
    load_adapter_specs(two, [f"{adapters}/a.safetensors:0.7", f"{adapters}/b.safetensors:0.3"])
    assert torch.allclose(unet_out(one), unet_out(two), atol=1e-5)


def test_blend_refuses_adapters_of_different_bases(tiny_sd_path, tmp_path, capsys):
    from pipelines import make_tiny_sd

    other = make_tiny_sd(str(tmp_path / "other-base"), seed=5)  # same architecture, other weights
    trained_adapter(tiny_sd_path, tmp_path / "a.safetensors", 1)
    trained_adapter(other, tmp_path / "c.safetensors", 3)
    assert loldu(["blend", str(tmp_path / "a.safetensors"), str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "different base models" in capsys.readouterr().err


def test_blend_compares_d_and_architecture_not_only_pivots(adapters, tmp_path, capsys):
    import dataclasses

    from loldu_diffusion.adapter_file import AdapterFile

    a = AdapterFile.read(str(adapters / "a.safetensors"))
    # another base's weights can share the pivots; d (the LDU's diagonal) still tells them apart
    dataclasses.replace(a, d={c: 1.5 * v for c, v in a.d.items()}, metadata=dict(a.metadata, base_model="other-base")).save(
        str(tmp_path / "other.safetensors"))
    dataclasses.replace(a, metadata=dict(a.metadata, base_architecture="sdxl")).save(str(tmp_path / "xl.safetensors"))
    for pair in (("other", "a"), ("a", "other")):  # the later file's d was taken unchecked
        argv = ["blend", *(str(tmp_path / f"{n}.safetensors") if n != "a" else str(adapters / "a.safetensors") for n in pair),
                "-o", str(tmp_path / "x.safetensors")]
        assert loldu(argv) == 2
        assert "different base models" in capsys.readouterr().err
    assert loldu(["blend", str(adapters / "a.safetensors"), str(tmp_path / "xl.safetensors"), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "different architectures" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_fuse_writes_a_model_folder_with_the_adapter_and_its_embedding_baked_in(embedded, adapters, tmp_path):
    from loldu_diffusion.pipeline import load_adapter_specs, load_base

    out = tmp_path / "fused"
    assert loldu(["fuse", str(adapters / "a.safetensors"), "--base", embedded, "-o", str(out)]) == 0
    fused = load_base(str(out))
    ref = load_base(embedded)
    load_adapter_specs(ref, [str(adapters / "a.safetensors")])
    assert torch.allclose(unet_out(fused), unet_out(ref), atol=1e-5)
    assert not any("processor" in k for k in fused.unet.state_dict())
    assert loldu(["fuse", str(adapters / "a.safetensors"), "--base", embedded, "-o", str(out)]) == 2  # exists
    # a pivotal-tuning run's embedding, beside its adapter, goes into the fused model's own token table
    from safetensors.torch import save_file

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(adapters / "a.safetensors", run / "loldu_adapter.safetensors")
    row = torch.randn(1, ref.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.5
    save_file({"sks": row}, str(run / "learned_embeds.safetensors"))
    assert loldu(["fuse", str(run / "loldu_adapter.safetensors"), "--base", embedded, "-o", str(tmp_path / "with_row")]) == 0
    with_row = load_base(str(tmp_path / "with_row"))
    sks = with_row.tokenizer.convert_tokens_to_ids("sks</w>")
    assert torch.equal(with_row.text_encoder.get_input_embeddings().weight[sks], row[0])
    assert torch.allclose(unet_out(with_row), unet_out(ref), atol=1e-5)


def test_generate_writes_pngs_with_settings(embedded, adapters, tmp_path, capsys):
    out = tmp_path / "gen"
    argv = ["generate", "--base", embedded, "--adapter", f"{adapters}/a.safetensors:0.5", "--prompt", "a photo of sks heart",
            "--steps", "2", "--num_images", "2", "--seed", "7", "-o", str(out)]
    assert loldu(argv) == 0
    files = sorted(os.listdir(out))
    assert files == ["0000_seed7.png", "0000_seed8.png"]
    meta = json.loads(Image.open(out / files[0]).text["parameters"])
    assert meta["seed"] == 7 and meta["adapters"] == {"a": 0.5} and meta["prompt"] == "a photo of sks heart"
    stamp = os.path.getmtime(out / files[0])
    assert loldu(argv) == 0  # the same settings and seeds: nothing is overwritten, and no copies are made
    assert sorted(os.listdir(out)) == files and os.path.getmtime(out / files[0]) == stamp
    assert "2 image(s) with these settings and seeds were already there" in capsys.readouterr().out
    no_seed = [a for a in argv if a not in ("--seed", "7")]
    assert loldu(no_seed) == 0 and loldu(no_seed) == 0  # a random seed each run, printed and in the PNGs
    said = capsys.readouterr().out
    seeds = [int(line.split()[1]) for line in said.splitlines() if line.startswith("seed ")]
    assert len(seeds) == 2 and seeds[0] != seeds[1] and len(os.listdir(out)) == 6
    assert f"0000_seed{seeds[1] + 1}.png" in os.listdir(out)


def test_generate_tells_apart_adapters_of_one_file_name_and_checks_its_numbers(embedded, adapters, tmp_path, capsys):
    import shutil

    runs = []
    for k, src in enumerate(("a", "b")):  # every trainer output is loldu_adapter.safetensors
        (tmp_path / f"run{k}").mkdir()
        runs.append(str(shutil.copy(adapters / f"{src}.safetensors", tmp_path / f"run{k}" / "loldu_adapter.safetensors")))
    common = ["generate", "--base", embedded, "--prompt", "a photo of sks heart", "--steps", "2", "--num_images", "1", "--seed", "7",
              "-o", str(tmp_path / "out")]
    assert loldu(common + ["--adapter", runs[0]]) == 0 and loldu(common + ["--adapter", runs[1]]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["0000_seed7.png", "0001_seed7.png"]  # not "already there"
    hashes = [json.loads(Image.open(tmp_path / "out" / f).text["parameters"])["hashes"]["loldu_adapter"]
              for f in ("0000_seed7.png", "0001_seed7.png")]
    assert hashes[0] != hashes[1] and len(hashes[0]) == 12
    capsys.readouterr()
    for flag, value, said in (("--guidance", "inf", "--guidance inf: must be a number"), ("--seed", str(2**64), f"--seed {2**64}: must be from 0")):
        argv = [a for a in common if a not in ("--seed", "7")] + [flag, value]
        argv[argv.index("--base") + 1] = "/nonexistent-base"  # the numbers are checked before anything loads
        assert loldu(argv) == 2
        err = capsys.readouterr().err
        assert said in err and "nonexistent" not in err


def test_inspect_prints_a_strangers_text_without_terminal_escapes(adapters, tmp_path, capsys):
    import dataclasses

    from loldu_diffusion.adapter_file import AdapterFile

    a = AdapterFile.read(str(adapters / "a.safetensors"))
    evil = "sks\x1b[2J\x1b]0;owned\x07\rloldu: adapter verified OK"
    # the fields errors and cards quote (prompts, base model) must be one printable line; any other key or value is
    # printed escaped, keys too
    dataclasses.replace(a, metadata=dict(a.metadata, comment=evil, **{"k\x1b]0;t\x07": "v"})).save(str(tmp_path / "evil.safetensors"))
    assert loldu(["inspect", str(tmp_path / "evil.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out and "\\u001b[2J" in out and '"k\\u001b]0;t\\u0007": v' in out
    with pytest.raises(AdapterFileError, match="metadata 'instance_prompt' must be one line of printable text"):
        dataclasses.replace(a, metadata=dict(a.metadata, instance_prompt=evil)).save(str(tmp_path / "x.safetensors"))
    with pytest.raises(AdapterFileError, match="x.safetensors: metadata 'instance_prompt' must be a string"):
        dataclasses.replace(a, metadata=dict(a.metadata, instance_prompt=["sks"])).save(str(tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()  # refused before writing, as the reader would refuse it


def test_generate_loads_the_embedding_beside_an_adapter(embedded, tmp_path, capsys):
    import shutil

    import numpy as np

    from loldu_diffusion.assets import bundled_adapters_dir

    bundled = os.path.join(bundled_adapters_dir(), "sks-heart.safetensors")  # pivotal tuning's adapter + embedding
    alone = shutil.copy(bundled, tmp_path / "sks-heart.safetensors")  # the adapter without its embedding
    common = ["generate", "--base", embedded, "--prompt", "a photo of sks heart", "--steps", "2", "--seed", "3", "--num_images", "1"]
    assert loldu(common + ["--adapter", bundled, "-o", str(tmp_path / "beside")]) == 0
    assert "sks-heart.learned_embeds.safetensors: token embedding for sks" in capsys.readouterr().out
    emb = os.path.join(bundled_adapters_dir(), "sks-heart.learned_embeds.safetensors")
    assert loldu(common + ["--adapter", str(alone), "--embedding", emb, "-o", str(tmp_path / "given")]) == 0
    assert loldu(common + ["--adapter", str(alone), "-o", str(tmp_path / "without")]) == 0
    px = {k: np.asarray(Image.open(tmp_path / k / "0000_seed3.png")) for k in ("beside", "given", "without")}
    assert np.array_equal(px["beside"], px["given"]) and not np.array_equal(px["beside"], px["without"])
    meta = json.loads(Image.open(tmp_path / "beside" / "0000_seed3.png").text["parameters"])
    assert meta["embeddings"] == [emb]
    # a prompt's embedding is its own: in one run, a prompt without the adapter draws `sks` as the base does
    assert loldu(common + ["-o", str(tmp_path / "base")]) == 0
    assert loldu(common[:3] + ["--prompt", "a photo of sks heart", "--prompt", "a photo of sks heart", "--prompt_adapters", bundled,
                               "--prompt_adapters", "none"] + common[5:] + ["-o", str(tmp_path / "both")]) == 0
    both = {json.loads(Image.open(p).text["parameters"])["embeddings"] and "with" or "none": np.asarray(Image.open(p))
            for p in (tmp_path / "both").glob("*.png")}
    assert np.array_equal(both["with"], px["beside"])
    assert np.array_equal(both["none"], np.asarray(Image.open(tmp_path / "base" / "0000_seed3.png")))


def test_generate_per_prompt_adapters_in_one_batch_equal_each_alone(embedded, adapters, tmp_path):
    import numpy as np

    a, b = f"{adapters}/a.safetensors", f"{adapters}/b.safetensors"
    common = ["--base", embedded, "--steps", "2", "--num_images", "1", "--seed", "3"]
    together = ["generate", *common, "--adapter", f"{b}:0.5", "--prompt", "a photo of sks heart", "--prompt_adapters", f"{a}:0.8",
                "--prompt", "a red star", "--prompt_adapters", "none", "-o", str(tmp_path / "both")]
    assert loldu(together) == 0
    files = sorted(os.listdir(tmp_path / "both"))
    metas = [json.loads(Image.open(tmp_path / "both" / f).text["parameters"]) for f in files]
    assert sorted((m["prompt"], tuple(sorted(m["adapters"].items()))) for m in metas) == [
        ("a photo of sks heart", (("a", 0.8), ("b", 0.5))), ("a red star", (("b", 0.5),))]
    alone = ["generate", *common, "--adapter", f"{a}:0.8", "--adapter", f"{b}:0.5", "--prompt", "a photo of sks heart", "-o", str(tmp_path / "one")]
    assert loldu(alone) == 0
    first = next(f for f, m in zip(files, metas) if m["prompt"] == "a photo of sks heart")
    batched = np.asarray(Image.open(tmp_path / "both" / first), dtype=int)
    single = np.asarray(Image.open(tmp_path / "one" / os.listdir(tmp_path / "one")[0]), dtype=int)
    assert np.abs(batched - single).max() <= 1  # the same image, up to 8-bit rounding


def test_command_errors(embedded, tiny_sd_path, adapters, tmp_path, capsys):
    assert loldu(["export-lora", str(tmp_path / "nope.safetensors"), "--base", embedded, "-o", str(tmp_path / "x")]) == 2
    assert "no such adapter file" in capsys.readouterr().err
    assert loldu(["fuse", str(adapters / "a.safetensors"), "--base", str(tmp_path), "-o", str(tmp_path / "y")]) == 2
    assert "not a diffusers model folder" in capsys.readouterr().err
    assert loldu(["generate", "--base", tiny_sd_path, "--adapter", str(adapters / "a.safetensors"), "--prompt", "x", "-o", str(tmp_path / "g")]) == 2
    assert "different architecture" in capsys.readouterr().err  # an embedded-base adapter on another model
    from pipelines import make_tiny_sd

    trained_adapter(tiny_sd_path, tmp_path / "t.safetensors", 1)
    other = make_tiny_sd(str(tmp_path / "other"), seed=9)
    assert loldu(["generate", "--base", other, "--adapter", str(tmp_path / "t.safetensors"), "--prompt", "x", "-o", str(tmp_path / "g")]) == 2
    assert "does not match this base model" in capsys.readouterr().err


def test_eval_metrics_with_tiny_clip_and_dino(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel

    from loldu_diffusion.toy.models import build_tokenizer

    torch.manual_seed(0)
    clip_dir, dino_dir = tmp_path / "clip", tmp_path / "dino"
    tok = build_tokenizer(str(clip_dir))
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=24, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **small),
                     vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    CLIPModel(cfg).save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)
    ViTModel(ViTConfig(image_size=32, patch_size=8, **small)).save_pretrained(dino_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dino_dir)
    same, ref = tmp_path / "gen", tmp_path / "ref"
    same.mkdir(), ref.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(same / "a.png")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(ref / "a.png")
    out = loldu(["eval", "--images", str(same), "--reference", str(ref), "--prompt", "a red circle", "--clip", str(clip_dir),
                 "--dino", str(dino_dir), "--json"])
    assert out == 0
    from loldu_diffusion.metrics import dreambooth_metrics

    r = dreambooth_metrics(str(same), str(ref), "a red circle", str(clip_dir), str(dino_dir))
    assert r["clip_i"] == pytest.approx(1.0, abs=1e-5) and r["dino"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= r["clip_t"] <= 1.0
    Image.new("RGB", (64, 64), (20, 30, 230)).save(ref / "b.png")
    r2 = dreambooth_metrics(str(same), str(ref), "a red circle", str(clip_dir), str(dino_dir))
    assert r2["clip_i"] < 1.0 - 1e-4
    assert loldu(["eval", "--images", str(same), "--reference", str(ref), "--prompt", "x", "--clip", str(tmp_path)]) == 2


def test_mistakes_are_one_line_errors_before_anything_loads(adapters, tmp_path, capsys, monkeypatch):
    from loldu_diffusion import pipeline

    def no_loading(*a, **kw):
        raise AssertionError("the base was loaded before the arguments were checked")

    monkeypatch.setattr(pipeline, "load_base", no_loading)
    a = str(adapters / "a.safetensors")
    gen = ["generate", "--prompt", "x", "-o", str(tmp_path / "g")]
    cases = [
        (gen + ["--steps", "0"], "loldu generate: error: --steps 0: must be at least 1"),
        (gen + ["--num_images", "0"], "--num_images 0: must be at least 1"),
        (gen + ["--size", "30"], "--size 30: must be a positive multiple of 8"),
        (gen + ["--batch_size", "0"], "--batch_size 0: must be at least 1"),
        (gen + ["--prompt", "y", "--prompt_adapters", a], "2 --prompt but 1 --prompt_adapters: give one --prompt_adapters per --prompt"),
        (gen + ["--prompt_adapters", f"{a}:abc"], f"{a}:abc: 'abc' is not a weight"),
        (gen + ["--adapter", f"{a}:abc"], f"{a}:abc: 'abc' is not a weight; write FILE:WEIGHT with a number, e.g. {a}:0.7"),
        (gen + ["--adapter", f"{a}=0.7"], f"{a}=0.7: write the weight after a colon: {a}:0.7"),
        (["blend", f"{a}:abc", "-o", str(tmp_path / "c.safetensors")], "'abc' is not a weight"),
        (["blend", a, "-o", str(tmp_path / "missing" / "dir" / "c.safetensors")], f"the folder {tmp_path / 'missing' / 'dir'} does not exist"),
        (gen[:-1] + [str(tmp_path / "missing" / "g")], f"the folder {tmp_path / 'missing'} does not exist"),
        (["export-lora", a, "-o", a], f"-o {a} already exists: choose another name, or add --overwrite to replace it"),
        (["fuse", a, "-o", str(adapters)], "already exists: choose another name, or add --overwrite"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((gen + ["--device", "cuda"], "--device cuda: " + ("this PyTorch is a CPU-only build" if torch.version.cuda is None
                                                                     else "no CUDA GPU is visible")))
    cases.append((gen + ["--device", "gpu"], "--device gpu: not a device name"))
    for argv, message in cases:
        assert loldu(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "=True" not in err, (argv, err)
    assert not (tmp_path / "missing").exists()


def test_help_describes_every_option_with_its_default(capsys):
    from loldu_diffusion.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        if name == "bench":
            continue  # its own parser, in loldu_diffusion.bench
        for action in sub._actions:
            assert action.help, (name, action.dest)
    with pytest.raises(SystemExit):
        loldu(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "sampling steps (default: 20)" in text and "(default: 4.0)" in text and "default: a random seed" in text
    with pytest.raises(SystemExit) as e:  # bench's own parser answers (loldu's took --help as an unknown argument)
        loldu(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "usage: loldu bench" in text and "(default: bench_results)" in text
    with pytest.raises(SystemExit) as e:
        loldu(["bench", "learning", "--plan", "no_such_plan.json"])
    assert e.value.code == 2 and "--plan no_such_plan.json: no such file" in capsys.readouterr().err
    for argv, said in ((["learning", "--plan", "p.json", "--merge", "a.json"], "--plan runs a plan and --merge merges finished results: give one"),
                       (["cost", "--merge", "a.json"], "--merge is for the learning suite"),
                       (["learning", "--merge", __file__, "no_such_result.json"], "--merge no_such_result.json: no such file")):
        with pytest.raises(SystemExit) as e:
            loldu(["bench", *argv])
        assert e.value.code == 2 and said in capsys.readouterr().err, argv
