"""The default DreamBooth run on the embedded base, as the trainer itself reports it (the same
measures as `loldu bench learning`, n = 48 images per prompt kind). It learns the bundled
subject (a purple heart with a stripe) close to what the base draws when told exactly; it does
NOT yet keep the class prompt or new backgrounds — the two expected failures below say so and
turn into errors (strict) the day a change fixes them, so the README's claims get updated.

Marked slow (a full default run, ≈ 1–2 min on 2 cores); CI runs it all the same."""
import json
import os

import pytest

N = 48
# Bounds from the runs in BENCHMARKS.md (default: subject/ceiling 0.70–1.00 over 5 runs at
# step 200, 0.96 for this seed; drift +83…+94 points; recontext 0.00–0.19), with margin.
MIN_SUBJECT_OF_CEILING = 0.6
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
@pytest.mark.xfail(strict=True, reason="known gap (issue 11): without prior preservation the class prompt takes the subject's "
                   "colour and marking (+83…+94 points in every LoLDU run); with it on the UNet alone the subject is not learnt "
                   "(LoLDU 0/5, LoRA r4 0/4); pivotal tuning + prior + cosine comes close (BENCHMARKS.md)")
def test_default_run_keeps_the_class_prompt(default_run):
    assert default_run[1]["judged"]["drift_points"] <= ISSUE_DRIFT_BAR


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known gap (issue 11): LoLDU's adapter overrides backgrounds its images never show "
                   "(recontext/ceiling 0.00–0.19; LoRA r4 0.40, textual inversion 1.0 on this base)")
def test_default_run_draws_the_subject_on_new_backgrounds(default_run):
    assert default_run[1]["judged"]["recontext_of_ceiling"] >= 0.5
