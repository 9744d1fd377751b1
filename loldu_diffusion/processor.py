"""UNet injection: a diffusers attention processor that adds LoLDU deltas to the projections.

It computes attention exactly as diffusers' `AttnProcessor2_0` (or `AttnAddedKVProcessor2_0`
for attentions with `add_k_proj`), with `proj(x) + L̃ (δ ⊙ (U_r x))` in place of `proj(x)`
for each adapted projection. The base `Attention` module and its weights are untouched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer import LoLDULayer


# the projections __call__ adapts: an adapter layer on anything else would act only when fused
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")


def _key(target: str) -> str:
    return target.replace(".", "_")  # "to_out.0" → "to_out_0" (ModuleDict keys cannot hold dots)


def projection(attn: nn.Module, target: str) -> nn.Linear | None:
    mod = attn
    for part in target.split("."):
        if mod is None:
            return None
        mod = mod[int(part)] if part.isdigit() and isinstance(mod, (nn.ModuleList, nn.Sequential)) else getattr(mod, part, None)
    return mod if isinstance(mod, nn.Linear) else None


class LoLDUAttnProcessor(nn.Module):
    def __init__(self, attn: nn.Module, targets: tuple[str, ...], rank: int, previous=None):
        super().__init__()
        self.layers = nn.ModuleDict()
        for t in targets:
            proj = projection(attn, t)
            if proj is not None:
                self.layers[_key(t)] = LoLDULayer(proj, rank)
        self.targets = tuple(t for t in targets if _key(t) in self.layers)
        self._previous = [previous]  # restored by remove_loldu; a list so it is not a submodule

    @property
    def previous(self):
        return self._previous[0]

    def layer(self, target: str) -> LoLDULayer | None:
        return self.layers[_key(target)] if _key(target) in self.layers else None

    def add_layer(self, target: str, layer: LoLDULayer) -> None:
        self.layers[_key(target)] = layer
        self.targets = self.targets + (target,)

    def _proj(self, proj: nn.Module, key: str, x: torch.Tensor) -> torch.Tensor:
        out = proj(x)
        if key in self.layers:
            delta = self.layers[key](x)
            if delta is not None:
                out = out + delta
        return out

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if attn.add_k_proj is not None:
            return self._added_kv(attn, hidden_states, encoder_hidden_states, attention_mask)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = self._proj(attn.to_q, "to_q", hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = self._proj(attn.to_k, "to_k", encoder_hidden_states)
        value = self._proj(attn.to_v, "to_v", encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N, hd)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = self._proj(attn.to_out[0], "to_out_0", hidden_states)
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _added_kv(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        residual = hidden_states
        hidden_states = hidden_states.view(hidden_states.shape[0], hidden_states.shape[1], -1).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size, out_dim=4)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.head_to_batch_dim(self._proj(attn.to_q, "to_q", hidden_states), out_dim=4)
        ek = attn.head_to_batch_dim(self._proj(attn.add_k_proj, "add_k_proj", encoder_hidden_states), out_dim=4)
        ev = attn.head_to_batch_dim(self._proj(attn.add_v_proj, "add_v_proj", encoder_hidden_states), out_dim=4)
        if not attn.only_cross_attention:
            key = attn.head_to_batch_dim(self._proj(attn.to_k, "to_k", hidden_states), out_dim=4)
            value = attn.head_to_batch_dim(self._proj(attn.to_v, "to_v", hidden_states), out_dim=4)
            key = torch.cat([ek, key], dim=2)
            value = torch.cat([ev, value], dim=2)
        else:
            key, value = ek, ev

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, residual.shape[1])
        hidden_states = self._proj(attn.to_out[0], "to_out_0", hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        hidden_states = hidden_states.transpose(-1, -2).reshape(residual.shape)
        return hidden_states + residual
