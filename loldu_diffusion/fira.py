"""Fira (arXiv 2410.01623): full-rank training with Adam state kept in a rank-r subspace.

For each 2-D weight with gradient G (m × n), following METHODS.md step by step:
  1. every T steps (from the first): P = Vh[:r] of svd(G) if m ≥ n (R = G Pᵀ), else
     U[:, :r] (R = Pᵀ G); Adam moments are kept across refreshes
  2. ψ = m̂ / (√v̂ + ε), Adam on R
  3. φ = ‖ψ‖ / ‖R‖ per row (right projection) or per column (left), along the rank dimension
  4. S = φ ⊙ (G − P-back(R))                   the gradient outside the subspace, rescaled
  5. if ‖S_t‖ > γ ‖S_{t−1}‖, S_t ← S_t · γ ‖S_{t−1}‖ / ‖S_t‖  (norm-growth limiter, γ = 1.01)
  6. W ← W − η (α · P-back(ψ) + S)
Other parameters get plain AdamW. State per projected weight: 2·max(m,n)·r + the basis.

pytorch-optimizer's `Fira` multiplies the residual of step 4 by α as well (its projector's
`project_back` applies the scale); METHODS.md (and the paper's equations) do not, so this
file implements the steps as written; `tests/test_fira.py` checks them one by one.
"""
from __future__ import annotations

import torch


class Fira(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 rank=128, update_proj_gap=200, alpha=0.25, gamma=1.01):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, alpha=alpha, gamma=gamma)
        super().__init__(params, defaults)

    @staticmethod
    def projected(p: torch.Tensor, rank: int) -> bool:
        return p.dim() == 2 and min(p.shape) > rank

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                G = p.grad if p.grad.dtype in (torch.float32, torch.float64) else p.grad.float()
                state = self.state[p]
                state["step"] = t = state.get("step", 0) + 1
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                proj = self.projected(p, group["rank"])
                if proj:
                    right = G.shape[0] >= G.shape[1]
                    if "P" not in state or (t - 1) % group["update_proj_gap"] == 0:
                        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
                        state["P"] = Vh[: group["rank"]] if right else U[:, : group["rank"]]  # (r, n) | (m, r)
                    P = state["P"]
                    R = G @ P.T if right else P.T @ G  # (m, r) | (r, n)
                else:
                    R = G
                if "m" not in state:
                    state["m"] = torch.zeros_like(R)
                    state["v"] = torch.zeros_like(R)
                m, v = state["m"], state["v"]
                m.mul_(b1).add_(R, alpha=1 - b1)
                v.mul_(b2).addcmul_(R, R, value=1 - b2)
                psi = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + group["eps"])
                if not proj:
                    p.add_(psi.to(p.dtype), alpha=-group["lr"])
                    continue
                dim = 1 if right else 0  # the rank dimension
                phi = psi.norm(dim=dim, keepdim=True) / R.norm(dim=dim, keepdim=True).clamp_min(1e-30)
                back = (lambda X: X @ P) if right else (lambda X: P @ X)
                S = phi * (G - back(R))
                s_norm = S.norm()
                prev = state.get("s_norm")
                if prev is not None and s_norm > group["gamma"] * prev:
                    S.mul_(group["gamma"] * prev / s_norm)
                    s_norm = group["gamma"] * prev
                state["s_norm"] = s_norm
                update = group["alpha"] * back(psi) + S
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values() if torch.is_tensor(t))
