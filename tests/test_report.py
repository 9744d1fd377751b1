"""What a training run leaves for people: labelled validation grid, smoothed loss, model card."""
import os
import random
from types import SimpleNamespace

import numpy as np
from PIL import Image

from loldu_diffusion.training import report


def tiles(color, n=2, size=16):
    return [Image.new("RGB", (size, size), color) for _ in range(n)]


def ink(img, box):
    """How many dark pixels (text) there are in `box`."""
    return int((np.asarray(img.crop(box).convert("L")) < 128).sum())


def test_the_validation_grid_names_its_rows(tmp_path):
    before, during, after = tiles((250, 0, 0)), [(200, tiles((0, 250, 0))), (400, tiles((0, 0, 250)))], tiles((250, 250, 0))
    grids = report.write_images(str(tmp_path), before, during, after)
    with Image.open(grids["progress"]) as grid, Image.open(grids["after"]) as plain:
        grid.load()
        cell = plain.height  # one row of the unlabelled grid
        assert grid.height == 4 * cell  # rows: before, step 200, step 400, after
        left = grid.width - plain.width  # the label column
        assert left > 0
        rows = [grid.crop((0, y * cell, left, (y + 1) * cell)) for y in range(4)]
    assert all(ink(r, (0, 0, left, cell)) > 10 for r in rows)  # a label in every row
    assert len({r.tobytes() for r in rows}) == 4  # four different labels
    # the single-row images stay unlabelled, the images themselves unchanged
    with Image.open(grids["before"]) as b:
        assert b.size == plain.size and b.getpixel((0, 0)) == (250, 0, 0)


def test_smoothing_follows_the_trend_and_removes_the_noise():
    rng = random.Random(0)
    trend = [1.0 - 0.5 * i / 599 for i in range(600)]
    noisy = [t + rng.uniform(-0.3, 0.3) for t in trend]
    smooth = report.smoothed(noisy)
    assert len(smooth) == 600 and smooth[0] == noisy[0]  # debiased: the first value is not pulled to 0
    raw_err = np.abs(np.array(noisy) - trend)[100:].mean()
    smooth_err = np.abs(np.array(smooth) - trend)[100:].mean()
    assert smooth_err < raw_err / 3
    assert np.allclose(report.smoothed([0.2] * 50), 0.2)  # a flat loss stays flat


def test_loss_plot_is_written(tmp_path):
    path = report.loss_curve([1 / (i + 1) for i in range(40)], str(tmp_path / "loss.png"))
    with Image.open(path) as im:
        assert im.width > 300
    assert report.loss_curve([], str(tmp_path / "none.png")) is None


def card_args(concept_dir, out):
    return SimpleNamespace(pretrained_model_name_or_path="/models/base", embedded=False, method="loldu",
                           instance_prompt="a photo of sks heart", instance_data_dir=concept_dir, class_prompt=None,
                           output_dir=str(out), rank=4, learning_rate=1e-2, train_batch_size=1, seed=0,
                           with_prior_preservation=False, train_text_encoder=False, unet_targets=("to_q",))


def summary():
    return {"outputs": ["loldu_adapter.safetensors"], "steps": 4, "trainable_parameters": 100, "output_bytes": 1000,
            "resolution": 32}


def test_model_card_shows_the_instance_images_beside_before_and_after(concept_dir, tmp_path):
    grids = report.write_images(str(tmp_path), tiles((250, 0, 0)), [(2, tiles((0, 250, 0)))], tiles((0, 0, 250)))
    card = open(report.model_card(card_args(concept_dir, tmp_path), summary(), grids)).read()
    assert "| instance images | before | after |" in card
    assert "| ![instance images](instance_images.png) | ![before](validation_before.png) | ![after](validation_after.png) |" in card
    assert "![progress](validation_grid.png)" in card
    n = len([f for f in os.listdir(concept_dir) if f.endswith(".png")])
    with Image.open(tmp_path / "instance_images.png") as strip:
        assert strip.height > 0 and strip.width == min(n, report.MAX_CARD_INSTANCES) * strip.height


def test_model_card_without_validation_images_still_lists_what_there_is(concept_dir, tmp_path):
    grids = report.write_images(str(tmp_path), None, [], tiles((0, 0, 250)))
    card = open(report.model_card(card_args(str(tmp_path / "gone"), tmp_path), summary(), grids)).read()
    assert "after: ![after](validation_after.png)" in card and "instance images" not in card


def test_model_card_of_pivotal_tuning_loads_the_identifier_embedding(concept_dir, tmp_path):
    args = card_args(concept_dir, tmp_path)
    args.train_text_encoder_ti, args.lr_scheduler = True, "cosine"
    card = open(report.model_card(args, summary(), {})).read()
    code = card.split("```python\n")[1].split("```")[0]
    assert code.index("load_adapter(pipe, ") < code.index("load_token_embeddings(pipe, 'learned_embeds.safetensors')") < code.index("image = pipe(")
    assert "identifier embedding trained (pivotal tuning): yes; lr schedule: cosine" in card
    args.train_text_encoder_ti = False
    assert "load_token_embeddings" not in open(report.model_card(args, summary(), {})).read()
    # textual inversion alone: its row is written in place (diffusers' load_textual_inversion refuses a token the tokenizer has)
    args.method = "ti"
    ti_card = open(report.model_card(args, summary(), {})).read()
    assert "load_token_embeddings(pipe, " in ti_card and "load_textual_inversion" not in ti_card

