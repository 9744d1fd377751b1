"""The flags of diffusers' DreamBooth scripts that are not LoLDU's own: each honoured, or
accepted with one line saying why it changes nothing here (tests/peer runs diffusers' own tests)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from loldu_diffusion.training import TrainingError, parse_args, train
from loldu_diffusion.training.args import LR_SCHEDULERS, resolve_defaults


def base_args(tiny_sd_path, concept_dir, out, *extra):
    return ["--pretrained_model_name_or_path", tiny_sd_path, "--instance_data_dir", concept_dir, "--instance_prompt",
            "a photo of sks heart", "--num_inference_steps", "1", "--report_to", "none", "--output_dir", str(out), *extra]


def test_every_scheduler_name_of_diffusers_is_accepted():
    from diffusers.optimization import SchedulerType

    assert set(LR_SCHEDULERS) == {e.value for e in SchedulerType}
    assert resolve_defaults(parse_args(["--lr_scheduler", "piecewise_constant", "--optimizer", "AdamW"])).optimizer == "adamw"


def test_a_real_base_validates_only_when_asked_and_notes_say_what_changes_nothing(tiny_sd_path, concept_dir, tmp_path, capsys):
    out = tmp_path / "quiet"
    train(parse_args(base_args(tiny_sd_path, concept_dir, out, "--max_train_steps", "1", "--enable_xformers_memory_efficient_attention",
                               "--pre_compute_text_embeddings", "--validation_images", "a.png")))
    said = capsys.readouterr().out
    assert not any(n.startswith("validation") for n in os.listdir(out))  # no --validation_prompt: no images, as diffusers
    assert "note: --enable_xformers_memory_efficient_attention changes nothing here: PyTorch's scaled_dot_product_attention" in said
    assert "note: --pre_compute_text_embeddings changes nothing here" in said and "note: --validation_images" in said


def test_refused_combinations_are_one_line(tiny_sd_path, concept_dir, tmp_path):
    cases = [(["--do_edm_style_training"], "EDM-style training"), (["--use_dora"], "--use_dora is a LoRA variant"),
             (["--method", "ti", "--output_kohya_format"], "--method ti writes no LoRA"),
             (["--push_to_hub"], "--push_to_hub: HF_HUB_OFFLINE is set"),
             (["--dataset_name", "x/y"], "give --dataset_name or --instance_data_dir, not both")]
    for extra, match in cases:
        with pytest.raises(TrainingError, match=match) as e:
            train(parse_args(base_args(tiny_sd_path, concept_dir, tmp_path / "o", *extra)))
        assert "\n" not in str(e.value)


def test_text_encoder_lr_makes_its_own_group():
    from loldu_diffusion.training.methods import param_groups

    te, unet = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    params = list(unet.parameters()) + list(te.parameters())
    args = parse_args(["--text_encoder_lr", "1e-5", "--adam_weight_decay_text_encoder", "0.5"])
    groups = param_groups(args, params, [te])
    assert [len(g["params"]) for g in groups] == [2, 2] and groups[1]["lr"] == 1e-5 and groups[1]["weight_decay"] == 0.5
    assert param_groups(parse_args([]), params, [te]) is params  # not asked: one group, as before
    embedding = torch.nn.Parameter(torch.zeros(4))  # pivotal tuning's token embedding trains with the text encoder
    groups = param_groups(args, params + [embedding], [te], [embedding])
    assert [len(g["params"]) for g in groups] == [2, 3] and groups[1]["params"][-1] is embedding


def test_a_local_dataset_with_captions_and_repeats_trains(tiny_sd_path, tmp_path):
    from PIL import Image

    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    with open(data / "metadata.jsonl", "w") as f:
        for i in range(2):
            Image.new("RGB", (32, 32), (200, 40 * i, 0)).save(data / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "caption": f"a photo of sks square {i}"}) + "\n")
    from loldu_diffusion.training.data import ImageSet

    images = ImageSet.from_dataset(str(tmp_path / "data"), None, "image", "caption", "unused", 16).repeated(3)
    assert len(images) == 6 and images.captions[:2] == ["a photo of sks square 0", "a photo of sks square 1"]
    out = tmp_path / "out"
    summary = train(parse_args(["--pretrained_model_name_or_path", tiny_sd_path, "--dataset_name", str(tmp_path / "data"),
                                "--caption_column", "caption", "--instance_prompt", "a photo of sks square", "--repeats", "3",
                                "--num_train_epochs", "1", "--train_batch_size", "2", "--report_to", "none", "--output_dir", str(out)]))
    assert summary["steps"] == 3  # 2 images × 3 repeats / batch 2
    with pytest.raises(TrainingError, match=r"--caption_column 'text': the dataset .* has no such column \(it has image, caption\)"):
        train(parse_args(["--pretrained_model_name_or_path", tiny_sd_path, "--dataset_name", str(tmp_path / "data"), "--caption_column", "text",
                          "--instance_prompt", "a photo", "--report_to", "none", "--output_dir", str(tmp_path / "o2")]))


def test_prodigy_trains_and_kohya_format_is_written_beside(tiny_sd_path, concept_dir, tmp_path, capsys):
    """Prodigy with pivotal tuning, a text encoder lr and the inversion phase: it raised on the groups' two lrs at its
    first step; now the text encoder's lr is dropped with a warning (as diffusers' scripts), and the phase warned about."""
    pytest.importorskip("prodigyopt")
    out = tmp_path / "prodigy"
    summary = train(parse_args(base_args(tiny_sd_path, concept_dir, out, "--max_train_steps", "2", "--optimizer", "prodigy",
                                         "--learning_rate", "1.0", "--output_kohya_format", "--train_text_encoder_ti",
                                         "--text_encoder_lr", "0.5", "--ti_only_steps", "1")))
    said = capsys.readouterr().out
    assert "warning: --optimizer prodigy estimates one step size for all parameters: --text_encoder_lr 0.5 is ignored" in said
    assert "warning: --optimizer prodigy with the inversion phase (--ti_only_steps 1)" in said
    assert "pytorch_lora_weights_kohya.safetensors" in summary["outputs"]
    # the kohya LoRA cannot hold the trained embedding, which the subject needs: said, with where it is
    assert ("note: --output_kohya_format: the token embedding learned_embeds.safetensors is not part of a LoRA file: its subject "
            "needs it too (in A1111, put that file in embeddings/") in said
    keys = load_file(str(out / "pytorch_lora_weights_kohya.safetensors"))
    assert keys and all(k.startswith("lora_unet_") for k in keys)


def test_full_fine_tuning_writes_a_loadable_pipeline_and_trains_the_text_encoder_when_asked(tiny_sd_path, concept_dir, tmp_path):
    from diffusers import DiffusionPipeline
    from transformers import CLIPTextModel

    out = tmp_path / "full"
    train(parse_args(base_args(tiny_sd_path, concept_dir, out, "--method", "full", "--max_train_steps", "2", "--train_text_encoder",
                               "--learning_rate", "1e-3", "--checkpointing_steps", "2")))
    pipe = DiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    base = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder")
    moved = max((a - b).abs().max().item() for a, b in zip(pipe.text_encoder.parameters(), base.parameters()))
    assert moved > 0  # the text encoder trained (it was ignored before)
    assert os.path.isfile(out / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors")
    assert os.path.isfile(out / "checkpoint-2" / "text_encoder" / "model.safetensors")
