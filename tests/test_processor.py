"""LoLDUAttnProcessor computes attention exactly like diffusers' processors when δ = 0,
and like the base processor on W + L̃ diag(δ) U_r when δ ≠ 0."""
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor2_0, AttnProcessor2_0

from loldu_diffusion.processor import LoLDUAttnProcessor

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")


def make_attn(cross=None, added_kv=False, seed=0):
    torch.manual_seed(seed)
    kw = dict(query_dim=32, heads=4, dim_head=8, cross_attention_dim=cross)
    if added_kv:
        # UnCLIP-style: to_k/to_v read the hidden states, add_k_proj/add_v_proj the encoder states
        kw.update(cross_attention_dim=32, added_kv_proj_dim=cross, norm_num_groups=8, processor=AttnAddedKVProcessor2_0())
    return Attention(**kw).eval()


def run(attn, proc, h, enc, mask):
    with torch.no_grad():
        return proc(attn, h, encoder_hidden_states=enc, attention_mask=mask)


@pytest.mark.parametrize("cross", [None, 24])
@pytest.mark.parametrize("masked", [False, True])
def test_same_as_attnprocessor2_0_at_injection(cross, masked):
    attn = make_attn(cross)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 10, 32, generator=g)
    enc = None if cross is None else torch.randn(2, 6, cross, generator=g)
    mask = None
    if masked:
        mask = torch.zeros(2, 1, 10 if cross is None else 6)
        mask[1, :, -3:] = -10000.0
    ref = run(attn, AttnProcessor2_0(), h, enc, mask)
    proc = LoLDUAttnProcessor(attn, TARGETS, rank=4)
    assert proc.targets == ("to_q", "to_k", "to_v", "to_out.0")  # add_* absent here
    for layer in proc.layers.values():
        from loldu_diffusion.layer import LoLDUVector

        layer.add_adapter("a", LoLDUVector(layer.d.clone(), 1.0, trainable=True))
    assert torch.equal(run(attn, proc, h, enc, mask), ref)


def test_4d_input_residual_and_rescale_like_attnprocessor2_0():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8, norm_num_groups=8, residual_connection=True,
                     rescale_output_factor=2.0).eval()
    h = torch.randn(2, 32, 4, 4)
    ref = run(attn, AttnProcessor2_0(), h, None, None)
    assert torch.equal(run(attn, LoLDUAttnProcessor(attn, TARGETS, rank=4), h, None, None), ref)


def _set_random_deltas(proc, seed=2):
    from loldu_diffusion.layer import LoLDUVector

    g = torch.Generator().manual_seed(seed)
    for layer in proc.layers.values():
        layer.add_adapter("a", LoLDUVector.fixed(0.3 * torch.randn(layer.rank, generator=g)))


def _fuse_by_hand(attn, proc):
    for key, layer in proc.layers.items():
        layer.base.weight.data += layer.delta_weight(layer.delta_vector())


@pytest.mark.parametrize("cross", [None, 24])
def test_nonzero_delta_equals_base_processor_on_updated_weights(cross):
    attn = make_attn(cross)
    h = torch.randn(2, 10, 32)
    enc = None if cross is None else torch.randn(2, 6, cross)
    proc = LoLDUAttnProcessor(attn, TARGETS, rank=4)
    _set_random_deltas(proc)
    out = run(attn, proc, h, enc, None)
    _fuse_by_hand(attn, proc)
    ref = run(attn, AttnProcessor2_0(), h, enc, None)
    assert not torch.allclose(out, run(attn, proc, h, enc, None))  # side path on top of fused = twice
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_added_kv_attention():
    attn = make_attn(cross=24, added_kv=True)
    h = torch.randn(2, 32, 3, 3)
    enc = torch.randn(2, 5, 24)
    ref = run(attn, AttnAddedKVProcessor2_0(), h, enc, None)
    proc = LoLDUAttnProcessor(attn, TARGETS, rank=4)
    assert set(proc.targets) == set(TARGETS)
    assert torch.equal(run(attn, proc, h, enc, None), ref)
    _set_random_deltas(proc)
    out = run(attn, proc, h, enc, None)
    _fuse_by_hand(attn, proc)
    assert torch.allclose(out, run(attn, AttnAddedKVProcessor2_0(), h, enc, None), atol=1e-5)
