"""The authors' formulation of LoLDU, re-implemented from METHODS.md as a speed reference:

    W' = W_res + σ · P · L · diag(z) · U      (rebuilt densely on every forward)

with P a dense out × out permutation matrix, as in the released code. Same function as
`LoLDULayer` (at init the output equals the base); only the cost differs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ldu import decompose_ldu
from ..processor import projection


class AuthorsLoLDULinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        f = decompose_ldu(base.weight, rank)
        out_f = base.weight.shape[0]
        P = torch.zeros(out_f, out_f, dtype=torch.float64)
        rest = torch.ones(out_f, dtype=torch.bool)
        rest[f.pivots] = False
        perm = torch.cat([f.pivots, torch.arange(out_f)[rest]])
        P[perm, torch.arange(out_f)] = 1.0  # W = P (L U): row i of L U goes to row perm[i]
        L = f.L[perm]  # pivot order
        dev, dt = base.weight.device, base.weight.dtype
        self.register_buffer("P", P.to(dev, dt))
        self.register_buffer("L", L.to(dev, dt))
        self.register_buffer("U", f.U.to(dev, dt))
        z0 = f.d.to(dev, dt)
        self.z = nn.Parameter(z0.clone())
        self.sigma = nn.Parameter(torch.ones((), device=dev, dtype=dt))
        self.register_buffer("W_res", (base.weight.detach() - self.P @ (self.L @ torch.diag(z0) @ self.U)).to(dt))
        self.bias = base.bias

    def forward(self, x):
        w = self.W_res + self.sigma * (self.P @ (self.L @ torch.diag(self.z) @ self.U))
        return F.linear(x, w, self.bias)


def inject_authors(unet: nn.Module, rank: int, targets=("to_q", "to_k", "to_v", "to_out.0")) -> list[nn.Parameter]:
    """Replace each targeted projection of every attention by AuthorsLoLDULinear."""
    params = []
    unet.requires_grad_(False)
    for attn in [m for m in unet.modules() if hasattr(m, "set_processor")]:
        for t in targets:
            base = projection(attn, t)
            if base is None:
                continue
            new = AuthorsLoLDULinear(base, rank)
            if t == "to_out.0":
                attn.to_out[0] = new
            else:
                setattr(attn, t, new)
            params += [new.z, new.sigma]
    return params
