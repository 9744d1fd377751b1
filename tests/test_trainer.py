"""The DreamBooth trainer on tiny SD/SDXL folders: resume, refusals, methods, processes."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from loldu_diffusion import AdapterFile
from loldu_diffusion.training import TrainingError, parse_args, train
from loldu_diffusion.training.methods import ADAPTER_FILE, LORA_FILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def common(base, concept, out):
    return ["--pretrained_model_name_or_path", base, "--instance_data_dir", concept, "--instance_prompt",
            "a photo of sks heart", "--validation_prompt", "a photo of sks heart", "--num_validation_images", "1", "--num_inference_steps", "2",
            "--report_to", "none", "--output_dir", str(out)]


def run(argv):
    return train(parse_args(argv))


class SimulatedKill(BaseException):
    pass


def test_killed_run_resumes_to_the_same_adapter(tiny_sd_path, concept_dir, tmp_path, monkeypatch):
    from accelerate import Accelerator

    extra = ["--max_train_steps", "6", "--checkpointing_steps", "2", "--init", "uniform", "--lr_scheduler", "cosine",
             "--lr_warmup_steps", "2", "--learning_rate", "1e-2", "--random_flip", "--snr_gamma", "5",
             "--noise_offset", "0.05", "--gradient_accumulation_steps", "2", "--train_batch_size", "2"]
    run(common(tiny_sd_path, concept_dir, tmp_path / "straight") + extra)

    real_log = Accelerator.log

    def log_then_die(self, values, step=None, **kw):
        real_log(self, values, step=step, **kw)
        if step == 5:
            raise SimulatedKill()

    monkeypatch.setattr(Accelerator, "log", log_then_die)
    with pytest.raises(SimulatedKill):
        run(common(tiny_sd_path, concept_dir, tmp_path / "killed") + extra)
    monkeypatch.setattr(Accelerator, "log", real_log)
    killed = tmp_path / "killed"
    assert sorted(p for p in os.listdir(killed) if p.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    assert not (killed / ADAPTER_FILE).exists()
    (killed / "checkpoint-6.tmp").mkdir()  # a save that was killed half-way is never 'latest'
    summary = run(common(tiny_sd_path, concept_dir, killed) + extra + ["--resume_from_checkpoint", "latest"])
    assert summary["steps"] == 6
    a = AdapterFile.read(str(tmp_path / "straight" / ADAPTER_FILE)).delta["unet"]
    b = AdapterFile.read(str(killed / ADAPTER_FILE)).delta["unet"]
    assert a.abs().max() > 0 and torch.allclose(a, b, atol=1e-6, rtol=0)
    # and the outputs a person looks at are there
    for name in ("README.md", "loss.png", "validation_after.png", "train_summary.json"):
        assert (tmp_path / "straight" / name).exists(), name
    card = (tmp_path / "straight" / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "load_adapter" in card


def test_existing_adapter_is_not_overwritten(tiny_sd_path, concept_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ADAPTER_FILE).write_bytes(b"precious")
    with pytest.raises(TrainingError, match=r"already holds loldu_adapter.safetensors; pass --overwrite"):
        run(common(tiny_sd_path, concept_dir, out) + ["--max_train_steps", "1"])
    assert (out / ADAPTER_FILE).read_bytes() == b"precious"
    run(common(tiny_sd_path, concept_dir, out) + ["--max_train_steps", "1", "--overwrite"])
    assert AdapterFile.read(str(out / ADAPTER_FILE)).rank == 32


def test_bad_inputs_are_one_line_errors(tiny_sd_path, concept_dir, tmp_path, capsys):
    def fails(argv, match):
        with pytest.raises(TrainingError, match=match) as e:
            run(argv + ["--max_train_steps", "1"])
        assert "\n" not in str(e.value)

    fails(common(tiny_sd_path, str(tmp_path / "missing"), tmp_path / "o1"), "--instance_data_dir .*missing.*: no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(common(tiny_sd_path, str(empty), tmp_path / "o2"), "--instance_data_dir .*: no image")
    fails(common(str(tmp_path), concept_dir, tmp_path / "o3"), "not a diffusers model folder")
    badly_captioned = tmp_path / "badcap"
    shutil.copytree(concept_dir, badly_captioned)
    first = sorted(p for p in os.listdir(badly_captioned) if p.endswith(".png"))[0]
    (badly_captioned / first.replace(".png", ".txt")).write_bytes(b"a photo of sks \xff heart")
    fails(common(tiny_sd_path, str(badly_captioned), tmp_path / "o7"), "caption .*: not UTF-8 text")
    # found before the output folder is made (and before any model loads)
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o7"))
    fails(common(tiny_sd_path, concept_dir, tmp_path / "o4") + ["--with_prior_preservation"], "needs --class_prompt")
    fails(common(tiny_sd_path, concept_dir, tmp_path / "o4") + ["--class_prompts_from_captions"], "add --with_prior_preservation")
    fails(common(tiny_sd_path, concept_dir, tmp_path / "o4") + ["--class_prompts_from_captions", "--no_prior_preservation"],
          "it needs prior preservation")
    fails(common(tiny_sd_path, concept_dir, tmp_path / "o5") + ["--resume_from_checkpoint", "checkpoint-9"], "no checkpoint there")
    # some bad files among good ones: skipped by name, training goes on; a prompt without identifier warns
    mixed = tmp_path / "mixed"
    shutil.copytree(concept_dir, mixed)
    (mixed / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.new("RGBA", (30, 50), (200, 0, 0, 128)).save(mixed / "rgba.png")
    argv = common(tiny_sd_path, str(mixed), tmp_path / "o6") + ["--max_train_steps", "1", "--instance_prompt", "a photo of my heart"]
    run(argv)
    out = capsys.readouterr().out
    assert "skipped 1 unreadable file(s): zz_corrupt.png" in out and "no rare identifier" in out


def test_prior_preservation_generates_missing_class_images_once(tiny_sd_path, concept_dir, tmp_path):
    argv = common(tiny_sd_path, concept_dir, tmp_path / "pp") + [
        "--with_prior_preservation", "--class_prompt", "a photo of a heart", "--num_class_images", "2", "--max_train_steps", "2"]
    run(argv)
    class_dir = tmp_path / "pp" / "class_images"
    assert sorted(os.listdir(class_dir)) == ["class_00000.png", "class_00001.png"]
    stamp = os.path.getmtime(class_dir / "class_00000.png")
    run(argv + ["--overwrite"])
    assert sorted(os.listdir(class_dir)) == ["class_00000.png", "class_00001.png"]
    assert os.path.getmtime(class_dir / "class_00000.png") == stamp


def test_class_images_are_drawn_and_captioned_in_the_instance_captions_contexts(tiny_sd_path, concept_dir, tmp_path, capsys):
    """The bundled subject's captions name white, gray, beige, white, gray backgrounds: the class
    images cycle through the three contexts, each once, with the class prompt in place of sks's."""
    prior = ["--with_prior_preservation", "--class_prompt", "a photo of a heart", "--num_class_images", "4", "--max_train_steps", "1",
             "--class_num_inference_steps", "1"]
    run(common(tiny_sd_path, concept_dir, tmp_path / "ctx") + prior + ["--class_prompts_from_captions"])
    class_dir = tmp_path / "ctx" / "class_images"
    captions = [(class_dir / f"class_{k:05d}.txt").read_text() for k in range(4)]
    assert captions == [f"a photo of a heart on a {c} background\n" for c in ("white", "gray", "beige", "white")]
    run(common(tiny_sd_path, concept_dir, tmp_path / "plain") + prior)
    assert sorted(os.listdir(tmp_path / "plain" / "class_images")) == [f"class_{k:05d}.png" for k in range(4)]  # no captions
    # those class images, reused with the flag: kept (never redrawn silently), and the run says so
    stamps = {n: os.path.getmtime(tmp_path / "plain" / "class_images" / n) for n in os.listdir(tmp_path / "plain" / "class_images")}
    capsys.readouterr()
    run(common(tiny_sd_path, concept_dir, tmp_path / "plain") + prior + ["--class_prompts_from_captions", "--overwrite"])
    assert "4 class images have no caption" in capsys.readouterr().out
    assert {n: os.path.getmtime(tmp_path / "plain" / "class_images" / n) for n in os.listdir(tmp_path / "plain" / "class_images")} == stamps
    # captions that keep only the identifier give their contexts too; one naming neither is said
    import shutil

    own = tmp_path / "own"
    shutil.copytree(concept_dir, own)
    (own / "00.txt").write_text("sks heart on a white background")
    (own / "01.txt").write_text("a heart on a gray background")
    capsys.readouterr()
    run(common(tiny_sd_path, str(own), tmp_path / "own_out") + prior + ["--class_prompts_from_captions"])
    assert ("warning: --class_prompts_from_captions: 1 of 5 captions name neither the instance prompt 'a photo of sks heart' nor "
            "its identifier (e.g. 'a heart on a gray background')") in capsys.readouterr().out
    captions = [(tmp_path / "own_out" / "class_images" / f"class_{k:05d}.txt").read_text() for k in range(4)]
    assert captions == [f"{c}\n" for c in ("heart on a white background", "a photo of a heart", "a photo of a heart on a beige background",
                                           "a photo of a heart on a white background")]


@pytest.mark.parametrize("method", ["lora", "olora"])
def test_lora_outputs_load_in_diffusers_and_change_the_model(tiny_sd_path, concept_dir, tmp_path, method):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / method
    summary = run(common(tiny_sd_path, concept_dir, out) + ["--method", method, "--max_train_steps", "3", "--learning_rate", "1e-2"])
    assert summary["outputs"] == [LORA_FILE]
    state = load_file(str(out / LORA_FILE))
    ranks = {v.shape[0] for k, v in state.items() if "lora_A" in k or "lora.down" in k}
    assert ranks == ({8} if method == "olora" else {4})  # OLoRA exported on the pristine base: rank doubles
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 7, 32)
    with torch.no_grad():
        base = pipe.unet(x, t, c).sample
        pipe.load_lora_weights(str(out))
        adapted = pipe.unet(x, t, c).sample
    assert (adapted - base).abs().max() > 1e-4


def test_olora_export_is_exact_on_the_pristine_base(tiny_sd_path, tmp_path):
    """OLoRA moves s·B₀A₀ out of the base weights; the exported LoRA must reproduce the trained
    model on the *unmodified* base."""
    import types

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from loldu_diffusion.training.args import resolve_defaults
    from loldu_diffusion.training.methods import LoRAMethod

    args = resolve_defaults(parse_args(["--method", "olora", "--rank", "4"]))  # settled, as train() settles them
    args.alpha, args.train_text_encoder = 8.0, False
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    method = LoRAMethod(args)
    params = method.setup(types.SimpleNamespace(unet=unet))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))  # "training"
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 7, 32)
    with torch.no_grad():
        trained = unet(x, t, c).sample
    method.save(types.SimpleNamespace(unet=unet, text_encoder=None), str(tmp_path), {})
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        assert torch.allclose(pipe.unet(x, t, c).sample, trained, atol=1e-4, rtol=1e-4)


def test_full_finetuning_with_fira_writes_a_loadable_unet_and_resumes(tiny_sd_path, concept_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    out, resumed = tmp_path / "full", tmp_path / "resumed"
    flags = ["--method", "full", "--optimizer", "fira", "--fira_rank", "4", "--max_train_steps", "4", "--learning_rate", "1e-3",
             "--checkpointing_steps", "2", "--num_validation_images", "0", "--judge_images", "0"]
    run(common(tiny_sd_path, concept_dir, out) + flags)
    tuned = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    diffs = [(a - b).abs().max().item() for a, b in zip(tuned.state_dict().values(), base.state_dict().values())]
    assert max(diffs) > 0
    # a run killed after step 2 resumes to the same UNet (weights, AdamW/Fira state and schedule from checkpoint-2)
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    run(common(tiny_sd_path, concept_dir, resumed) + flags + ["--resume_from_checkpoint", "latest"])
    again = UNet2DConditionModel.from_pretrained(str(resumed), subfolder="unet")
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(tuned.state_dict().values(), again.state_dict().values()))


def test_sdxl_with_both_text_encoders(tiny_sdxl_path, concept_dir, tmp_path):
    out = tmp_path / "xl"
    run(common(tiny_sdxl_path, concept_dir, out) + ["--max_train_steps", "2", "--train_text_encoder", "--rank", "4", "--learning_rate", "1e-2"])
    f = AdapterFile.read(str(out / ADAPTER_FILE))
    assert set(f.layers) == {"unet", "text_encoder", "text_encoder_2"}
    assert all(f.delta[c].abs().max() > 0 for c in f.layers)


def test_sdxl_pivotal_tuning_trains_the_identifier_in_both_text_encoders(tiny_sdxl_path, concept_dir, tmp_path):
    """SDXL's second text encoder also makes the pooled conditioning: the identifier's row trains in both tables (it
    trained only in the first), the file is SDXL's layout {clip_l, clip_g} with its token in the metadata, and it loads
    into both tables with loldu's loader and with diffusers' load_textual_inversion, one table at a time as its docs do."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from loldu_diffusion.embeddings import load_token_embeddings

    out = tmp_path / "xl_ti"
    flags = ["--train_text_encoder_ti", "--train_text_encoder", "--class_prompt", "a photo of a heart", "--rank", "4", "--learning_rate",
             "1e-2", "--checkpointing_steps", "1"]
    run(common(tiny_sdxl_path, concept_dir, out) + ["--max_train_steps", "2", *flags])
    # a resume hands each part its own keys (the second table's row reached the text encoders' adapter and was refused);
    # from an earlier checkpoint than the last, --overwrite says the later one (checkpoint-2) may go
    run(common(tiny_sdxl_path, concept_dir, out) + ["--max_train_steps", "3", *flags, "--resume_from_checkpoint", "checkpoint-1", "--overwrite"])
    with safe_open(str(out / "learned_embeds.safetensors"), framework="pt") as f:
        rows, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    tables = [pipe.text_encoder.get_input_embeddings().weight, pipe.text_encoder_2.get_input_embeddings().weight]
    assert set(rows) == {"clip_l", "clip_g"} and meta["token"] == "sks"
    assert [tuple(rows[k].shape) for k in ("clip_l", "clip_g")] == [(1, t.shape[1]) for t in tables]
    heart = [pipe.tokenizer("heart", add_special_tokens=False).input_ids[0], pipe.tokenizer_2("heart", add_special_tokens=False).input_ids[0]]
    assert all(not torch.allclose(rows[k][0], t[i]) for k, t, i in zip(("clip_l", "clip_g"), tables, heart))  # both trained
    assert load_token_embeddings(pipe, str(out / "learned_embeds.safetensors")) == ["sks"]
    sks = [pipe.tokenizer("sks", add_special_tokens=False).input_ids[0], pipe.tokenizer_2("sks", add_special_tokens=False).input_ids[0]]
    assert all(torch.equal(t[i], rows[k][0]) for k, t, i in zip(("clip_l", "clip_g"), tables, sks))
    theirs = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    theirs.load_textual_inversion(rows["clip_l"], token="<sks>", text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(rows["clip_g"], token="<sks>", text_encoder=theirs.text_encoder_2, tokenizer=theirs.tokenizer_2)
    new = [theirs.tokenizer.convert_tokens_to_ids("<sks>"), theirs.tokenizer_2.convert_tokens_to_ids("<sks>")]
    assert all(torch.equal(enc.get_input_embeddings().weight[i], rows[k][0]) for enc, i, k in
               zip((theirs.text_encoder, theirs.text_encoder_2), new, ("clip_l", "clip_g")))


@pytest.mark.parametrize("text", [["--train_text_encoder"],  # the text encoder's adapter: inside a module DDP wraps
                                  ["--train_text_encoder_ti", "--class_prompt", "a photo of a heart", "--ti_only_steps", "1"]])
def test_two_processes_stay_in_sync_and_write_once(tiny_sd_path, concept_dir, tmp_path, text):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "train_dreambooth_loldu.py"),
           *common(tiny_sd_path, concept_dir, out), "--max_train_steps", "3", "--learning_rate", "1e-2", "--lr_scheduler", "cosine",
           "--lr_warmup_steps", "0", *text]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["max_process_divergence"] == 0.0
    # accelerate steps the schedule once per process: counted in optimizer steps, cosine ended back at the full lr (1e-2)
    assert summary["final_lr"] == pytest.approx(0.0, abs=1e-12)
    assert (proc.stdout + proc.stderr).count("wrote loldu_adapter.safetensors") == 1
    if "--train_text_encoder" in text:
        assert set(AdapterFile.read(str(out / ADAPTER_FILE)).layers) == {"unet", "text_encoder"}
    else:  # the identifier's embedding, a tensor outside every module: its gradient is averaged over the processes too
        assert os.path.exists(out / "learned_embeds.safetensors")


def test_mixed_precision_casts_the_base_but_not_the_adapter():
    from loldu_diffusion import LoLDUConfig, inject_loldu, iter_layers, loldu_parameters
    from loldu_diffusion.training.models import cast_frozen
    from tiny import tiny_unet

    unet = tiny_unet()
    inject_loldu(unet, LoLDUConfig(rank=4))
    cast_frozen(unet, torch.bfloat16)
    assert unet.conv_in.weight.dtype == torch.bfloat16
    assert all(l.base.weight.dtype == torch.bfloat16 for *_, l in iter_layers(unet))
    assert all(l.L.dtype == l.U.dtype == torch.float32 for *_, l in iter_layers(unet))
    assert all(p.dtype == torch.float32 for p in loldu_parameters(unet))


def test_checkpoints_total_limit_keeps_the_newest(tiny_sd_path, concept_dir, tmp_path):
    out = tmp_path / "limited"
    run(common(tiny_sd_path, concept_dir, out) + ["--max_train_steps", "7", "--checkpointing_steps", "2",
                                                  "--checkpoints_total_limit", "2"])
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-6"]


def test_the_last_step_is_checkpointed_as_in_diffusers(tiny_sd_path, concept_dir, tmp_path):
    """diffusers' test_dreambooth_lora: 6 steps, every 2, limit 2 → {checkpoint-4, checkpoint-6},
    and a run resumed from checkpoint-4 to 8 steps continues from there: refused while the later
    checkpoint-6 is there (two runs' checkpoints would mix), with --overwrite it replaces it."""
    out = tmp_path / "six"
    run(common(tiny_sd_path, concept_dir, out) + ["--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"])
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-6"]
    resume = ["--max_train_steps", "8", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--resume_from_checkpoint", "checkpoint-4"]
    with pytest.raises(TrainingError, match="also holds the later checkpoint-6 of the run it went on to; pass --overwrite"):
        run(common(tiny_sd_path, concept_dir, out) + resume)
    summary = run(common(tiny_sd_path, concept_dir, out) + resume + ["--overwrite"])
    assert summary["steps"] == 8
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-6", "checkpoint-8"]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_runs_end_to_end_on_cpu(tiny_sd_path, concept_dir, tmp_path, capsys, precision):
    out = tmp_path / precision
    summary = run(common(tiny_sd_path, concept_dir, out) + ["--mixed_precision", precision, "--max_train_steps", "2",
                                                            "--validation_steps", "1", "--learning_rate", "1e-2"])
    assert summary["steps"] == 2 and "failed" not in capsys.readouterr().out  # no validation lost
    delta = AdapterFile.read(str(out / ADAPTER_FILE)).delta["unet"]
    assert torch.isfinite(delta).all() and delta.abs().max() > 0
    for name in ("validation_before.png", "validation_step_1.png", "validation_after.png", "validation_grid.png"):
        assert (out / name).exists(), name


def test_a_failing_validation_is_a_warning_and_the_adapter_is_kept(tiny_sd_path, concept_dir, tmp_path, capsys, monkeypatch):
    from loldu_diffusion.training import loop

    real = loop.generate

    def fails_after_training(pipe, *a, desc=None, **kw):
        if desc == "validation (after)":
            raise RuntimeError("Input type (float) and bias type (c10::BFloat16) should be the same")
        return real(pipe, *a, desc=desc, **kw)

    monkeypatch.setattr(loop, "generate", fails_after_training)
    out = tmp_path / "kept"
    run(common(tiny_sd_path, concept_dir, out) + ["--max_train_steps", "2"])
    said = capsys.readouterr().out
    assert "warning: validation (after) failed" in said and "bias type" in said
    assert AdapterFile.read(str(out / ADAPTER_FILE)).rank == 32
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2
    assert (out / "validation_before.png").exists() and not (out / "validation_after.png").exists()
    assert "validation_before.png" in (out / "README.md").read_text()


def test_resumed_run_keeps_the_first_parts_validation_and_time(tiny_sd_path, concept_dir, tmp_path, monkeypatch):
    from accelerate import Accelerator

    out = tmp_path / "resumed"
    argv = common(tiny_sd_path, concept_dir, out) + ["--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_steps", "1"]
    real_log = Accelerator.log

    def log_then_die(self, values, step=None, **kw):
        real_log(self, values, step=step, **kw)
        if step == 3:
            raise SimulatedKill()

    monkeypatch.setattr(Accelerator, "log", log_then_die)
    with pytest.raises(SimulatedKill):
        run(argv)
    monkeypatch.setattr(Accelerator, "log", real_log)
    # a long first part: its time counts in the whole run's
    state_path = out / "checkpoint-2" / "run.json"
    state = json.loads(state_path.read_text())
    assert state["steps_run"] == 2 and state["images"] == {"before": 1, "1": 1, "2": 1}
    state.update(seconds=1000.0, train_seconds=500.0)
    state_path.write_text(json.dumps(state))
    summary = run(argv + ["--resume_from_checkpoint", "latest"])
    assert 1000 <= summary["seconds"] < 1300 and summary["seconds_per_step"] >= 500 / 4
    assert (out / "validation_before.png").exists()
    with Image.open(out / "validation_grid.png") as grid, Image.open(out / "validation_after.png") as after:
        assert grid.height == 5 * after.height  # before, steps 1, 2, 3, after


def test_inputs_are_checked_before_anything_loads(tiny_sd_path, concept_dir, tmp_path, monkeypatch):
    from loldu_diffusion.training import loop

    def no_loading(args):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(loop, "load_models", no_loading)
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"\0" * 16)
    cases = [
        (str(tmp_path / "missing-model"), [], r"missing-model: no such folder$"),
        ("some-org/some-model", [], r"Hugging Face Hub id it is not in the local cache .* HF_HUB_OFFLINE is set: download it"),
        (str(checkpoint), [], r"model.safetensors: not a readable safetensors file \(truncated or corrupt\?\); download it again$"),
        (tiny_sd_path, ["--resolution", "0"], r"--resolution 0: must be a positive size"),
    ]
    for model, extra, match in cases:
        with pytest.raises(TrainingError, match=match) as e:
            run(common(model, concept_dir, tmp_path / "o") + extra)
        assert "\n" not in str(e.value)


def test_a_cached_hub_id_trains_from_the_cache(tiny_sd_path, concept_dir, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    def cached(repo_id, local_files_only=False, **kw):
        assert repo_id == "some-org/tiny" and local_files_only
        return tiny_sd_path

    monkeypatch.setattr(DiffusionPipeline, "download", cached)
    out = tmp_path / "hub"
    summary = run(common("some-org/tiny", concept_dir, out) + ["--max_train_steps", "1"])
    assert summary["base_model"] == "tiny" and "base_model: some-org/tiny" in (out / "README.md").read_text()


def test_start_warnings_that_save_time(tiny_sd_path, concept_dir, tmp_path, capsys, monkeypatch):
    from loldu_diffusion.training import loop

    monkeypatch.setattr(loop, "tracker_installed", lambda name: name != "wandb")
    out = tmp_path / "warned"
    run(common(tiny_sd_path, concept_dir, out) + ["--max_train_steps", "1", "--resolution", "64", "--mixed_precision", "fp16",
                                                  "--report_to", "wandb"])
    said = capsys.readouterr().out
    assert "warning: --report_to wandb: wandb is not installed (pip install wandb); logging to tensorboard instead" in said
    assert "warning: --mixed_precision fp16 on a CPU" in said and "slower" in said
    assert "warning: --resolution 64 is 4× the base model's native 16 px: each step costs about 16× more" in said
    assert os.path.isdir(out / "logs")  # tensorboard did log


def test_photos_on_the_embedded_base_are_warned_about(concept_dir, tmp_path, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(concept_dir, photos)
    Image.new("RGB", (640, 480), (120, 90, 60)).save(photos / "dog.jpg")
    run(["--instance_data_dir", str(photos), "--instance_prompt", "a photo of sks dog", "--max_train_steps", "1",
         "--train_batch_size", "1", "--num_validation_images", "1", "--num_inference_steps", "1", "--validation_steps", "0",
         "--judge_images", "0", "--report_to", "none", "--output_dir", str(tmp_path / "o")])
    said = capsys.readouterr().out
    assert "warning: the embedded base only knows its own toy world" in said and re.search(r"\b1 of the \d+ instance images", said)
