"""The default DreamBooth run learns the subject on the embedded base: the judge sees the whole
subject (a heart, purple, with a stripe) in the instance prompt's images, which the base model
never draws, and the subject's colour on most of them; the class prompt is not taken over."""
import os

from loldu_diffusion.toy.concepts import DEFAULT_SUBJECT as S


def rates(pipe, judge, prompt, seed, n=24):
    from loldu_diffusion.toy.evaluate_base import generate

    read = judge.read(generate(pipe, [prompt] * n, seed=seed))
    return {
        "colored_shape": sum(a["object_color"] == S.object_color and a["shape"] == S.shape for a in read) / n,
        "subject": sum(S.shown_in(a) for a in read) / n,
    }


def test_default_run_learns_the_subject(tmp_path):
    from loldu_diffusion import load_adapter
    from loldu_diffusion.toy.evaluate_base import load_pipeline
    from loldu_diffusion.toy.judge import load_judge
    from loldu_diffusion.training import parse_args, train
    from loldu_diffusion.training.methods import ADAPTER_FILE

    out = tmp_path / "run"
    summary = train(parse_args(["--output_dir", str(out), "--report_to", "none", "--num_validation_images", "2",
                                "--validation_steps", "100000"]))
    assert summary["steps"] == 600 and os.path.getsize(out / ADAPTER_FILE) < 20_000
    judge = load_judge()
    base = load_pipeline()
    before = rates(base, judge, S.instance_prompt, 500)
    class_before = rates(base, judge, S.class_prompt, 700)
    load_adapter(base, str(out / ADAPTER_FILE))
    after = rates(base, judge, S.instance_prompt, 500)
    class_after = rates(base, judge, S.class_prompt, 700)
    # measured: subject 0.00 → 0.25, purple hearts 0.00 → 0.79 (24 images each)
    assert before["subject"] <= 0.05 and after["subject"] >= before["subject"] + 0.15, (before, after)
    assert before["colored_shape"] <= 0.1 and after["colored_shape"] >= 0.6, (before, after)
    # Without --with_prior_preservation some drift onto the class prompt is expected (measured
    # 0.21 of "a photo of a heart" images show the subject); it must stay a minority.
    assert class_after["subject"] <= 0.4, (class_before, class_after)
