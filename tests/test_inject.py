"""Injection into a tiny UNet and CLIP text encoders: exactness, what trains, fuse, blend."""
import types

import pytest
import torch

from loldu_diffusion import (LoLDUConfig, adapter_names, fuse_loldu, inject_loldu, iter_layers, load_adapter,
                             loldu_disabled, loldu_parameters, remove_loldu, save_adapter, set_adapter_weights,
                             unfuse_loldu)
from loldu_diffusion.config import DEFAULT_TEXT_ENCODER_TARGETS
from tiny import tiny_text_encoder, tiny_unet, unet_inputs

TE = DEFAULT_TEXT_ENCODER_TARGETS


def unet_out(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def te_out(te, ids):
    with torch.no_grad():
        return te(ids)[0]


def train_steps(model, loss_fn, steps=3, lr=5e-2):
    opt = torch.optim.Adam(loldu_parameters(model), lr)
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()


def trained_unet(seed, init="lu", rank=4, name="default"):
    unet = tiny_unet()
    inputs = unet_inputs(unet)
    inject_loldu(unet, LoLDUConfig(rank=rank, init=init), adapter_name=name)
    torch.manual_seed(seed)
    target = torch.randn_like(inputs[0])
    train_steps(unet, lambda: (unet(*inputs).sample - target).pow(2).mean())
    return unet, inputs


@pytest.mark.parametrize("init", ["lu", "uniform", "constant", "normal", "ones", "zeros"])
def test_unet_output_identical_at_injection_for_every_init(init):
    unet = tiny_unet()
    inputs = unet_inputs(unet)
    ref = unet_out(unet, inputs)
    inject_loldu(unet, LoLDUConfig(rank=4, init=init))
    assert torch.equal(unet_out(unet, inputs), ref)


def test_only_z_and_sigma_get_gradients_and_training_changes_output():
    unet = tiny_unet()
    inputs = unet_inputs(unet)
    ref = unet_out(unet, inputs)
    layers = inject_loldu(unet, LoLDUConfig(rank=4))
    n_attn = sum(1 for n in unet.attn_processors)
    assert len(layers) == n_attn * 4
    params = loldu_parameters(unet)
    assert sum(p.numel() for p in params) == len(layers) * (4 + 1)
    unet(*inputs).sample.pow(2).mean().backward()
    with_grad = [n for n, p in unet.named_parameters() if p.grad is not None]
    assert len(with_grad) == len(params) and all(n.endswith((".z", ".sigma")) for n in with_grad)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)  # σ learns too
    train_steps(unet, lambda: unet(*inputs).sample.pow(2).mean())
    assert (unet_out(unet, inputs) - ref).abs().max() > 1e-3


def test_save_load_on_fresh_base_reproduces_output(tmp_path):
    unet, inputs = trained_unet(0)
    out = unet_out(unet, inputs)
    path = tmp_path / "concept.safetensors"
    f = save_adapter(unet, str(path), metadata={"instance_prompt": "a photo of sks star"})
    assert f.metadata["rank"] == 4 and f.metadata["init"] == "lu" and f.num_layers == len(list(iter_layers(unet)))
    fresh = tiny_unet()
    load_adapter(fresh, str(path), adapter_name="dog")
    assert adapter_names(fresh) == ["dog"]
    assert torch.allclose(unet_out(fresh, inputs), out, atol=1e-5, rtol=1e-5)
    assert loldu_parameters(fresh) == []  # a loaded adapter is not trainable


def test_fuse_equals_unfused_and_unfuse_restores_base():
    unet, inputs = trained_unet(0)
    base = {k: v.clone() for k, v in unet.state_dict().items() if "processor" not in k}
    out = unet_out(unet, inputs)
    fuse_loldu(unet)
    assert torch.allclose(unet_out(unet, inputs), out, atol=1e-5, rtol=1e-5)
    changed = [k for k, v in unet.state_dict().items() if k in base and not torch.equal(v, base[k])]
    assert changed and all(k.endswith("weight") for k in changed)
    with pytest.raises(RuntimeError, match="unfuse"):
        set_adapter_weights(unet, {"default": 0.5})
    unfuse_loldu(unet)
    for k, v in base.items():
        cur = unet.state_dict()[k]
        assert (cur - v).abs().max() <= 1e-6 * max(v.abs().max(), 1e-12), k
    assert torch.allclose(unet_out(unet, inputs), out, atol=1e-5)


def test_remove_restores_processors_and_output():
    unet = tiny_unet()
    inputs = unet_inputs(unet)
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    ref = unet_out(unet, inputs)
    inject_loldu(unet, LoLDUConfig(rank=4))
    train_steps(unet, lambda: unet(*inputs).sample.pow(2).mean())
    remove_loldu(unet)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert torch.equal(unet_out(unet, inputs), ref)
    assert not any("processor" in k for k in unet.state_dict())


def test_blend_of_two_adapters_equals_sum_of_their_deltas(tmp_path):
    a, inputs = trained_unet(1, rank=4)
    b, _ = trained_unet(2, rank=2)
    save_adapter(a, str(tmp_path / "a.safetensors"))
    save_adapter(b, str(tmp_path / "b.safetensors"))
    m = tiny_unet()
    load_adapter(m, str(tmp_path / "a.safetensors"), adapter_name="a", weight=0.7)
    load_adapter(m, str(tmp_path / "b.safetensors"), adapter_name="b", weight=-0.4)
    blended = unet_out(m, inputs)
    # reference: one adapter whose δ is the weighted sum, zero-padded to rank 4
    ref = tiny_unet()
    inject_loldu(ref, LoLDUConfig(rank=4, init="zeros"))
    for (_, _, _, la), (_, _, _, lb), (_, _, _, lr) in zip(iter_layers(a), iter_layers(b), iter_layers(ref)):
        da = la.adapters["default"].delta().detach()
        db = lb.adapters["default"].delta().detach()
        with torch.no_grad():
            lr.adapters["default"].z.copy_(0.7 * da + torch.nn.functional.pad(-0.4 * db, (0, 2)))
            lr.adapters["default"].sigma.fill_(1.0)
    assert torch.allclose(blended, unet_out(ref, inputs), atol=1e-5)
    # re-weighting recomputes only δ; weight 0 silences an adapter
    set_adapter_weights(m, {"a": 1.0})
    only_a = unet_out(m, inputs)
    assert torch.allclose(only_a, unet_out(a, inputs), atol=1e-5)
    with loldu_disabled(m):
        assert torch.allclose(unet_out(m, inputs), unet_out(tiny_unet(), inputs), atol=1e-6)


def test_text_encoder_injection_keeps_base_state_dict_keys(tmp_path):
    te = tiny_text_encoder()
    keys = set(te.state_dict())
    ids = torch.tensor([[0, 5, 9, 13, 2]])
    ref = te_out(te, ids)
    layers = inject_loldu(te, LoLDUConfig(rank=4, text_encoder_targets=TE))
    assert len(layers) == 2 * 4
    assert torch.equal(te_out(te, ids), ref)
    assert keys <= set(te.state_dict()) and all(".loldu." in k for k in set(te.state_dict()) - keys)
    train_steps(te, lambda: te(ids)[0].pow(2).mean())
    out = te_out(te, ids)
    assert (out - ref).abs().max() > 1e-3
    save_adapter(te, str(tmp_path / "te.safetensors"))
    fresh = tiny_text_encoder()
    load_adapter(fresh, str(tmp_path / "te.safetensors"))
    assert torch.allclose(te_out(fresh, ids), out, atol=1e-5)
    remove_loldu(te)
    assert set(te.state_dict()) == keys and torch.equal(te_out(te, ids), ref)


def test_pipeline_with_unet_and_two_text_encoders(tmp_path):
    """An SDXL-like pipeline: both text encoders adapted when asked, not by default."""
    pipe = types.SimpleNamespace(unet=tiny_unet(), text_encoder=tiny_text_encoder(0),
                                 text_encoder_2=tiny_text_encoder(1, hidden=48, projection=True))
    assert {c for c, *_ in iter_layers(pipe)} == set()
    inject_loldu(pipe, LoLDUConfig(rank=4))
    assert {c for c, *_ in iter_layers(pipe)} == {"unet"}
    remove_loldu(pipe)
    inject_loldu(pipe, LoLDUConfig(rank=4, text_encoder_targets=TE))
    assert {c for c, *_ in iter_layers(pipe)} == {"unet", "text_encoder", "text_encoder_2"}
    ids = torch.tensor([[0, 5, 9, 2]])
    train_steps(pipe, lambda: pipe.text_encoder(ids)[0].pow(2).mean() + pipe.text_encoder_2(ids)[0].pow(2).mean())
    f = save_adapter(pipe, str(tmp_path / "xl.safetensors"))
    assert set(f.layers) == {"unet", "text_encoder", "text_encoder_2"}
    fresh = types.SimpleNamespace(unet=tiny_unet(), text_encoder=tiny_text_encoder(0),
                                  text_encoder_2=tiny_text_encoder(1, hidden=48, projection=True))
    load_adapter(fresh, str(tmp_path / "xl.safetensors"))
    assert torch.allclose(te_out(fresh.text_encoder_2, ids), te_out(pipe.text_encoder_2, ids), atol=1e-5)


def test_fp16_base_keeps_fp32_factors_and_values():
    unet = tiny_unet().half()
    layers = inject_loldu(unet, LoLDUConfig(rank=4))
    assert all(l.L.dtype == l.U.dtype == torch.float32 for l in layers)
    assert all(p.dtype == torch.float32 for p in loldu_parameters(unet))
    x = torch.randn(1, 5, layers[0].U.shape[1]).half()
    assert layers[0](x) is not None and layers[0](x).dtype == torch.float16


def test_bad_config_and_targets():
    with pytest.raises(ValueError, match="init must be one of"):
        LoLDUConfig(init="svd")
    with pytest.raises(ValueError, match="not found"):
        inject_loldu(tiny_unet(), LoLDUConfig(rank=4, unet_targets=("to_qq",)))
    unet = tiny_unet()
    inject_loldu(unet, LoLDUConfig(rank=4))
    with pytest.raises(ValueError, match="already injected"):
        inject_loldu(unet, LoLDUConfig(rank=4))


def test_text_encoder_layer_names_are_canonical_across_transformers_versions(tmp_path):
    """transformers 5's CLIPTextModel has no 'text_model.' level, CLIPTextModelWithProjection
    has; files name layers the HF-checkpoint way and load on either."""
    plain, proj = tiny_text_encoder(0), tiny_text_encoder(0, projection=True)
    inject_loldu(plain, LoLDUConfig(rank=4, init="uniform", text_encoder_targets=TE))
    inject_loldu(proj, LoLDUConfig(rank=4, init="uniform", text_encoder_targets=TE))
    assert {m for _, m, _, _ in iter_layers(plain)} == {m for _, m, _, _ in iter_layers(proj)}
    assert all(m.startswith("text_model.encoder.layers.") for _, m, _, _ in iter_layers(plain))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in loldu_parameters(plain):
            p.add_(0.1)
    save_adapter(plain, str(tmp_path / "te.safetensors"))
    ids = torch.tensor([[0, 5, 9, 13, 2]])
    target = tiny_text_encoder(0, projection=True)
    load_adapter(target, str(tmp_path / "te.safetensors"))
    assert torch.allclose(target.text_model(ids)[0], plain(ids)[0], atol=1e-5)


def test_scoped_targets_select_cross_attention_only_as_peft_does(tmp_path):
    """'attn2.to_k,attn2.to_v' is Custom Diffusion's choice (cross-attention K/V only); the
    scope matches module paths the way PEFT's target_modules suffix matching does."""
    from peft import LoraConfig

    unet = tiny_unet()
    inputs = unet_inputs(unet)
    ref = unet_out(unet, inputs)
    inject_loldu(unet, LoLDUConfig(rank=4, unet_targets=("attn2.to_k", "attn2.to_v")))
    ours = sorted(f"{path}.{t}" for _, path, t, _ in iter_layers(unet))
    peft_unet = tiny_unet()
    peft_unet.add_adapter(LoraConfig(r=1, target_modules=["attn2.to_k", "attn2.to_v"]))
    theirs = sorted(n.rsplit(".lora_A", 1)[0] for n, _ in peft_unet.named_modules() if n.endswith("lora_A"))
    assert ours == theirs
    assert ours and all(n.rsplit(".", 2)[1:] in (["attn2", "to_k"], ["attn2", "to_v"]) for n in ours)
    train_steps(unet, lambda: (unet(*inputs).sample - ref * 0.5).pow(2).mean())
    path = tmp_path / "kv.safetensors"
    save_adapter(unet, str(path))
    fresh = tiny_unet()
    load_adapter(fresh, str(path))
    assert torch.allclose(unet_out(fresh, inputs), unet_out(unet, inputs), atol=1e-6)
    assert not torch.allclose(unet_out(fresh, inputs), ref, atol=1e-4)
    with pytest.raises(ValueError, match="attn3.to_k"):
        inject_loldu(tiny_unet(), LoLDUConfig(rank=4, unet_targets=("attn3.to_k",)))


def test_a_rank_above_a_layers_full_rank_stops_at_it_and_round_trips(tmp_path):
    """rank 48 on a UNet of 32- and 64-wide projections: the 32-wide layers train at their full
    rank 32, the file pads their rows (pivot −1, δ = d = 0), and loading, blending and reading
    the file give back the trained model."""
    from loldu_diffusion import AdapterFile
    from loldu_diffusion.adapter_file import AdapterFileError
    from loldu_diffusion.pipeline import blend_files
    from loldu_diffusion.sites import sites_for
    from tiny import craft

    unet, inputs = trained_unet(3, rank=48)
    ranks = {(m, t): layer.rank for _, m, t, layer in iter_layers(unet)}
    assert ranks == {(m, t): min(48, *sites_for("unet").linear(unet, m, t).weight.shape) for m, t in ranks}
    assert set(ranks.values()) == {32, 48}
    trained = unet_out(unet, inputs)
    path = str(tmp_path / "full.safetensors")
    save_adapter(unet, path)
    f = AdapterFile.read(path)
    assert f.rank == 48 and f.num_parameters == sum(ranks.values())
    assert f.row_ranks("unet").tolist() == [ranks[row] for row in f.layers["unet"]]
    short = f.row_ranks("unet") < 48
    assert (f.pivots["unet"][short, 32:] == -1).all() and (f.delta["unet"][short, 32:] == 0).all()
    m = tiny_unet()
    load_adapter(m, path)
    assert {(mm, t): layer.rank for _, mm, t, layer in iter_layers(m)} == ranks
    assert torch.allclose(unet_out(m, inputs), trained, atol=1e-5)
    # a blend of files with padded rows and a rank-4 file equals the runtime blend
    small, _ = trained_unet(4, rank=4)
    save_adapter(small, str(tmp_path / "small.safetensors"))
    blend = blend_files([f"{path}:0.5", f"{tmp_path / 'small.safetensors'}:0.5"])
    blend.save(str(tmp_path / "blend.safetensors"))
    one, two = tiny_unet(), tiny_unet()
    load_adapter(one, str(tmp_path / "blend.safetensors"))
    load_adapter(two, path, adapter_name="a", weight=0.5)
    load_adapter(two, str(tmp_path / "small.safetensors"), adapter_name="b", weight=0.5)
    assert torch.allclose(unet_out(one, inputs), unet_out(two, inputs), atol=1e-5)
    # padding only at the end of a row, only with δ = d = 0, and only where the layer is at its full rank
    i, j = int(short.nonzero()[0, 0]), int((~short).nonzero()[0, 0])
    for edit, match in ((lambda t: t["unet.pivots"][i].__setitem__(0, -1), "only trailing −1s"),
                        (lambda t: t["unet.delta"][i].__setitem__(40, 1e-3), "not 0 where"),
                        (lambda t: t["unet.pivots"][j].__setitem__(slice(40, None), -1), "not 0 where")):  # a trained δ there
        bad = craft(path, str(tmp_path / "bad.safetensors"), tensors=edit)
        with pytest.raises(AdapterFileError, match=match):
            AdapterFile.read(bad)

    def pad_a_wide_row(t):
        t["unet.pivots"][j, 40:], t["unet.delta"][j, 40:], t["unet.d"][j, 40:] = -1, 0, 0
    bad = craft(path, str(tmp_path / "bad.safetensors"), tensors=pad_a_wide_row)
    with pytest.raises(AdapterFileError, match="rank 40 does not fit the layer's"):
        load_adapter(tiny_unet(), bad)


def test_finding_sites_does_not_walk_the_loaded_adapters():
    """Loading the N-th adapter looked for attentions and projections with a walk over every
    module, LoLDU's own included, which grow with each adapter loaded (at SD size 69 → 191 ms
    per load over 60 adapters). The walk skips them: same paths, in named_modules' order, and
    as many however many adapters are loaded."""
    from loldu_diffusion.config import DEFAULT_TEXT_ENCODER_TARGETS
    from loldu_diffusion.pipeline import load_base
    from loldu_diffusion.sites import base_modules

    pipe = load_base()
    before = {c: [p for p, _ in base_modules(getattr(pipe, c))] for c in ("unet", "text_encoder")}
    for name in ("a", "b", "c"):
        inject_loldu(pipe, LoLDUConfig(rank=4, text_encoder_targets=DEFAULT_TEXT_ENCODER_TARGETS), adapter_name=name)
    for c, paths in before.items():
        comp = getattr(pipe, c)
        base_only = [p for p, _ in comp.named_modules() if not any(part in ("processor", "loldu") for part in p.split("."))]
        assert [p for p, _ in base_modules(comp)] == paths == base_only
        assert len(list(comp.modules())) > len(paths) + 3 * 10  # the adapters' own modules are there, just not walked
