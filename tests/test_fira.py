"""Fira against the steps of METHODS.md, written out by hand for a tall and a wide weight."""
import pytest
import torch

from loldu_diffusion.fira import Fira


def reference_steps(W, grads, lr, r, T, alpha, b1=0.9, b2=0.999, eps=1e-8, gamma=1.01):
    W = W.clone()
    m = v = P = prev = None
    for t, G in enumerate(grads, start=1):
        right = G.shape[0] >= G.shape[1]
        if P is None or (t - 1) % T == 0:
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            P = Vh[:r] if right else U[:, :r]
        R = G @ P.T if right else P.T @ G
        m = (1 - b1) * R if m is None else b1 * m + (1 - b1) * R
        v = (1 - b2) * R * R if v is None else b2 * v + (1 - b2) * R * R
        psi = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        if right:
            phi = psi.norm(dim=1, keepdim=True) / R.norm(dim=1, keepdim=True)
            S = phi * (G - R @ P)
            back = psi @ P
        else:
            phi = psi.norm(dim=0, keepdim=True) / R.norm(dim=0, keepdim=True)
            S = phi * (G - P @ R)
            back = P @ psi
        if prev is not None and S.norm() > gamma * prev:
            S = S * gamma * prev / S.norm()
        prev = S.norm()
        W = W - lr * (alpha * back + S)
    return W


@pytest.mark.parametrize("shape", [(24, 10), (10, 24)])
def test_fira_matches_the_written_steps(shape):
    torch.manual_seed(0)
    W0 = torch.randn(shape, dtype=torch.float64)
    grads = [torch.randn(shape, dtype=torch.float64) * (1 + k) for k in range(5)]  # growing: limiter acts
    w = torch.nn.Parameter(W0.clone())
    bias = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = Fira([w, bias], lr=0.01, rank=4, update_proj_gap=3, alpha=0.25)
    for G in grads:
        w.grad = G.clone()
        bias.grad = torch.ones(3, dtype=torch.float64)
        opt.step()
    ref = reference_steps(W0, grads, 0.01, 4, 3, 0.25)
    assert torch.allclose(w.detach(), ref, atol=1e-12, rtol=1e-10)
    assert torch.allclose(bias.detach(), torch.full((3,), -0.05, dtype=torch.float64))  # plain Adam: lr per step
    st = opt.state[w]
    assert st["m"].shape == ((shape[0], 4) if shape[0] >= shape[1] else (4, shape[1]))


def test_fira_state_is_smaller_than_adamw():
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(256, 128))
    opt = Fira([w], rank=8)
    w.grad = torch.randn_like(w)
    opt.step()
    adam_bytes = 2 * w.numel() * 4
    assert opt.state_bytes() < 0.2 * adam_bytes
