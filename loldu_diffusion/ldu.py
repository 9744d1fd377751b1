"""Top-r LDU factors of a weight, W = P L D U, from a panel LU (METHODS.md, LoLDU).

Partial row pivoting chooses its first r pivots from the first r columns alone, so the
top-r factors of the full LU come from the LU of the out × r panel W[:, :r] plus one
unit-lower-triangular solve for the rest of U's first r rows:

    P^T W[:, :r] = L_r U11                  L_r: out × r unit lower trapezoidal, U11: r × r
    U12 = L11^{-1} (P^T W)[:r, r:]          L11 = L_r[:r]
    d = diag(U11),  U_r = d^{-1} [U11 U12]  (unit upper trapezoidal, r × in)

Cost O((out + in)·r²) instead of O(out·in·min(out, in)). Computed in float64 on the CPU so
the same base weight always yields the same pivots, whatever device the model lives on.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class LDUFactors(NamedTuple):
    L: torch.Tensor  # (out, r) = P·L_r, rows in the weight's original order
    d: torch.Tensor  # (r,)     pivots in elimination order (0 where the panel is rank-deficient)
    U: torch.Tensor  # (r, in)  unit upper trapezoidal
    pivots: torch.Tensor  # (r,) int64: original row index of each pivot


def zero_pivot_tolerance(panel: torch.Tensor, in_features: int | None = None) -> float:
    """Pivots at or below this are treated as exact zeros (rank-deficient panel): float64
    round-off at the scale of the panel the pivots come from."""
    out_f, r = panel.shape
    return max(out_f, in_features or r) * torch.finfo(torch.float64).eps * float(panel.abs().max())


def _eliminate(panel: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian elimination of an (out × r) panel whose rows are already in pivot order."""
    n_rows, r = panel.shape
    A = panel.clone()
    L = torch.zeros_like(A)
    for k in range(r):
        L[k, k] = 1.0
        if A[k, k].abs() > tol:  # a zero pivot eliminates nothing (its multipliers stay 0)
            L[k + 1 :, k] = A[k + 1 :, k] / A[k, k]
            A[k + 1 :, k:] -= L[k + 1 :, k, None] * A[k, None, k:]
    return L, torch.triu(A[:r])


def decompose_ldu(weight: torch.Tensor, rank: int, pivots: torch.Tensor | None = None) -> LDUFactors:
    """Top-`rank` LDU factors of `weight` (out × in), float64 on the CPU.

    With `pivots` (r row indices, e.g. from an adapter file) the elimination uses those rows in
    that order instead of choosing them: a weight stored at lower precision (an fp16 copy of
    the base) can break a near-tie between two candidate pivots the other way, and the factors
    must still be the ones the adapter was trained on. Callers check |L̃| ≤ 1 (+ tolerance) to
    confirm the given pivots are partial pivots of this weight.

    A zero pivot (|d_k| ≤ `zero_pivot_tolerance`) is not divided by: d_k is set to 0 and row k
    of U keeps the eliminated row with a unit diagonal. That direction then contributes nothing
    to W (d_k = 0) but stays a valid direction for the adapter to train.
    """
    if weight.dim() != 2:
        raise ValueError(f"decompose_ldu needs a 2-D weight, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if not 1 <= rank <= min(out_f, in_f):
        raise ValueError(f"rank {rank} is out of range for a {out_f}×{in_f} weight: use 1 ≤ rank ≤ {min(out_f, in_f)}")
    # Only the out × r panel and the r pivot rows are ever read: O((out + in)·r) of the weight.
    weight = weight.detach()
    panel = weight[:, :rank].to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(panel).all():
        raise ValueError("decompose_ldu: the weight holds NaN or infinite values")
    tol = zero_pivot_tolerance(panel, in_f)
    if pivots is None:
        lu, ipiv, _ = torch.linalg.lu_factor_ex(panel)  # (out, r); info > 0 just flags a zero pivot
        perm = torch.arange(out_f)
        for k, p in enumerate((ipiv - 1).tolist()):  # LAPACK swaps, applied in order
            perm[[k, p]] = perm[[p, k]]
        L_panel = torch.tril(lu, -1)
        L_panel[:rank].fill_diagonal_(1.0)  # (out, r) unit lower trapezoidal, pivoted row order
        U11 = torch.triu(lu[:rank])  # (r, r)
    else:
        pivots = pivots.to("cpu", torch.int64)
        if pivots.shape != (rank,) or len(set(pivots.tolist())) != rank or int(pivots.min()) < 0 or int(pivots.max()) >= out_f:
            raise ValueError(f"pivots must be {rank} distinct row indices below {out_f}")
        rest = torch.ones(out_f, dtype=torch.bool)
        rest[pivots] = False
        perm = torch.cat([pivots, torch.arange(out_f)[rest]])
        L_panel, U11 = _eliminate(panel[perm], tol)
    rows = weight[perm[:rank].to(weight.device)].to(device="cpu", dtype=torch.float64)  # (r, in): the pivot rows of W
    if not torch.isfinite(rows).all():
        raise ValueError("decompose_ldu: the weight holds NaN or infinite values")
    U12 = torch.linalg.solve_triangular(L_panel[:rank], rows[:, rank:], upper=False, unitriangular=True)
    U_raw = torch.cat([U11, U12], dim=1)  # (r, in) = D U_r

    d = torch.diagonal(U11).clone()
    zero = d.abs() <= tol
    d[zero] = 0.0
    scale = torch.where(zero, torch.ones_like(d), d)
    U = U_raw / scale[:, None]
    idx = torch.arange(rank)
    U[idx, idx] = 1.0

    L = torch.empty_like(L_panel)
    L[perm] = L_panel  # back to the weight's own row order: L̃ = P L_r
    return LDUFactors(L, d, U, perm[:rank].clone())
