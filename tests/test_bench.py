"""The benchmark suites run on tiny configurations and report what the README quotes."""
import json
import os

import pytest
import torch

from loldu_diffusion.bench.authors import AuthorsLoLDULinear
from loldu_diffusion.bench import main as bench
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


def test_cost_suite_quick(tmp_path, capsys):
    assert bench(["cost", "--quick", "--json", "--out", str(tmp_path)]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("floor_s", "loldu_s", "lora_s", "olora_s", "authors_s", "peak_mb", "base_infer_s", "fused_infer_s",
                "unfused_infer_s", "blend1_infer_s", "blend16_infer_s", "attach_s", "file_kb", "lora_file_kb", "device"):
        assert key in r, key
    assert set(r["peak_mb"]) == {"floor", "loldu", "lora", "olora", "authors"}
    assert r["loldu_params"] == r["layers"] * (r["rank"] + 1) and r["lora_params"] > r["loldu_params"]
    assert r["file_kb"] < r["lora_file_kb"]
    assert sorted(os.listdir(tmp_path)) == ["cost_quick.json", "cost_quick.md", "cost_quick.png"]


@pytest.mark.skipif(not os.path.isdir(default_base_path()), reason="embedded base model not built")
def test_learning_suite_quick(tmp_path, capsys):
    assert bench(["learning", "--quick", "--json", "--out", str(tmp_path), "--steps", "4"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(r["summary"]) == {"loldu-lu", "lora"}
    for s in r["summary"].values():
        assert 0.0 <= s["subject"] <= 1.0 and 0.0 <= s["prior"] <= 1.0
    assert os.path.isfile(tmp_path / "learning_quick.png")
