"""The base-model training script runs end to end (its --quick form) and writes a pipeline that
diffusers loads, a judge, and is reproducible from its seed."""
import hashlib
import os

import torch


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_quick_training_writes_a_loadable_pipeline_reproducibly(tmp_path):
    from diffusers import StableDiffusionPipeline

    from loldu_diffusion.toy import default_base_path
    from loldu_diffusion.toy.judge import load_judge
    from loldu_diffusion.toy.train_base import main

    vae, tok = os.path.join(default_base_path(), "vae"), os.path.join(default_base_path(), "tokenizer")
    for out in ("a", "b"):
        main(["--quick", "--out", str(tmp_path / out), "--vae_from", vae, "--tokenizer_from", tok, "--seed", "3"])
    unet_file = os.path.join("tiny-sd", "unet", "diffusion_pytorch_model.safetensors")
    assert _digest(tmp_path / "a" / unet_file) == _digest(tmp_path / "b" / unet_file)  # same seed, same weights
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "a" / "tiny-sd"))
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the data, not SD's constant
    img = pipe("a red star", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)
    assert load_judge(str(tmp_path / "a" / "judge")) is not None
