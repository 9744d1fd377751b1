"""The default DreamBooth run on the embedded base (LoLDU at rank 16 on the cross-attentions' keys and values
+ pivotal tuning, the embedding alone for the first 50 steps, + prior preservation with class images in the captions' contexts + cosine,
training.args.EMBEDDED_RECIPE), as the trainer itself reports it (the same measures as `loldu bench
learning`, n = 48 images per prompt kind). It learns the bundled subject (a purple heart with a
stripe, its photos captioned with their backgrounds) close to what the base draws when told
exactly, keeps the class prompt and keeps the subject on backgrounds none of its photos show.
Whether LoLDU keeps new backgrounds as well as LoRA r=4 is a claim about many subjects and seeds:
the learning benchmark measures it (BENCHMARKS.md), not this one run.

Marked slow (a full default run, ≈ 2 min on 2 cores); CI runs it all the same."""
import json
import os

import pytest

N = 48
# Bounds from this run as the main command makes it (session 14, rank 16: subject/ceiling 1.00, drift -2, new
# backgrounds 1.00; session 13 at rank 32: 0.98, 0, 0.71) and the bench's 16 runs of the recipe on captioned images (at
# step 200 subject/ceiling 0.88 at the least, new backgrounds 0.71 at the least; at rank 32 0.94 and 0.53), with margin.
MIN_SUBJECT_OF_CEILING = 0.6
MIN_RECONTEXT_OF_CEILING = 0.5
ISSUE_DRIFT_BAR = 15  # points above the base (issue 11)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    from loldu_diffusion.training import parse_args, train

    out = tmp_path_factory.mktemp("default") / "run"
    summary = train(parse_args(["--output_dir", str(out), "--report_to", "none", "--num_validation_images", "1"]))
    return out, summary


@pytest.mark.slow
def test_default_run_learns_the_subject(default_run):
    from loldu_diffusion.training.methods import ADAPTER_FILE

    out, summary = default_run
    assert os.path.getsize(out / ADAPTER_FILE) < 30_000
    judged = summary["judged"]
    assert judged == json.load(open(out / "train_summary.json"))["judged"]  # what the user is told is what was measured
    base, after = judged["base"], judged["after"]
    assert judged["n"] == N
    assert base["admitted"], base  # the base draws the subject when told, and not unasked
    assert base["subject"] <= 0.05, base  # the identifier alone means nothing to the base
    assert judged["subject_of_ceiling"] == pytest.approx(after["subject"] / base["ceiling"])
    assert judged["subject_of_ceiling"] >= MIN_SUBJECT_OF_CEILING, judged
    # drift is counted on what distinguishes the subject, against the base's own rate
    assert judged["drift_points"] == pytest.approx(100 * max(after["class_color"] - base["class_color"],
                                                             after["class_marking"] - base["class_marking"]))


@pytest.mark.slow
def test_default_run_keeps_the_class_prompt(default_run):
    # LoLDU alone drifts +83…+94 points (the class prompt becomes the subject); the recipe's identifier
    # embedding carries the subject and prior preservation holds the shared adapter to the class
    assert default_run[1]["judged"]["drift_points"] <= ISSUE_DRIFT_BAR


@pytest.mark.slow
def test_default_run_draws_the_subject_on_new_backgrounds(default_run):
    # on every attention projection the recipe kept 0.02 here (the subject's purple turned blue on dark backgrounds);
    # with uncaptioned images 0.50 (the identifier also learnt the light backgrounds the images share); captioned,
    # with a prior over the class alone 0.73 (on navy the purple turned red)
    assert default_run[1]["judged"]["recontext_of_ceiling"] >= MIN_RECONTEXT_OF_CEILING


@pytest.mark.slow
def test_default_run_draws_its_class_images_in_the_photos_contexts(default_run):
    out = default_run[0] / "class_images"
    assert [(out / f"class_{k:05d}.txt").read_text() for k in range(4)] == [
        f"a photo of a heart on a {b} background\n" for b in ("white", "gray", "beige", "white")]
