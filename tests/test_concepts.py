"""--concepts_list: K subjects in one run equal K separate runs (issue 16, item 3)."""
import json
import os
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from loldu_diffusion.training import parse_args, train
from loldu_diffusion.training.args import resolve_defaults

ADAPTER = "loldu_adapter.safetensors"


def _images(folder, colours):
    os.makedirs(folder, exist_ok=True)
    for i, c in enumerate(colours):
        img = Image.new("RGB", (64, 64), c)
        for x in range(16 + 8 * i, 40 + 8 * i):
            for y in range(20, 44):
                img.putpixel((x, y), (255 - c[0], 255 - c[1], 255 - c[2]))
        img.save(os.path.join(folder, f"{i}.png"))
    return folder


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    entries = [
        {"name": "dog", "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog",
         "instance_data_dir": _images(str(root / "dog"), [(200, 40, 40), (180, 60, 30), (220, 20, 60)])},
        {"name": "cat", "instance_prompt": "a photo of zwx cat", "class_prompt": "a photo of a cat",
         "instance_data_dir": _images(str(root / "cat"), [(30, 40, 200), (20, 90, 180)])},
        {"name": "toy", "instance_prompt": "a photo of qlt toy", "class_prompt": "a photo of a toy",
         "instance_data_dir": _images(str(root / "toy"), [(30, 200, 40), (90, 180, 20), (60, 160, 60), (10, 250, 90)])},
    ]
    path = root / "concepts.json"
    path.write_text(json.dumps(entries))
    return str(path), entries


def _common(model, out, extra):
    # a tiny max_grad_norm so that clipping acts: it must act per subject; init "normal" draws
    # from the RNG: each subject must draw what its own run draws
    return ["--pretrained_model_name_or_path", model, "--output_dir", str(out), "--max_train_steps", "3", "--train_batch_size", "2",
            "--learning_rate", "1e-2", "--max_grad_norm", "1e-3", "--init", "normal", "--rank", "4", "--report_to", "none",
            "--seed", "7", "--num_class_images", "2", "--num_inference_steps", "2"] + extra


@pytest.mark.parametrize("extra", [[], ["--train_text_encoder", "--with_prior_preservation"]], ids=["unet", "text-encoder-prior"])
def test_concepts_equal_separate_runs(tiny_sd_path, subjects, tmp_path, extra):
    path, entries = subjects
    together = train(parse_args(_common(tiny_sd_path, tmp_path / "all", ["--concepts_list", path] + extra)))
    assert together["outputs"][: len(entries)] == [os.path.join(e["name"], ADAPTER) for e in entries]
    for e in entries:
        alone_dir = tmp_path / f"alone-{e['name']}"
        cls = ["--class_prompt", e["class_prompt"], "--class_data_dir", str(tmp_path / "all" / e["name"] / "class_images")] if extra else []
        train(parse_args(_common(tiny_sd_path, alone_dir, ["--instance_data_dir", e["instance_data_dir"],
                                                          "--instance_prompt", e["instance_prompt"]] + cls + extra)))
        a, b = load_file(str(tmp_path / "all" / e["name"] / ADAPTER)), load_file(str(alone_dir / ADAPTER))
        assert sorted(a) == sorted(b)
        for k in a:
            if k.endswith(".delta"):
                assert a[k].abs().max() > 1e-4, f"{e['name']} {k}: did not train"
                torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{e['name']} {k}: {m}")
            else:
                assert torch.equal(a[k], b[k])


def test_concepts_list_errors(subjects, tmp_path):
    path, entries = subjects

    def error(argv):
        with pytest.raises(ValueError) as e:
            resolve_defaults(parse_args(argv))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "leave --instance_data_dir out" in error(["--concepts_list", path, "--instance_data_dir", "x"])
    assert "--method lora trains shared weights" in error(["--concepts_list", path, "--method", "lora"])
    # pivotal tuning and its phase: one line each naming what is unsupported (the phase's said "add --train_text_encoder_ti")
    assert "--concepts_list with --train_text_encoder_ti is not supported yet" in error(["--concepts_list", path, "--train_text_encoder_ti"])
    assert "--concepts_list with --ti_only_steps (pivotal tuning's phase) is not supported yet" in error(
        ["--concepts_list", path, "--ti_only_steps", "5"])
    assert "no such file" in error(["--concepts_list", str(tmp_path / "nope.json")])
    bad = tmp_path / "bad.json"
    for content, words in [("{", "not JSON"), ("[]", "non-empty JSON list"),
                           (json.dumps([{"instance_prompt": "a"}]), "entry 0: instance_data_dir is missing"),
                           (json.dumps([entries[0], entries[0]]), "entry 1: the name 'dog' is already used"),
                           (json.dumps([entries[0] | {"prompt": 1}]), "unknown key(s) ['prompt']")]:
        bad.write_text(content)
        assert words in error(["--concepts_list", str(bad)])
    # names are folders of --output_dir: no paths out of it, no case-only twins, none of the run's own folders
    for name, words in [("/tmp/x", "must be 1–64 letters, digits"), ("a/b", "must be 1–64 letters, digits"), ("..", "without dots"),
                        ("checkpoint-100", "is a name the run uses itself"), ("logs", "is a name the run uses itself")]:
        bad.write_text(json.dumps([entries[0] | {"name": name}]))
        assert words in error(["--concepts_list", str(bad)])
    bad.write_text(json.dumps([entries[0], entries[1] | {"name": "DOG"}]))
    assert "entry 1: the name 'DOG' is already used by another subject (names are compared without case" in error(["--concepts_list", str(bad)])
    from loldu_diffusion.training.concepts import read_concepts_list

    root = os.path.dirname(entries[0]["instance_data_dir"])
    os.makedirs(os.path.join(root, "Dog"), exist_ok=True)  # default names from folders 'dog' and 'Dog': apart as folders compare
    bad.write_text(json.dumps([{k: v for k, v in e.items() if k != "name"} | {"instance_data_dir": os.path.join(root, d)}
                               for e, d in ((entries[0], "dog"), (entries[0], "Dog"))]))
    assert [c.name for c in read_concepts_list(str(bad), str(tmp_path / "out"), False)] == ["dog", "Dog_2"]
    # a relative folder: from the list's folder, else (ShivamShrirao's fork) from the current one
    listed = tmp_path / "lists" / "c.json"
    listed.parent.mkdir()
    listed.write_text(json.dumps([entries[0] | {"instance_data_dir": "dog"}]))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert read_concepts_list(str(listed), "out", False)[0].instance_data_dir == os.path.join(root, "dog")
    finally:
        os.chdir(cwd)
    bad.write_text(json.dumps([{k: v for k, v in entries[0].items() if k != "class_prompt"}]))
    assert "class_prompt is missing" in error(["--concepts_list", str(bad), "--with_prior_preservation"])
    # a subject without photos is named, before any model loads
    from loldu_diffusion.training import TrainingError
    from loldu_diffusion.training.args import check_inputs

    (tmp_path / "empty").mkdir()
    bad.write_text(json.dumps([entries[0] | {"instance_data_dir": str(tmp_path / "empty")}]))
    with pytest.raises(TrainingError, match=rf"--concepts_list {re.escape(str(bad))}: subject 'dog': instance_data_dir .*empty.*: no image"):
        check_inputs(resolve_defaults(parse_args(["--concepts_list", str(bad), "--pretrained_model_name_or_path", "/nowhere"])))


def test_killed_concepts_run_resumes_and_writes_each_subject(tiny_sd_path, subjects, tmp_path):
    """A --concepts_list run killed after its checkpoint resumes to the same K adapters; each
    subject's folder holds its adapter, its kohya export (that subject alone) and its card; an
    existing subject output is not replaced silently."""
    from loldu_diffusion.training.errors import TrainingError

    path, entries = subjects
    extra = ["--concepts_list", path, "--checkpointing_steps", "2", "--output_kohya_format"]
    train(parse_args(_common(tiny_sd_path, tmp_path / "straight", extra)))
    train(parse_args(_common(tiny_sd_path, tmp_path / "killed", extra + ["--max_train_steps", "2"])))  # as if killed after step 2
    for e in entries:
        os.remove(tmp_path / "killed" / e["name"] / ADAPTER)
    with pytest.raises(TrainingError, match="already holds"):
        train(parse_args(_common(tiny_sd_path, tmp_path / "straight", extra)))
    train(parse_args(_common(tiny_sd_path, tmp_path / "killed", extra + ["--resume_from_checkpoint", "checkpoint-2", "--overwrite"])))
    for e in entries:
        a = load_file(str(tmp_path / "straight" / e["name"] / ADAPTER))
        b = load_file(str(tmp_path / "killed" / e["name"] / ADAPTER))
        torch.testing.assert_close(a["unet.delta"], b["unet.delta"], atol=1e-6, rtol=0)
        kohya = load_file(str(tmp_path / "straight" / e["name"] / "pytorch_lora_weights_kohya.safetensors"))
        assert any(k.startswith("lora_unet_") for k in kohya)
        assert (tmp_path / "straight" / e["name"] / "README.md").read_text().count(e["instance_prompt"]) >= 2
    # the subjects' kohya files differ: each holds its own subject, not the blend of all
    k0, k1 = (load_file(str(tmp_path / "straight" / e["name"] / "pytorch_lora_weights_kohya.safetensors")) for e in entries[:2])
    assert any(not torch.equal(k0[k], k1[k]) for k in k0 if k.endswith("lora_up.weight"))


def test_a_second_trainable_adapter_leaves_the_first_trainable(tiny_sd_path):
    from diffusers import UNet2DConditionModel

    from loldu_diffusion import LoLDUConfig, inject_loldu

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    inject_loldu(unet, LoLDUConfig(rank=2), adapter_name="a")
    inject_loldu(unet, LoLDUConfig(rank=2), adapter_name="b")
    trained = {n.split(".adapters.")[1].split(".")[0] for n, p in unet.named_parameters() if p.requires_grad}
    assert trained == {"a", "b"}
    assert not any(p.requires_grad for n, p in unet.named_parameters() if ".adapters." not in n)


def test_each_subject_logs_its_own_loss_and_they_add_up_to_the_run_s(tiny_sd_path, subjects, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, entries = subjects
    argv = _common(tiny_sd_path, tmp_path / "tb", ["--concepts_list", path, "--max_train_steps", "2"])
    train(parse_args([a if a != "none" else "tensorboard" for a in argv]))
    events = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "tb" / "logs") for f in files if "tfevents" in f]
    acc = EventAccumulator(events[0]).Reload()
    tags = acc.Tags()["scalars"]
    assert {f"loss/{e['name']}" for e in entries} <= set(tags)
    for step in (1, 2):
        total = next(e.value for e in acc.Scalars("loss") if e.step == step)
        parts = [next(e.value for e in acc.Scalars(f"loss/{x['name']}") if e.step == step) for x in entries]
        assert abs(sum(parts) - total) < 1e-4 * max(1.0, abs(total)) and all(p > 0 for p in parts)
