"""The default DreamBooth run on the embedded base (LoLDU on the cross-attentions' keys and values
+ pivotal tuning + prior preservation + cosine, training.args.EMBEDDED_RECIPE), as the trainer
itself reports it (the same measures as `loldu bench learning`, n = 48 images per prompt kind).
It learns the bundled subject (a purple heart with a stripe) close to what the base draws when
told exactly, keeps the class prompt and keeps some of new backgrounds; it does NOT yet keep
them as well as LoRA r=4 with the same recipe — the expected failure below says so and turns
into an error (strict) the day a change fixes it, so the README's claims get updated.

Marked slow (a full default run, ≈ 2 min on 2 cores); CI runs it all the same."""
import json
import os

import pytest

N = 48
# Bounds from the runs in BENCHMARKS.md (the recipe on captioned images, 16 runs at step 200: subject/ceiling
# 0.89 on average, 0.96 and 1.02 for this subject; drift at most +17, −2 here; recontext 0.56 on average, at
# least 0.33, 0.73 here — uncaptioned, 0.50), with margin.
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
def test_default_run_draws_the_subject_on_some_new_backgrounds(default_run):
    # on every attention projection the recipe kept 0.02 here (the subject's purple turned blue on dark backgrounds);
    # with uncaptioned images 0.50 (the identifier also learnt the light backgrounds the images share)
    assert default_run[1]["judged"]["recontext_of_ceiling"] >= MIN_RECONTEXT_OF_CEILING


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known gap (issue 11): LoRA r=4 with the same recipe, targets and captions keeps new "
                   "backgrounds better (0.90 ± 0.09 bench, 0.99 ± 0.01 held-out of the ceiling; LoLDU's recipe 0.54 and 0.59)")
def test_default_run_draws_the_subject_on_new_backgrounds_as_lora_does(default_run):
    assert default_run[1]["judged"]["recontext_of_ceiling"] >= 0.8
