"""Heterogeneous batches: each sample of one pipeline call uses its own adapter blend, and its
image equals generating it alone with that blend (same seed), guidance and text encoder included."""
import numpy as np
import pytest
import torch

from loldu_diffusion import (LoLDUConfig, fuse_loldu, inject_loldu, iter_layers, loldu_parameters, set_adapter_weights,
                             unfuse_loldu)
from loldu_diffusion.serving import generate, per_sample_adapters, set_sample_weights
from loldu_diffusion.config import DEFAULT_TEXT_ENCODER_TARGETS


@pytest.fixture(scope="module")
def pipe():
    from loldu_diffusion.pipeline import load_base

    pipe = load_base()  # the embedded base
    torch.manual_seed(0)
    # three adapters of different ranks; "a" and "c" also adapt the text encoder
    for name, rank, te in (("a", 8, True), ("b", 4, False), ("c", 2, True)):
        inject_loldu(pipe, LoLDUConfig(rank=rank, init="uniform", text_encoder_targets=DEFAULT_TEXT_ENCODER_TARGETS if te else None),
                     adapter_name=name)
    with torch.no_grad():
        for p in loldu_parameters(pipe):
            p.mul_(1 + 0.5 * torch.randn_like(p))  # adapters that change the image
            p.requires_grad_(False)
    return pipe


PROMPTS = ["a photo of sks heart", "a red star on a navy background", "a photo of a ring", "a blue square with a dot"]
BLENDS = [{"a": 1.0}, {"b": 1.0, "c": -0.7}, {}, {"a": 0.5, "b": 0.5, "c": 1.0}]
KW = dict(num_inference_steps=3, guidance_scale=4.0, output_type="np", height=64, width=64)


def tiny_unet_with_two_adapters():
    """A tiny UNet with frozen adapters "a" and "b" (rank 4) that change its output."""
    from tiny import tiny_unet

    unet = tiny_unet()
    for name in ("a", "b"):
        inject_loldu(unet, LoLDUConfig(rank=4, init="uniform"), adapter_name=name)
    with torch.no_grad():
        for p in loldu_parameters(unet):
            p.mul_(1 + 0.5 * torch.randn_like(p))
            p.requires_grad_(False)
    return unet


def alone(pipe, prompt, blend, seed):
    set_adapter_weights(pipe, blend)
    return pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **KW).images[0]


def test_each_sample_equals_generating_it_alone(pipe):
    seeds = [3, 4, 5, 6]
    batch = generate(pipe, PROMPTS, BLENDS, seeds, **KW)  # (4, 64, 64, 3)
    for b in range(len(PROMPTS)):
        ref = alone(pipe, PROMPTS[b], BLENDS[b], seeds[b])
        np.testing.assert_allclose(batch[b], ref, atol=2e-4, err_msg=f"sample {b}")
    # and the blends matter: sample 0 with sample 1's blend is another image
    assert np.abs(alone(pipe, PROMPTS[0], BLENDS[1], seeds[0]) - batch[0]).max() > 1e-2


def test_text_encoder_uses_each_samples_blend(pipe):
    tok = pipe.tokenizer(PROMPTS[:2], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad(), per_sample_adapters(pipe, BLENDS[:2]):
        both = pipe.text_encoder(tok.input_ids)[0]  # (2, 77, hidden)
    for b in range(2):
        set_adapter_weights(pipe, BLENDS[b])
        with torch.no_grad():
            ref = pipe.text_encoder(tok.input_ids[b : b + 1])[0]
        torch.testing.assert_close(both[b : b + 1], ref, atol=1e-5, rtol=1e-5)


def test_bad_input_is_one_clear_error(pipe):
    with pytest.raises(KeyError, match="unknown adapter"):
        set_sample_weights(pipe, [{"nope": 1.0}])
    with pytest.raises(ValueError, match="not finite"):
        set_sample_weights(pipe, [{"a": float("nan")}])
    with pytest.raises(ValueError, match="num_images_per_prompt must be 1"):
        generate(pipe, PROMPTS[:2], BLENDS[:2], 0, num_images_per_prompt=2, **KW)
    with pytest.raises(ValueError, match="2 prompts but 3 adapter blends"):
        generate(pipe, PROMPTS[:2], BLENDS[:3], 0, **KW)
    with per_sample_adapters(pipe, BLENDS[:3]), pytest.raises(ValueError, match="a UNet batch of 4 rows for 3 blends"):
        pipe.unet(torch.zeros(4, 4, 16, 16), 10, torch.zeros(4, 77, pipe.unet.config.cross_attention_dim))
    # diffusers lays num_images_per_prompt=2 out as [p0, p0, p1, p1]: row j mod S would draw p0's second image with p1's blend
    with per_sample_adapters(pipe, BLENDS[:2]), pytest.raises(ValueError, match="a UNet batch of 8 rows for 2 blends.*num_images_per_prompt=1"):
        pipe(PROMPTS[:2], num_images_per_prompt=2, **KW)
    np_weights = generate(pipe, PROMPTS[:1], [{"a": np.float32(1.0)}], np.int64(3), **KW)  # numpy numbers are numbers
    np.testing.assert_allclose(np_weights[0], alone(pipe, PROMPTS[0], {"a": 1.0}, 3), atol=2e-4)
    set_adapter_weights(pipe, {"a": 1.0})
    fuse_loldu(pipe)
    try:
        with pytest.raises(RuntimeError, match="fused"):
            set_sample_weights(pipe, BLENDS)
    finally:
        unfuse_loldu(pipe)
    for *_, layer in iter_layers(pipe):
        assert layer.sample_weights is None  # a refused or finished call leaves the shared blend in place


def test_per_sample_blends_train_each_samples_own_adapter():
    """While adapters train, per-sample δ's are computed live: sample b's loss reaches only its adapter."""
    from tiny import tiny_unet, unet_inputs

    unet = tiny_unet()
    for name in ("a", "b"):
        inject_loldu(unet, LoLDUConfig(rank=4, init="uniform"), adapter_name=name)
    for *_, layer in iter_layers(unet):
        for v in layer.adapters.values():  # (a second injection froze the first adapter)
            v.z.requires_grad_(True)
            v.sigma.requires_grad_(True)
    x, t, c = unet_inputs(unet, batch=2)
    with per_sample_adapters(unet, [{"a": 1.0}, {"b": 1.0}]):
        with torch.no_grad():
            for p in loldu_parameters(unet):
                p.mul_(1.5)
        out = unet(x, t, c).sample  # (2, 4, 8, 8), live
        out[0].pow(2).mean().backward()
    grads = {n: [v.z.grad for *_, layer in iter_layers(unet) for k, v in layer.adapters.items() if k == n]
             for n in ("a", "b")}
    assert all(g is not None and g.abs().sum() > 0 for g in grads["a"])
    assert all(g is None or g.abs().sum() == 0 for g in grads["b"])
    for p in loldu_parameters(unet):
        p.requires_grad_(False)
    with torch.no_grad(), per_sample_adapters(unet, [{"a": 1.0}, {"b": 1.0}]):
        cached = unet(x, t, c).sample
    torch.testing.assert_close(cached, out.detach(), atol=0, rtol=0)


def test_per_sample_rows_follow_batch_shapes_and_edits():
    """The per-row layout of the samples' δ is built once per batch shape and reused by later
    calls; a guidance-sized batch (2 S rows) and an in-place edit of an adapter still read right."""
    from tiny import unet_inputs

    unet = tiny_unet_with_two_adapters()
    x, t, c = unet_inputs(unet, batch=2)

    def alone(name, b):
        set_adapter_weights(unet, {name: 1.0})
        return unet(x[b : b + 1], t[b : b + 1], c[b : b + 1]).sample[0]

    with torch.no_grad():
        with per_sample_adapters(unet, [{"a": 1.0}, {"b": 1.0}]):
            first = unet(x, t, c).sample
            again = unet(x, t, c).sample
            for *_, layer in iter_layers(unet):
                layer.adapters["b"].z.mul_(1.5)
            edited = unet(x, t, c).sample  # same batch shape as before the edit
            doubled = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, c])).sample  # [uncond; cond]-shaped
        torch.testing.assert_close(again, first, atol=0, rtol=0)
        torch.testing.assert_close(doubled, torch.cat([edited, edited]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(edited[0], first[0], atol=0, rtol=0)
        assert (edited[1] - first[1]).abs().max() > 1e-3
        torch.testing.assert_close(edited[1], alone("b", 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(edited[0], alone("a", 0), atol=1e-5, rtol=1e-5)


def test_nested_blocks_restore_the_enclosing_blends():
    """An inner per-sample block (e.g. a library call inside a server's batch) checks its own row
    count, and leaving it brings back the outer block's blends, not the shared blend."""
    from tiny import unet_inputs

    unet = tiny_unet_with_two_adapters()
    x, _, c = unet_inputs(unet, batch=3)
    t = torch.tensor([10, 500, 900])
    with torch.no_grad():
        with per_sample_adapters(unet, [{"a": 1.0}, {"b": 1.0}, {}]):
            outer = unet(x, t, c).sample
            with per_sample_adapters(unet, [{"b": 1.0}, {"a": 1.0}]):  # 2 blends: a 2-row call, which the outer block refuses
                inner = unet(x[:2], t[:2], c[:2]).sample
            after = unet(x, t, c).sample
        set_adapter_weights(unet, {"b": 1.0})
        b_alone = unet(x[:1], t[:1], c[:1]).sample
    torch.testing.assert_close(after, outer, atol=0, rtol=0)
    torch.testing.assert_close(inner[0], b_alone[0], atol=1e-5, rtol=1e-5)
    assert all(layer.sample_weights is None for *_, layer in iter_layers(unet))


def test_one_adapter_per_sample_is_stacked_in_a_few_ops_with_the_same_values():
    """K subjects training together: every sample one adapter at weight 1. The layer stacks their
    δ in one go (a few autograd nodes, not ~4 per sample): the same bits as each δ alone, and
    gradients reach each sample's own adapter only."""
    from loldu_diffusion.layer import LoLDULayer, LoLDUVector

    torch.manual_seed(0)
    layer = LoLDULayer(torch.nn.Linear(16, 12), rank=4)
    vecs = {n: LoLDUVector(torch.randn(4), 0.5 + i, trainable=True) for i, n in enumerate("abc")}
    for n, v in vecs.items():
        layer.add_adapter(n, v)
        with torch.no_grad():
            v.z.add_(torch.randn(4))
            v.sigma.mul_(1.3)
    layer.sample_weights = [{"b": 1.0}, {"a": 1.0}, {"c": 1.0}, {"a": 1.0}]
    stacked = layer.sample_deltas()  # (4, 4), live: the vectors train
    torch.testing.assert_close(stacked, torch.stack([vecs[n].delta() for n in "baca"]), atol=0, rtol=0)
    stacked[0].sum().backward()  # sample 0 is adapter b
    assert vecs["b"].z.grad.abs().sum() > 0 and vecs["a"].z.grad.abs().sum() == vecs["c"].z.grad.abs().sum() == 0
    layer.sample_weights = [{"b": 0.5}, {"a": 1.0}]  # a weight other than 1: the general path, same values
    torch.testing.assert_close(layer.sample_deltas(), torch.stack([0.5 * vecs["b"].delta(), vecs["a"].delta()]), atol=0, rtol=0)
