"""The benchmark suites run on tiny configurations and report what the README quotes."""
import json
import os

import pytest
import torch

from loldu_diffusion.bench.authors import AuthorsLoLDULinear
from loldu_diffusion.bench import learning, main as bench
from loldu_diffusion.toy import default_base_path


def test_authors_formulation_is_the_same_function():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40)
    x = torch.randn(5, 24)
    layer = AuthorsLoLDULinear(base, 6)
    assert torch.allclose(layer(x), base(x), atol=1e-5)  # at init: the base
    from loldu_diffusion.layer import LoLDULayer, LoLDUVector

    ours = LoLDULayer(base, 6)
    with torch.no_grad():
        layer.z.mul_(1.5)
        layer.sigma.fill_(0.8)
    ours.add_adapter("a", LoLDUVector(ours.d.clone(), 1.0, trainable=False))
    with torch.no_grad():
        ours.adapters["a"].z.mul_(1.5)
        ours.adapters["a"].sigma.fill_(0.8)
    assert torch.allclose(layer(x), base(x) + ours(x), atol=1e-5)


def test_the_bench_default_config_is_the_trainers_default_and_loldu_is_loldu_alone(tmp_path):
    from loldu_diffusion.toy.concepts import DEFAULT_SUBJECT
    from loldu_diffusion.training import parse_args
    from loldu_diffusion.training.args import resolve_defaults

    cfgs = {c["name"]: c for c in learning.configs(quick=False)}
    parts = ("train_text_encoder_ti", "with_prior_preservation", "num_class_images", "lr_scheduler", "unet_targets", "learning_rate",
             "class_prompts_from_captions", "ti_only_steps", "rank")

    def settled(argv):
        args = resolve_defaults(parse_args(argv))
        return {p: getattr(args, p) for p in parts}

    def bench_run(name):
        return settled(learning.trainer_argv(cfgs[name], DEFAULT_SUBJECT, 0, 200, 50, str(tmp_path), str(tmp_path / "out")))

    trainer_default = settled(["--output_dir", str(tmp_path / "out")])  # the bundled subject: the same prompts
    assert bench_run(learning.DEFAULT_CONFIG) == trainer_default
    assert bench_run("loldu") == {**trainer_default, "train_text_encoder_ti": False, "with_prior_preservation": False,
                                  "lr_scheduler": "constant", "class_prompts_from_captions": False, "ti_only_steps": 0, "rank": 32}
    assert bench_run("loldu-custom-diffusion-cosine-captioned-context-prior") == {**trainer_default, "ti_only_steps": 0, "rank": 32}
    assert bench_run("loldu-custom-diffusion-cosine-captioned-context-prior-ti50") == {**trainer_default, "rank": 32}  # session 13's
    assert bench_run("lora-r4")["rank"] == 4 and bench_run("vera")["rank"] == 256  # the pin is LoLDU's alone


def test_the_context_prior_configs_draw_the_class_prompts_the_trainer_flag_draws(tmp_path):
    """The bench's captioned class images (its prompts in turn, seed 100000 + k) are what
    --class_prompts_from_captions draws at seed 0 from the captioned photos: the same prompts in
    the same order (the images, drawn by the same `draw`, agree to ±1 of 255)."""
    from loldu_diffusion.toy.concepts import BENCH_SUBJECTS, render_subject
    from loldu_diffusion.training.data import ImageSet, class_captions

    subject = BENCH_SUBJECTS[1]
    render_subject(subject, str(tmp_path), captions=True)
    captions = ImageSet.from_folder(str(tmp_path), subject.instance_prompt, 8).captions
    assert class_captions(captions, subject.instance_prompt, subject.class_prompt) == learning.context_class_prompts(subject) == [
        f"a photo of a star on a {b} background" for b in ("white", "gray", "beige")]


def test_learning_bench_refuses_a_base_the_judge_cannot_read(tiny_sd_path, tmp_path):
    with pytest.raises(ValueError, match=r"--base .*: not a toy-world base \(no loldu_toy_world.json\)"):
        learning.run_plan([("loldu", "sks", 0)], base_path=tiny_sd_path, out_dir=str(tmp_path))


def test_cost_suite_quick(tmp_path, capsys):
    # (compiled rows: minutes of inductor compilation on a CPU; tests/test_compile.py checks compiled outputs)
    assert bench(["cost", "--quick", "--json", "--out", str(tmp_path), "--compile", "none"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("floor_s", "loldu_s", "lora_s", "olora_s", "authors_s", "peak_mb", "base_infer_s", "fused_infer_s",
                "unfused_infer_s", "blend1_infer_s", "blend4_infer_s", "blend16_infer_s", "batch16_base_infer_s",
                "batch16_same_infer_s", "batch16_hetero_infer_s", "attach_s", "load_adapter_s", "file_kb", "lora_file_kb", "device"):
        assert key in r, key
    assert set(r["ratios"]) >= {"blend4_vs_blend1", "blend16_vs_blend1", "hetero16_vs_same16", "subjects8_vs_8_runs",
                                "subjects8_floor_bound"} and "compile_s" not in r
    assert set(r["multi_subject"]["floor_rows_s"]) == set(r["multi_subject"]["together_s"]) == {"1", "4", "8"}
    assert set(r["peak_mb"]) == {"floor", "loldu", "lora", "olora", "authors"}
    # the cached blend's Python work per forward does not grow with the number of adapters (guard.py)
    assert r["blend16_py_calls"] == r["blend4_py_calls"] == r["blend1_py_calls"] == r["unfused_py_calls"]
    assert r["loldu_params"] == r["layers"] * (r["rank"] + 1) and r["lora_params"] > r["loldu_params"]
    assert r["file_kb"] < r["lora_file_kb"]
    # a loaded adapter holds a few times its file's bytes (a module per layer held ~30 times)
    assert r["file_kb"] < r["loaded_adapter_kb"] < 5 * r["file_kb"] and r["load_adapter_many_s"] > 0
    assert sorted(os.listdir(tmp_path)) == ["cost_quick.json", "cost_quick.md", "cost_quick.png"]


@pytest.mark.skipif(not os.path.isdir(default_base_path()), reason="embedded base model not built")
def test_learning_suite_quick(tmp_path, capsys):
    assert bench(["learning", "--quick", "--json", "--out", str(tmp_path), "--steps", "4"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {s["config"] for s in r["summary"].values()} == {"loldu", "lora-r4"}
    base = r["base"]["sks"]
    assert 0.0 <= base["ceiling"] <= 1.0 and isinstance(base["admitted"], bool)
    for s in r["summary"].values():
        assert s["steps"] == [2, 4] and len(s["subject"]) == 2 and len(s["drift"]) == 2
        assert all(m >= 0.0 for m, _ in s["subject"])
    # the measures of a run, relative to the base: drift is in points over the base's own rate
    run = r["runs"][0]
    rel = learning.relative(run, r["base"])
    c = run["curve"][-1]
    assert rel[-1]["drift"] == pytest.approx(100 * max(c["class_color"] - base["class_color"], c["class_marking"] - base["class_marking"]))
    assert os.path.isfile(tmp_path / "learning_quick.png")


def test_mean_and_standard_error():
    m, se = learning.mean_se([0.2, 0.4, 0.6, 0.8])
    assert m == pytest.approx(0.5) and se == pytest.approx(0.2582 / 2, abs=1e-4)


def _fake(subject, seed, subject_rate):
    curve = [{"step": s, "subject": subject_rate * s / 100, "recontext": 0.1, "class_color": 0.2, "class_marking": 0.3, "class_subject": 0.0}
             for s in (50, 100)]
    return {"steps": 100, "checkpoints": [50, 100], "n": 48, "seeds": [seed], "configs": ["loldu"], "held_out": [],
            "base": {subject: {"ceiling": 0.8, "ceiling_recontext": 0.5, "class_color": 0.1, "class_marking": 0.3, "subject": 0.0, "admitted": True}},
            "runs": [{"config": "loldu", "subject": subject, "seed": seed, "curve": curve, "seconds_per_step": 0.1, "trainable": 10, "output_bytes": 100}]}


def test_merge_joins_processes_and_summarizes_relative_to_the_ceiling(tmp_path):
    paths = []
    for i, (subj, rate) in enumerate((("sks", 0.8), ("zwx", 0.4))):
        paths.append(str(tmp_path / f"{i}.json"))
        json.dump(_fake(subj, i, rate), open(paths[-1], "w"))
    r = learning.merge(paths)
    s = r["summary"]["loldu|bench"]
    assert s["runs"] == 2 and s["steps"] == [50, 100]
    # subject / ceiling at step 100: 0.8/0.8 and 0.4/0.8 → mean 0.75, se 0.25
    assert s["subject"][1] == pytest.approx((0.75, 0.25))
    assert s["drift"][1][0] == pytest.approx(10.0)  # colour 0.2 vs base 0.1: +10 points (marking +0)
    assert s["steps_to_learn"] == [100, None] and s["learnt_by_200"] == 1
    assert s["bar_at_200"] == 1  # sks: 1.0 of the ceiling with drift +10 at its last checkpoint; zwx 0.5
    drifting = _fake("sks", 0, 0.8)
    drifting["runs"][0]["curve"][-1]["class_color"] = 0.3  # +20 points: learnt, but not the bar
    assert learning.summarize(drifting)["loldu|bench"]["bar_at_200"] == 0
    bad = _fake("qlt", 2, 0.5)
    bad["n"] = 12
    json.dump(bad, open(tmp_path / "bad.json", "w"))
    with pytest.raises(ValueError, match="cannot be merged"):
        learning.merge(paths + [str(tmp_path / "bad.json")])
    # a merged file with one of its parts again: each run counts once, or the merge refuses
    json.dump(r, open(tmp_path / "merged.json", "w"))
    with pytest.raises(ValueError, match=r"1 run\(s\) appear in more than one file, e.g. \('loldu', 'sks', 0\)"):
        learning.merge([str(tmp_path / "merged.json"), paths[0]])


def test_an_earlier_runs_results_are_kept_unless_overwrite_is_asked(tmp_path, capsys):
    (tmp_path / "cost_quick.json").write_text("{}")  # measured earlier, maybe for hours
    with pytest.raises(SystemExit) as e:
        bench(["cost", "--quick", "--out", str(tmp_path)])
    assert e.value.code == 2 and "cost_quick.json/.md/.png are already there" in capsys.readouterr().err
    assert (tmp_path / "cost_quick.json").read_text() == "{}" and os.listdir(tmp_path) == ["cost_quick.json"]
