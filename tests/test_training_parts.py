"""The trainer's pieces, called directly: argument resolution, the loss, the checkpoint writer,
and the package's layering (the toy world sits on the product, never under it)."""
import ast
import os
import types

import pytest
import torch
import torch.nn.functional as F

from loldu_diffusion.training import parse_args
from loldu_diffusion.training.args import recipe_note, resolve_defaults, settle_schedule
from loldu_diffusion.training.checkpoints import list_checkpoints, load_history, load_run_state, write_checkpoint
from loldu_diffusion.training.steps import dreambooth_loss

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "loldu_diffusion")


def test_arguments_are_settled_into_copies_and_resolving_twice_changes_nothing():
    given = parse_args(["--num_train_epochs", "3", "--scale_lr", "--train_batch_size", "2", "--gradient_accumulation_steps", "2"])
    before = dict(vars(given))
    once = resolve_defaults(given)
    assert vars(given) == before  # the caller's namespace is untouched
    assert vars(resolve_defaults(once)) == vars(once)
    assert once.embedded and once.instance_prompt == "a photo of sks heart" and once.max_train_steps is None
    # the recipe's context prior lapses with prior preservation off, and resolving again accepts it
    off = resolve_defaults(parse_args(["--no_prior_preservation"]))
    assert not off.class_prompts_from_captions and vars(resolve_defaults(off)) == vars(off)
    assert once.class_prompts_from_captions
    settled = settle_schedule(once, n_images=5, num_processes=2)
    assert once.max_train_steps is None and not hasattr(once, "optimizer_lr")
    # diffusers' epoch, under prior preservation over the 48 class images (more than the 5 photos):
    # ceil(ceil(ceil(48 / batch 2) / 2 processes) / 2 accumulated) = 6 optimizer steps; without it over the photos: 1
    assert settled.max_train_steps == 3 * 6
    no_prior = resolve_defaults(parse_args(["--num_train_epochs", "3", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
                                            "--no_prior_preservation"]))
    assert settle_schedule(no_prior, n_images=5, num_processes=2).max_train_steps == 3 * 1
    # an epoch is in optimizer steps (it counted micro-batches: 4x the epochs asked for), --validation_epochs too, and an
    # explicit --validation_epochs wins over the embedded base's every-100-steps default
    by_epoch = settle_schedule(resolve_defaults(parse_args(["--num_train_epochs", "10", "--gradient_accumulation_steps", "4",
                                                            "--validation_epochs", "5"])), n_images=8, num_processes=1)
    assert by_epoch.max_train_steps == 30 and by_epoch.validation_steps == 15  # 48 class images / batch 4 = 12 batches, 4 a step
    assert resolve_defaults(parse_args([])).validation_steps == 100
    assert settled.optimizer_lr == pytest.approx(once.learning_rate * 2 * 2 * 2) and settled.learning_rate == once.learning_rate


def test_the_embedded_recipe_applies_to_loldu_with_a_class_prompt_and_each_part_can_be_turned_off(tiny_sd_path, tmp_path):
    def resolved(*argv):
        args = resolve_defaults(parse_args(list(argv)))
        return (args.recipe, args.train_text_encoder_ti, args.with_prior_preservation, args.num_class_images, args.lr_scheduler,
                args.unet_targets)

    cd = ("attn2.to_k", "attn2.to_v")
    recipe = ("embedded", True, True, 48, "cosine", cd)  # pivotal + prior + cosine on Custom Diffusion's targets: the bench's best
    plain = ("plain", False, False, 100, "constant", ("to_q", "to_k", "to_v", "to_out.0"))  # diffusers' and the paper's
    assert resolved() == recipe  # the bundled subject has a class prompt
    mine = ["--instance_data_dir", str(tmp_path), "--instance_prompt", "a photo of zwx heart"]
    assert resolved(*mine, "--class_prompt", "a photo of a heart") == recipe
    assert resolved(*mine) == plain  # no class word: no prior, no identifier to tell apart
    assert resolved("--method", "lora") == plain and resolved("--train_text_encoder") == plain
    assert resolved("--pretrained_model_name_or_path", tiny_sd_path, *mine, "--class_prompt", "a photo of a heart") == plain
    assert resolved("--no_train_text_encoder_ti") == ("embedded", False, True, 48, "cosine", cd)
    assert resolved("--no_prior_preservation", "--lr_scheduler", "constant") == ("embedded", True, False, 48, "constant", cd)
    assert resolved("--num_class_images", "10") == ("embedded", True, True, 10, "cosine", cd)
    assert resolved("--unet_targets", "to_q,to_k,to_v,to_out.0")[-1] == plain[-1]
    # the inversion phase: a quarter of the steps in the recipe, none without pivotal tuning or outside the recipe
    phase = lambda *argv: resolve_defaults(parse_args(list(argv))).ti_only_steps  # noqa: E731
    assert phase() == 50 and phase("--max_train_steps", "400") == 100 and phase("--ti_only_steps", "0") == 0
    assert phase("--no_train_text_encoder_ti") == 0 and phase("--method", "lora") == 0
    assert phase("--pretrained_model_name_or_path", tiny_sd_path, *mine, "--class_prompt", "a photo of a heart",
                 "--train_text_encoder_ti") == 0  # a real base keeps diffusers' joint training
    by_epochs = resolve_defaults(parse_args(["--num_train_epochs", "10"]))  # the quarter of a length known once images are counted
    assert by_epochs.ti_only_steps is None and settle_schedule(by_epochs, n_images=8, num_processes=1).ti_only_steps == 30
    # a resume says when its phase differs from the one its checkpoint's run began with, and only while that matters
    from loldu_diffusion.training.checkpoints import phase_change_note
    assert phase_change_note("out/checkpoint-30", 50, 100, 30).startswith("note: checkpoint-30 is from a run whose embedding")
    assert phase_change_note("out/checkpoint-30", 50, 50, 30) is None and phase_change_note("out/checkpoint-120", 50, 100, 120) is None
    assert phase_change_note("out/checkpoint-30", None, 100, 30) is None  # a checkpoint from before session 14 does not say
    # the recipe's note is said once settled, so it names the phase under --num_train_epochs too
    assert "(the embedding alone for the first 30 steps)" in recipe_note(settle_schedule(by_epochs, n_images=8, num_processes=1))
    assert "pivotal tuning off, prior" in recipe_note(resolve_defaults(parse_args(["--no_train_text_encoder_ti"])))
    # a flag that leaves the recipe out says so (it went silently); outside the embedded base nothing is said
    assert recipe_note(resolve_defaults(parse_args(["--train_text_encoder"]))).startswith("note: --train_text_encoder: LoLDU's recipe")
    assert recipe_note(resolve_defaults(parse_args(["--method", "lora"]))) is None
    assert recipe_note(resolve_defaults(parse_args(["--pretrained_model_name_or_path", tiny_sd_path, *mine]))) is None
    assert resolve_defaults(parse_args(["--method", "lora", "--max_train_steps", "0"])).ti_only_steps == 0  # no phase, no check
    # diffusers' flags keep their meaning on any base
    assert resolved("--pretrained_model_name_or_path", tiny_sd_path, *mine, "--class_prompt", "a photo of a heart",
                    "--with_prior_preservation", "--train_text_encoder_ti")[1:3] == (True, True)


def test_any_toy_world_base_gets_the_embedded_defaults_and_keeps_its_path(tiny_sd_path, tmp_path):
    import shutil

    from loldu_diffusion.assets import TOY_WORLD_MARKER, default_base_path

    copy = shutil.copytree(default_base_path(), tmp_path / "my-toy-base")  # e.g. toy.identifier_rows' output
    args = resolve_defaults(parse_args(["--pretrained_model_name_or_path", str(copy)]))
    assert args.embedded and args.pretrained_model_name_or_path == str(copy) and args.recipe == "embedded"
    assert args.train_batch_size == 4 and args.instance_prompt == "a photo of sks heart"
    os.remove(copy / TOY_WORLD_MARKER)  # a diffusers folder without the marker is a real base: the paper's setting
    with pytest.raises(ValueError, match="--instance_data_dir is required"):
        resolve_defaults(parse_args(["--pretrained_model_name_or_path", str(copy)]))
    assert not resolve_defaults(parse_args(["--pretrained_model_name_or_path", tiny_sd_path, "--instance_data_dir", str(tmp_path),
                                            "--instance_prompt", "a photo of sks dog"])).embedded


def test_the_bundled_subject_is_the_one_the_defaults_name():
    from loldu_diffusion.assets import DEFAULT_CLASS_PROMPT, DEFAULT_INSTANCE_PROMPT
    from loldu_diffusion.toy.concepts import DEFAULT_SUBJECT

    assert (DEFAULT_SUBJECT.instance_prompt, DEFAULT_SUBJECT.class_prompt) == (DEFAULT_INSTANCE_PROMPT, DEFAULT_CLASS_PROMPT)


def _sched(prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)


def test_the_loss_is_instance_mse_plus_weighted_prior_mse():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 2, 2, generator=g), torch.randn(4, 4, 2, 2, generator=g)
    t = torch.tensor([10, 500, 10, 500])
    plain = dreambooth_loss(pred, target, t, _sched())
    assert plain == pytest.approx(F.mse_loss(pred, target).item())
    with_prior = dreambooth_loss(pred, target, t, _sched(), prior_loss_weight=0.25, with_prior=True)
    expected = F.mse_loss(pred[:2], target[:2]) + 0.25 * F.mse_loss(pred[2:], target[2:])
    assert with_prior == pytest.approx(expected.item())


def test_adamw_is_torchs_fused_one_and_updates_as_the_per_tensor_one():
    """An adapter is hundreds of tiny vectors (K times that for K subjects): AdamW runs them in one
    fused kernel, not a Python pass per tensor, with the same update to floating point."""
    from loldu_diffusion.training.methods import make_optimizer

    args = types.SimpleNamespace(method="loldu", optimizer="adamw", use_8bit_adam=False, adam_beta1=0.9, adam_beta2=0.999,
                                 adam_weight_decay=1e-2, adam_epsilon=1e-8)
    torch.manual_seed(0)
    init = [torch.randn(8) for _ in range(6)] + [torch.randn(()) for _ in range(6)]
    grads = [[torch.randn_like(t) for t in init] for _ in range(20)]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = make_optimizer(args, [{"params": params[:6]}, {"params": params[6:], "lr": 5e-3}], 1e-2)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    ref_opt = torch.optim.AdamW([{"params": ref[:6]}, {"params": ref[6:], "lr": 5e-3}], 1e-2, weight_decay=1e-2, foreach=False)
    for g in grads:
        for p, q, gg in zip(params, ref, g):
            p.grad, q.grad = gg.clone(), gg.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
    # fp16 mixed precision: not fused (a fused step hides GradScaler's skipped steps from the schedule)
    assert not make_optimizer(args, [torch.nn.Parameter(torch.ones(2))], 1e-2, "fp16").defaults["fused"]


def test_a_resumed_adamw_keeps_this_runs_fused_choice_not_the_checkpoints():
    """load_state_dict takes `fused` from the checkpoint: one written unfused would slow the resumed run down."""
    from loldu_diffusion.training.methods import keep_fused_choice

    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(()))]
    old = torch.optim.AdamW(params, 1e-2, foreach=False)  # a checkpoint from before fusing
    for p in params:
        p.grad = torch.ones_like(p)
    old.step()
    new = torch.optim.AdamW(params, 1e-2, fused=True)
    new.load_state_dict(old.state_dict())
    assert not new.param_groups[0]["fused"]
    keep_fused_choice(new)
    assert new.param_groups[0]["fused"] is True
    before = [p.detach().clone() for p in params]
    new.step()  # the fused kernel runs with the restored step counts
    assert all((p - b).abs().max() > 0 for p, b in zip(params, before)) and new.state[params[0]]["step"].item() == 2


def test_min_snr_weighting_caps_the_easy_timesteps():
    from diffusers.training_utils import compute_snr

    sched = _sched()
    pred, target = torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)  # per-sample MSE 1
    t = torch.tensor([5, 900])  # very high SNR, low SNR
    snr = compute_snr(sched, t)
    expected = (torch.minimum(snr, torch.tensor(5.0)) / snr).mean()
    assert dreambooth_loss(pred, target, t, sched, snr_gamma=5.0) == pytest.approx(expected.item())
    assert snr[0] > 5 > snr[1]  # the case where the cap matters


class FakeAccelerator:
    """What write_checkpoint needs of accelerate: the save hook writes what trains."""

    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        os.makedirs(folder)
        with open(os.path.join(folder, "trainable.safetensors"), "wb") as f:
            f.write(b"weights")


def test_checkpoints_keep_the_newest_total_limit_and_carry_history_and_run_state(tmp_path):
    from PIL import Image

    acc, history, image = FakeAccelerator(), [], Image.new("RGB", (4, 4), (255, 0, 0))
    for step in range(1, 7):
        history.append(float(step))
        if step % 2 == 0:
            write_checkpoint(acc, str(tmp_path), step, 2, history, {"seconds": step * 10.0}, [image], [(step, [image])])
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [4, 6]  # diffusers leaves {checkpoint-4, checkpoint-6}
    last = str(tmp_path / "checkpoint-6")
    assert load_history(last) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    state, before, during = load_run_state(last)
    assert state == {"seconds": 60.0} and len(before) == 1 and [s for s, _ in during] == [6]
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))


def _imports(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or ""), node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno


def test_the_product_does_not_import_the_toy_world():
    """toy/ (the embedded world, judge, base-model training) and bench/ are built on the product.
    One documented exception: the trainer's judged report on the embedded base."""
    allowed = {("training/loop.py", "..toy.concepts")}
    found = []
    for root, _, files in os.walk(PACKAGE):
        rel_root = os.path.relpath(root, PACKAGE)
        if rel_root.split(os.sep)[0] in ("toy", "bench", "__pycache__"):
            continue
        for f in files:
            if f.endswith(".py"):
                rel = os.path.normpath(os.path.join(rel_root, f))
                for module, line in _imports(os.path.join(root, f)):
                    if "toy" in module.split(".") and (rel, module) not in allowed:
                        found.append(f"{rel}:{line} imports {module}")
    assert not found, found


def test_class_images_come_in_sample_batch_size_batches_and_do_not_depend_on_them(tiny_sd_path, tmp_path):
    import numpy as np
    from PIL import Image

    from loldu_diffusion.training.models import ensure_class_images, load_models

    class Acc(FakeAccelerator):
        device = torch.device("cpu")

    calls = []
    folders = {}
    for batch in (1, 3):
        args = resolve_defaults(parse_args(["--pretrained_model_name_or_path", tiny_sd_path, "--instance_data_dir", str(tmp_path),
                                            "--instance_prompt", "a photo of sks dog", "--class_prompt", "a photo of a dog",
                                            "--with_prior_preservation", "--num_class_images", "4", "--sample_batch_size", str(batch),
                                            "--num_inference_steps", "7", "--class_num_inference_steps", "2",
                                            "--output_dir", str(tmp_path / f"out{batch}")]))
        m = load_models(args)
        real = m.unet.forward
        m.unet.forward = lambda x, *a, **kw: (calls.append((batch, x.shape[0])), real(x, *a, **kw))[1]
        ensure_class_images(args, Acc(), m, 32)
        folders[batch] = sorted(os.listdir(args.class_data_dir))
        assert folders[batch] == [f"class_{k:05d}.png" for k in range(4)]
    # classifier-free guidance doubles the batch: 1 image → 2 rows; 3 then 1 → 6 then 2 rows; 2 steps each
    # (--class_num_inference_steps, not the validation images' --num_inference_steps)
    assert [b for batch, b in calls if batch == 1] == [2] * 8 and sorted(b for batch, b in calls if batch == 3) == [2, 2] + [6, 6]
    for name in folders[1]:
        one, three = (np.asarray(Image.open(tmp_path / f"out{b}" / "class_images" / name), dtype=np.int16) for b in (1, 3))
        assert np.abs(one - three).max() <= 2  # the same image, up to batched arithmetic


def test_class_captions_put_the_class_prompt_in_each_context_once():
    from loldu_diffusion.training.data import class_captions

    caps = ["a photo of sks dog on a beach", "a photo of sks dog", "a dog in snow", "a photo of sks dog on a beach"]
    assert class_captions(caps, "a photo of sks dog", "a photo of a dog") == ["a photo of a dog on a beach", "a photo of a dog"]
    assert class_captions([], "a photo of sks dog", "a photo of a dog") == ["a photo of a dog"]
    # whole words, any case: a capital first letter keeps its context
    assert class_captions(["A photo of sks dog, on a sofa"], "a photo of sks dog", "a photo of a dog") == ["a photo of a dog, on a sofa"]
    # a caption that keeps only the identifier (as the README asks) gives way to the class word; it gave the bare class
    # prompt before session 14. A common word is never taken for the identifier and cut out of captions
    assert class_captions(["sks dog on a grey sofa", "a photo of sks dogs", "SKS, asleep", "a photo of sks on a sofa"],
                          "a photo of sks dog", "a dog") == ["dog on a grey sofa", "a photo of dogs", "dog, asleep", "a photo of dog on a sofa"]
    assert class_captions(["a close-up photo of the dog"], "a photo of my dog", "a dog") == ["a dog"]
    from loldu_diffusion.training.data import identifier_of

    assert [identifier_of(p, "a dog") for p in ("a dslr photo of sks dog", "A PHOTO OF SKS DOG", "a photo of my dog")] == [
        "sks", "SKS", "photo"]


def test_captioned_class_images_equal_drawing_each_prompt_alone(tiny_sd_path, tmp_path):
    import numpy as np
    from PIL import Image

    from loldu_diffusion.pipeline import draw
    from loldu_diffusion.training.models import ensure_class_images, load_models, make_pipeline

    class Acc(FakeAccelerator):
        device = torch.device("cpu")

    args = resolve_defaults(parse_args(["--pretrained_model_name_or_path", tiny_sd_path, "--instance_data_dir", str(tmp_path),
                                        "--instance_prompt", "a photo of sks dog", "--class_prompt", "a photo of a dog",
                                        "--with_prior_preservation", "--num_class_images", "3", "--sample_batch_size", "2",
                                        "--class_num_inference_steps", "2", "--output_dir", str(tmp_path / "out")]))
    m = load_models(args)
    prompts = ["a photo of a dog on a beach", "a photo of a dog in snow"]
    ensure_class_images(args, Acc(), m, 32, prompts)
    pipe = make_pipeline(m, m.unet, args)
    for k in range(3):
        assert (tmp_path / "out" / "class_images" / f"class_{k:05d}.txt").read_text() == prompts[k % 2] + "\n"
        alone = draw(pipe, [prompts[k % 2]], [args.seed + 100_000 + k], batch=1, num_inference_steps=2,
                     guidance_scale=args.guidance_scale, height=32, width=32)[0]
        made = Image.open(tmp_path / "out" / "class_images" / f"class_{k:05d}.png")
        assert np.abs(np.asarray(made, dtype=np.int16) - np.asarray(alone, dtype=np.int16)).max() <= 2
    # the images deleted, the folder refilled without contexts: no caption of the old images is left on the new ones
    for k in range(3):
        os.remove(tmp_path / "out" / "class_images" / f"class_{k:05d}.png")
    ensure_class_images(args, Acc(), m, 32)
    assert sorted(os.listdir(tmp_path / "out" / "class_images")) == [f"class_{k:05d}.png" for k in range(3)]


def test_class_images_do_not_take_the_validation_step_count(tmp_path):
    """The learning bench passed --num_inference_steps 2 for cheap validation images, and its
    class images were drawn with 2 steps too (blurred, mixed-colour blobs): a poor prior."""
    common = ["--instance_data_dir", str(tmp_path), "--instance_prompt", "a photo of sks heart", "--output_dir", str(tmp_path / "o")]
    args = resolve_defaults(parse_args(common + ["--num_inference_steps", "2"]))
    assert (args.num_inference_steps, args.class_num_inference_steps) == (2, 20)
    with pytest.raises(ValueError, match="--class_num_inference_steps must be at least 1"):
        resolve_defaults(parse_args(common + ["--class_num_inference_steps", "0"]))


def test_a_cpu_run_on_fewer_threads_than_cores_says_how_to_use_them_all():
    from loldu_diffusion.training.loop import thread_note

    said = thread_note("cpu", 1, 1, 8, "1")
    assert said == ("note: torch uses 1 of this CPU's 8 cores (OMP_NUM_THREADS=1, which `accelerate launch` sets to 1 on a CPU "
                    "unless told): `accelerate launch --num_cpu_threads_per_process 8 …` uses them all")
    assert thread_note("cuda", 1, 1, 8, "1") is None and thread_note("cpu", 2, 1, 8, "1") is None  # a GPU; a process per core
    assert thread_note("cpu", 1, 8, 8, "8") is None and thread_note("cpu", 1, 1, 8, None) is None  # all cores; torch's own choice


def test_a_prompt_the_adapter_file_cannot_keep_is_refused_before_anything_loads(tmp_path):
    from loldu_diffusion.training import TrainingError
    from loldu_diffusion.training.args import check_inputs

    args = resolve_defaults(parse_args(["--instance_data_dir", str(tmp_path), "--instance_prompt", "a photo of sks dog\nin a park",
                                        "--pretrained_model_name_or_path", "/nowhere"]))
    with pytest.raises(TrainingError, match="^--instance_prompt: give one line of printable text of at most 1,000 characters$"):
        check_inputs(args)
