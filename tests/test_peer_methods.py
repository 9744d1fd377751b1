"""The learning benchmark's peers, trained by the same trainer: VeRA and IA³ (PEFT, on LoLDU's
UNet targets), textual inversion (one token embedding) and full fine-tuning restricted to the
attention projections. Each trains only what it claims, and its output file changes the model."""
import os
import types

import pytest
import torch

from loldu_diffusion.training import parse_args, train
from loldu_diffusion.training.args import resolve_defaults
from loldu_diffusion.training.models import load_models, make_pipeline
from loldu_diffusion.training.methods import make_method


def _args(base, concept, out, method, *extra):
    return resolve_defaults(parse_args([
        "--pretrained_model_name_or_path", base, "--instance_data_dir", concept, "--instance_prompt", "a photo of sks heart",
        "--class_prompt", "a photo of a heart", "--num_validation_images", "1", "--num_inference_steps", "2", "--report_to", "none",
        "--output_dir", str(out), "--method", method, "--max_train_steps", "3", "--learning_rate", "5e-2", *extra]))


def _image(pipe):
    return pipe("a photo of sks heart", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                height=32, width=32).images


@pytest.mark.parametrize("method,extra,trained", [
    ("vera", (), lambda n: "vera_lambda" in n),
    ("ia3", (), lambda n: "ia3_l" in n),
    ("full", ("--full_targets", "to_q,to_k,to_v,to_out.0"), lambda n: any(f".{t}.weight" in n or f".{t}.bias" in n for t in ("to_q", "to_k", "to_v", "to_out.0"))),
])
def test_unet_peer_trains_only_its_own_values(tiny_sd_path, concept_dir, tmp_path, method, extra, trained):
    args = _args(tiny_sd_path, concept_dir, tmp_path / method, method, *extra)
    m = load_models(args)
    before = {n: p.detach().clone() for n, p in m.unet.named_parameters()}
    params = make_method(args).setup(types.SimpleNamespace(unet=m.unet, text_encoder=m.text_encoder, text_encoder_2=None, tokenizer=m.tokenizer))
    names = {n for n, p in m.unet.named_parameters() if any(p is q for q in params)}
    assert names and all(trained(n) for n in names)
    assert all(not p.requires_grad for n, p in m.unet.named_parameters() if n not in names)
    if method == "full":  # the attention-only variant leaves every other UNet weight out
        assert len(names) < len(before) and all(n in before for n in names)

    summary = train(args)
    base = make_pipeline(load_models(args), load_models(args).unet, args)
    m2 = load_models(args)
    tuned = make_pipeline(m2, m2.unet, args)
    make_method(args).load_output(tuned, str(tmp_path / method))
    assert summary["trainable_parameters"] == sum(p.numel() for p in params)
    assert not torch.allclose(_image(base), _image(tuned))


def test_textual_inversion_trains_one_embedding(tiny_sd_path, concept_dir, tmp_path):
    from safetensors.torch import load_file

    args = _args(tiny_sd_path, concept_dir, tmp_path / "ti", "ti")
    summary = train(args)
    m = load_models(args)
    assert summary["trainable_parameters"] == m.text_encoder.config.hidden_size
    saved = load_file(os.path.join(tmp_path / "ti", "learned_embeds.safetensors"))
    assert list(saved) == ["sks"] and saved["sks"].shape == (1, m.text_encoder.config.hidden_size)
    pipe = make_pipeline(m, m.unet, args)
    before = _image(pipe)
    other = pipe("a photo of a heart", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt", height=32, width=32).images
    make_method(args).load_output(pipe, str(tmp_path / "ti"))
    assert not torch.allclose(before, _image(pipe))  # the identifier now means something
    after_other = pipe("a photo of a heart", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt", height=32, width=32).images
    assert torch.equal(other, after_other)  # and nothing else changed


def test_ti_needs_an_identifier(tiny_sd_path, concept_dir, tmp_path):
    args = _args(tiny_sd_path, concept_dir, tmp_path / "ti", "ti")
    args.instance_prompt, args.class_prompt = "a photo of a heart", "a photo of a heart"
    with pytest.raises(ValueError, match="--placeholder_token"):
        make_method(args)
    # the identifier is the rare word the class prompt lacks, not the first missing word ('photo' against "a dog")
    from loldu_diffusion.training.methods import placeholder_token

    prompts = lambda i, c: types.SimpleNamespace(placeholder_token=None, instance_prompt=i, class_prompt=c)  # noqa: E731
    assert placeholder_token(prompts("a photo of sks dog", "a dog")) == "sks"
    assert placeholder_token(prompts("a photo of sks dog", "a photo of a dog")) == "sks"
    assert placeholder_token(prompts("a photo of my dog", "a dog")) == "photo"  # no rare word: the first one missing


def test_pivotal_tuning_trains_the_adapter_and_the_identifier_embedding_and_resumes(tiny_sd_path, concept_dir, tmp_path):
    """--train_text_encoder_ti: the LoLDU adapter and the identifier's embedding train together;
    both files are written and reload to the trained pipeline; a resumed run gives the same."""
    from safetensors.torch import load_file

    args = _args(tiny_sd_path, concept_dir, tmp_path / "pt", "loldu", "--train_text_encoder_ti", "--rank", "4",
                 "--checkpointing_steps", "2")
    summary = train(args)
    m = load_models(args)
    hidden = m.text_encoder.config.hidden_size
    emb = load_file(os.path.join(tmp_path / "pt", "learned_embeds.safetensors"))["sks"]
    init = m.text_encoder.get_input_embeddings().weight[m.tokenizer("heart", add_special_tokens=False).input_ids].mean(0)
    assert emb.shape == (1, hidden) and not torch.allclose(emb[0], init)  # it trained from the class word's embedding
    adapter = load_file(os.path.join(tmp_path / "pt", "loldu_adapter.safetensors"))["unet.delta"]
    assert adapter.abs().sum() > 0
    n_layers = adapter.shape[0]
    assert summary["trainable_parameters"] == n_layers * (4 + 1) + hidden
    pipe = make_pipeline(m, m.unet, args)
    base = _image(pipe)
    make_method(args).load_output(pipe, str(tmp_path / "pt"))
    assert not torch.allclose(base, _image(pipe))
    # what a user loads (the adapter, and the embedding with --embedding) draws what the trainer's pipeline drew
    from loldu_diffusion import load_adapter
    from loldu_diffusion.embeddings import load_token_embeddings

    m2 = load_models(args)
    user = make_pipeline(m2, m2.unet, args)
    load_adapter(user, os.path.join(tmp_path / "pt", "loldu_adapter.safetensors"))
    without = _image(user)
    assert load_token_embeddings(user, os.path.join(tmp_path / "pt", "learned_embeds.safetensors")) == ["sks"]
    torch.testing.assert_close(_image(user), _image(pipe), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(without, _image(pipe))  # the embedding is part of what was learnt
    # killed after step 2: resuming gives the same files
    resumed = _args(tiny_sd_path, concept_dir, tmp_path / "pt2", "loldu", "--train_text_encoder_ti", "--rank", "4",
                    "--checkpointing_steps", "2", "--max_train_steps", "2")
    train(resumed)
    resumed.max_train_steps, resumed.resume_from_checkpoint = 3, "latest"
    os.remove(os.path.join(tmp_path / "pt2", "loldu_adapter.safetensors"))
    train(resumed)
    torch.testing.assert_close(load_file(os.path.join(tmp_path / "pt2", "learned_embeds.safetensors"))["sks"], emb, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(load_file(os.path.join(tmp_path / "pt2", "loldu_adapter.safetensors"))["unet.delta"], adapter, atol=1e-6, rtol=1e-5)


def test_pivotal_tuning_works_with_lora_too(tiny_sd_path, concept_dir, tmp_path):
    """--method lora --train_text_encoder_ti (diffusers' advanced script's pivotal LoRA) trains the
    embedding beside the LoRA, as with LoLDU; it used to be ignored without a word."""
    from safetensors.torch import load_file

    args = _args(tiny_sd_path, concept_dir, tmp_path / "lora", "lora", "--train_text_encoder_ti", "--rank", "2")
    summary = train(args)
    m = load_models(args)
    init = m.text_encoder.get_input_embeddings().weight[m.tokenizer("heart", add_special_tokens=False).input_ids].mean(0)
    emb = load_file(os.path.join(tmp_path / "lora", "learned_embeds.safetensors"))["sks"][0]
    assert not torch.allclose(emb, init)
    plain = train(_args(tiny_sd_path, concept_dir, tmp_path / "plain", "lora", "--rank", "2"))
    assert summary["trainable_parameters"] == plain["trainable_parameters"] + m.text_encoder.config.hidden_size
    pipe = make_pipeline(m, m.unet, args)
    make_method(args).load_output(pipe, str(tmp_path / "lora"))
    m2 = load_models(args)
    lora_only = make_pipeline(m2, m2.unet, args)
    make_method(_args(tiny_sd_path, concept_dir, tmp_path / "plain", "lora", "--rank", "2")).load_output(lora_only, str(tmp_path / "lora"))
    assert not torch.allclose(_image(pipe), _image(lora_only))  # the embedding is part of the output
    with pytest.raises(ValueError, match="--method ti trains only that embedding: drop one"):
        _args(tiny_sd_path, concept_dir, tmp_path / "z", "ti", "--train_text_encoder_ti")


def test_ti_norm_fixed_trains_the_direction_only(tiny_sd_path, concept_dir, tmp_path):
    """--ti_norm fixed: the saved embedding keeps the class word's norm and moves in direction;
    free (the default) lets the norm grow."""
    from safetensors.torch import load_file

    m = load_models(_args(tiny_sd_path, concept_dir, tmp_path / "x", "ti"))
    init = m.text_encoder.get_input_embeddings().weight[m.tokenizer("heart", add_special_tokens=False).input_ids].mean(0)
    saved = {}
    for norm in ("free", "fixed"):
        train(_args(tiny_sd_path, concept_dir, tmp_path / norm, "loldu", "--train_text_encoder_ti", "--rank", "2",
                    "--ti_norm", norm, "--learning_rate", "0.2"))
        saved[norm] = load_file(os.path.join(tmp_path / norm, "learned_embeds.safetensors"))["sks"][0]
    assert saved["fixed"].norm().item() == pytest.approx(init.norm().item(), rel=1e-5)
    assert torch.nn.functional.cosine_similarity(saved["fixed"], init, dim=0) < 0.999  # its direction trained
    assert abs(saved["free"].norm().item() - init.norm().item()) > 1e-3
    with pytest.raises(ValueError, match="--ti_norm is for a trained token embedding"):
        _args(tiny_sd_path, concept_dir, tmp_path / "y", "loldu", "--ti_norm", "fixed")


def test_a_method_set_up_again_on_a_fresh_base_holds_one_embedding(tiny_sd_path, concept_dir, tmp_path):
    """The learning bench sets one method up on a fresh base at each checkpoint it judges: the embedding of an earlier
    setup is forgotten (a second one was kept, and loading a checkpoint then asked for a second table's row)."""
    args = _args(tiny_sd_path, concept_dir, tmp_path / "again", "loldu", "--train_text_encoder_ti", "--rank", "2")
    method = make_method(args)
    for _ in range(2):
        m = load_models(args)
        models = types.SimpleNamespace(unet=m.unet, text_encoder=m.text_encoder, text_encoder_2=None, tokenizer=m.tokenizer)
        method.setup(models)
        state = method.trainable_state(models)
        method.load_trainable_state(models, state)
    assert len(method.text_side_parameters()) == 1 and sum(k.endswith("token_embedding") for k in state) == 1


def test_ti_only_steps_hold_the_adapter_still_while_the_embedding_trains(tiny_sd_path, concept_dir, tmp_path, capsys):
    """--ti_only_steps N: pivotal tuning's inversion phase first — for N steps only the identifier's
    embedding moves (the adapter is exactly its initial value), then both train. A resume whose
    phase differs from the one its checkpoint's run began with says so."""
    from safetensors.torch import load_file

    from loldu_diffusion.training.checkpoints import TRAINABLE_FILE
    from loldu_diffusion.training.methods import TextualInversionMethod

    out = tmp_path / "pivot"
    train(_args(tiny_sd_path, concept_dir, out, "loldu", "--train_text_encoder_ti", "--rank", "2", "--ti_only_steps", "2",
                "--checkpointing_steps", "1", "--checkpoints_total_limit", "5"))
    states = [load_file(os.path.join(out, f"checkpoint-{s}", TRAINABLE_FILE)) for s in (1, 2, 3)]
    embedding = [TextualInversionMethod.STATE_KEY]
    adapter = [k for k in states[0] if k not in embedding]
    assert adapter
    args = _args(tiny_sd_path, concept_dir, out, "loldu", "--train_text_encoder_ti", "--rank", "2")
    m = load_models(args)
    models = types.SimpleNamespace(unet=m.unet, text_encoder=m.text_encoder, text_encoder_2=None, tokenizer=m.tokenizer)
    method = make_method(args)
    method.setup(models)
    initial = method.trainable_state(models)
    for k in adapter:  # untouched by step 1 (the init does not depend on the seed: z0 = the LDU diagonal)
        assert torch.equal(states[0][k], initial[k]), k
    for k in adapter:  # still during the inversion phase, moving after it
        assert torch.equal(states[0][k], states[1][k])
    assert any(not torch.equal(states[1][k], states[2][k]) for k in adapter)
    assert any(not torch.equal(states[0][k], states[1][k]) for k in embedding)
    capsys.readouterr()
    train(_args(tiny_sd_path, concept_dir, out, "loldu", "--train_text_encoder_ti", "--rank", "2", "--ti_only_steps", "1",
                "--resume_from_checkpoint", "checkpoint-1", "--overwrite", "--num_validation_images", "0", "--judge_images", "0"))
    assert ("note: checkpoint-1 is from a run whose embedding trained alone for its first 2 steps; this run's is 1: add "
            "--ti_only_steps 2 to resume it as it began") in capsys.readouterr().out
    with pytest.raises(ValueError, match="--ti_only_steps is the embedding's phase of pivotal tuning: add --train_text_encoder_ti"):
        _args(tiny_sd_path, concept_dir, tmp_path / "y", "loldu", "--ti_only_steps", "1")
    with pytest.raises(ValueError, match="--ti_only_steps 3: give fewer steps than the run's 3, or the adapter never trains"):
        _args(tiny_sd_path, concept_dir, tmp_path / "z", "loldu", "--train_text_encoder_ti", "--ti_only_steps", "3")
    with pytest.raises(ValueError, match="--ti_only_steps -1: give a number of steps, 0 or more"):
        _args(tiny_sd_path, concept_dir, tmp_path / "z", "loldu", "--train_text_encoder_ti", "--ti_only_steps", "-1")
    # with --num_train_epochs the run's length is known once the images are counted
    from loldu_diffusion.training.args import settle_schedule

    epochs = _args(tiny_sd_path, concept_dir, tmp_path / "e", "loldu", "--train_text_encoder_ti", "--ti_only_steps", "2",
                   "--num_train_epochs", "1", "--train_batch_size", "1")
    epochs.max_train_steps = None
    with pytest.raises(ValueError, match="--ti_only_steps 2: give fewer steps than the run's 2"):
        settle_schedule(epochs, n_images=2, num_processes=1)  # 2 images at batch 1: 2 steps
    assert settle_schedule(epochs, n_images=3, num_processes=1).ti_only_steps == 2
