"""Training from the app: the trainer's own main in a child process, one run at a time, cancel."""
import os
import time

import pytest

from loldu_diffusion import AdapterFile
from loldu_diffusion.app import Studio
from loldu_diffusion.app_train import Trainer, run_name

FAST = ["--num_validation_images", "1", "--num_inference_steps", "2", "--validation_steps", "2", "--judge_images", "0"]


@pytest.fixture()
def studio(tiny_sd_path, tmp_path):
    studio = Studio(tiny_sd_path)
    studio.trainer = Trainer(tiny_sd_path, str(tmp_path / "trained"), FAST)
    return studio


def photos(concept_dir, n=5):
    return sorted(os.path.join(concept_dir, f) for f in os.listdir(concept_dir) if f.endswith(".png"))[:n]


def wait(run, states=("done", "failed", "cancelled"), timeout=300):
    deadline = time.monotonic() + timeout  # bounded; no result depends on timing
    while run.state not in states and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.state in states, (run.state, run.lines[-5:])


def test_a_run_writes_the_trainers_files_and_its_adapter_joins_the_list(studio, concept_dir):
    session = studio.new_session()
    run = studio.trainer.start(session, photos(concept_dir), "sks", "heart", steps=4)
    assert run.name == "sks-heart" and run.total == 4
    wait(run)
    assert run.state == "done", run.lines[-5:]
    for name in ("loldu_adapter.safetensors", "README.md", "train_summary.json", "loss.png", "validation_grid.png",
                 "validation_after.png", "instance_images.png"):
        assert os.path.isfile(os.path.join(run.output_dir, name)), name
    assert AdapterFile.read(run.adapter).metadata["instance_prompt"] == "a photo of sks heart"
    assert [c for _, c in run.images()] == ["after", "step 2", "before · steps · after", "loss"]
    assert run.step == 4 and "done" in run.message()
    assert studio.folder_adapters() == [run.adapter]
    assert studio.adapter_choices() == [("sks-heart (trained here)", run.adapter)]
    a = session.add(run.adapter, display_name=run.name)
    assert session.generate("a photo of sks heart", steps=2, seed=0)[0][1].endswith(f"{a.name}:1")
    # the same words again: a new folder, the first run kept
    again = studio.trainer.start(session, photos(concept_dir, 3), "sks", "heart", steps=2)
    assert again.name == "sks-heart-2"
    wait(again)


def test_one_training_at_a_time_and_only_its_page_cancels_it(studio, concept_dir):
    me, other = studio.new_session(), studio.new_session()
    run = studio.trainer.start(me, photos(concept_dir), "zwx", "heart", steps=100_000)
    with pytest.raises(ValueError, match="busy: one training at a time, and zwx-heart is at step"):
        studio.trainer.start(other, photos(concept_dir), "sks", "dog")
    assert "another page" in studio.trainer.cancel(other) and studio.trainer.busy()
    wait(run, ("training",))  # cancelling mid-run, not before it starts
    assert studio.trainer.cancel(me).startswith("cancelled zwx-heart at step")
    assert run.state == "cancelled" and run.proc.poll() is not None and not studio.trainer.busy()
    assert studio.folder_adapters() == []  # a cancelled run lists nothing
    assert studio.trainer.cancel(me) == "no training is running"


@pytest.mark.parametrize("n, trigger, noun, match", [
    (2, "sks", "dog", "drop 3 to 10 photos of your subject \\(2 given\\)"),
    (11, "sks", "dog", "drop 3 to 10 photos of your subject \\(11 given\\)"),
    (3, "sks", " ", "type a trigger word"),
])
def test_what_the_user_must_fix_is_one_line_before_anything_starts(studio, concept_dir, n, trigger, noun, match):
    files = (photos(concept_dir) * 3)[:n]
    with pytest.raises(ValueError, match=match):
        studio.trainer.start(studio.new_session(), files, trigger, noun)
    assert studio.trainer.run is None


def test_files_that_are_not_images_are_refused_by_the_trainers_own_checks(studio, tmp_path):
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"{i}.png"))
        open(files[-1], "wb").write(b"not a png")
    with pytest.raises(ValueError, match=r"^0 of the files are photos the trainer can read \(not: 0.png \(UnidentifiedImageError\), "):
        studio.trainer.start(studio.new_session(), files, "sks", "dog")
    assert studio.trainer.run is None and not os.listdir(tmp_path / "trained")


def test_a_context_captions_every_photo_for_the_trainer(studio, concept_dir):
    from loldu_diffusion.training.data import ImageSet

    session = studio.new_session()
    run = studio.trainer.start(session, photos(concept_dir, 3), "sks", "heart", steps=100_000, context="  on a  white background ")
    folder = os.path.join(run.output_dir, "photos")
    assert ImageSet.from_folder(folder, "a photo of sks heart", 32).captions == ["a photo of sks heart on a white background"] * 3
    studio.trainer.cancel(session)
    assert not os.path.exists(run.output_dir)  # a cancelled run keeps nothing: the photos are someone's
    with pytest.raises(ValueError, match="say what the photos share in a few words"):
        studio.trainer.start(session, photos(concept_dir, 3), "sks", "heart", context="x" * 201)


def test_run_names_are_safe_folder_names():
    assert run_name("sks", "dog") == "sks-dog"
    assert run_name(" ohwx", "red mug/../x") == "ohwx-red-mug-x"
    assert run_name("☃", "") == "subject"


@pytest.mark.parametrize("extra, match", [("--foo 3", "the trainer takes no --foo 3"),
                                          ("--max_train_steps abc", "argument --max_train_steps: invalid int value: 'abc'")])
def test_mistyped_train_args_are_one_line_before_the_base_loads(extra, match, tmp_path, monkeypatch):
    from loldu_diffusion import app

    monkeypatch.setattr(app, "Studio", None)  # never reached
    with pytest.raises(ValueError, match=f"^--train-args: {match}"):
        app.launch(outputs=str(tmp_path), train_args=extra, block=False)


def test_the_app_trains_with_the_trainers_recipe_on_the_embedded_base(tmp_path):
    from loldu_diffusion.assets import default_base_path

    args = Trainer(default_base_path(), str(tmp_path), []).defaults()
    assert args.recipe == "embedded" and args.train_text_encoder_ti and args.with_prior_preservation
    assert args.class_prompt == "a photo of a subject" and args.instance_prompt == "a photo of sks subject"

