"""The default DreamBooth run learns the subject: the judge sees it far more often than in the
base model's images for the instance prompt, and the class prompt is not taken over."""
import os

import pytest

from loldu_diffusion.toy.concepts import DEFAULT_SUBJECT


@pytest.mark.parametrize("method", ["loldu"])
def test_default_run_learns_the_subject(tmp_path, method):
    from loldu_diffusion import load_adapter
    from loldu_diffusion.toy.evaluate_base import generate, load_pipeline
    from loldu_diffusion.toy.judge import load_judge
    from loldu_diffusion.training import parse_args, train
    from loldu_diffusion.training.methods import ADAPTER_FILE

    out = tmp_path / "run"
    summary = train(parse_args(["--output_dir", str(out), "--report_to", "none", "--num_validation_images", "2",
                                "--validation_steps", "1000"]))
    assert summary["steps"] == 200 and os.path.getsize(out / ADAPTER_FILE) < 20_000
    judge = load_judge()
    n = 24
    prompt = [DEFAULT_SUBJECT.instance_prompt] * n
    base = load_pipeline()
    before = sum(DEFAULT_SUBJECT.shown_in(a) for a in judge.read(generate(base, prompt, seed=500))) / n
    load_adapter(base, str(out / ADAPTER_FILE))
    after = sum(DEFAULT_SUBJECT.shown_in(a) for a in judge.read(generate(base, prompt, seed=500))) / n
    assert after >= 0.6 and after >= before + 0.4, (before, after)
