"""decompose_ldu against the top-r of torch.linalg.lu (the full LU it must reproduce)."""
import pytest
import torch

from loldu_diffusion import decompose_ldu
from loldu_diffusion.ldu import zero_pivot_tolerance


def reference_top_r(weight, r):
    P, L, U = torch.linalg.lu(weight.double())  # weight = P L U
    PL = (P @ L)[:, :r]
    d = torch.diagonal(U)[:r]
    return PL, d, U[:r], P[:, :r].argmax(0)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("shape", [(64, 64), (96, 40), (40, 96), (320, 768)])
@pytest.mark.parametrize("rank", [1, 8, 32])
def test_equals_full_lu_on_random_matrices(shape, rank):
    torch.manual_seed(sum(shape) + rank)
    W = torch.randn(shape)
    f = decompose_ldu(W, rank)
    L, d, U, piv = reference_top_r(W, rank)
    assert f.L.shape == (shape[0], rank) and f.U.shape == (rank, shape[1]) and f.d.shape == (rank,)
    assert torch.equal(f.pivots, piv)
    assert rel(f.L, L) < 1e-10 and rel(f.d, d) < 1e-10 and rel(f.U, U / d[:, None]) < 1e-10
    # L̃ in original row order: unit entries at the pivot rows; U unit upper trapezoidal
    assert torch.equal(f.L[f.pivots].triu(), torch.eye(rank, dtype=f.L.dtype))
    assert torch.equal(torch.diagonal(f.U), torch.ones(rank, dtype=f.U.dtype)) and not f.U.tril(-1).any()
    assert f.L.dtype == torch.float64


def test_fp16_rounded_weights_and_same_pivots_twice():
    torch.manual_seed(3)
    W = torch.randn(128, 80).half()
    a, b = decompose_ldu(W, 16), decompose_ldu(W.clone(), 16)
    assert torch.equal(a.pivots, b.pivots) and torch.equal(a.L, b.L) and torch.equal(a.U, b.U)
    L, d, U, piv = reference_top_r(W.double(), 16)
    assert torch.equal(a.pivots, piv) and rel(a.L, L) < 1e-10 and rel(a.U, U / d[:, None]) < 1e-10


def test_rank_deficient_panel_has_zero_pivots_and_no_division():
    torch.manual_seed(4)
    # exactly rank 3 (small integers): pivots 4.. are zero up to float64 round-off
    W = torch.randint(-4, 5, (60, 3)).double() @ torch.randint(-4, 5, (3, 50)).double()
    f = decompose_ldu(W, 8)
    L, d, U, piv = reference_top_r(W, 8)
    assert torch.isfinite(f.U).all() and torch.isfinite(f.L).all()
    assert (f.d[3:] == 0).all() and (f.d[:3].abs() > zero_pivot_tolerance(W[:, :8], 50)).all()
    assert torch.equal(f.pivots[:3], piv[:3]) and rel(f.L[:, :3], L[:, :3]) < 1e-10
    assert rel(f.U[:3], U[:3] / d[:3, None]) < 1e-10
    # the top-r product still reproduces the weight's top-r LDU part (here: all of W)
    assert rel(f.L @ torch.diag(f.d) @ f.U, W.double()) < 1e-10


def test_numerically_rank_deficient_fp32_stays_finite():
    torch.manual_seed(5)
    W = torch.randn(60, 3) @ torch.randn(3, 50)  # rank 3 only up to float32 round-off
    f = decompose_ldu(W, 8)
    assert torch.isfinite(f.U).all() and torch.isfinite(f.L).all() and f.U.abs().max() < 1e4


def test_exactly_zero_column():
    W = torch.randn(10, 6, dtype=torch.float64)
    W[:, 0] = 0
    f = decompose_ldu(W, 4)
    assert f.d[0] == 0 and torch.isfinite(f.U).all() and f.U[0, 0] == 1


@pytest.mark.parametrize("rank", [0, 41, -1])
def test_rank_out_of_range_is_a_clear_error(rank):
    with pytest.raises(ValueError, match="rank .* out of range .* 1 ≤ rank ≤ 40"):
        decompose_ldu(torch.randn(50, 40), rank)


def test_non_finite_weight_is_refused():
    W = torch.randn(8, 8)
    W[2, 1] = float("nan")  # in the panel
    with pytest.raises(ValueError, match="NaN"):
        decompose_ldu(W, 2)
    W = torch.randn(8, 8)
    W[:, 6] = float("inf")  # in every row, so in the pivot rows
    with pytest.raises(ValueError, match="NaN or infinite"):
        decompose_ldu(W, 2)


def test_prescribed_pivots_reproduce_partial_pivoting():
    torch.manual_seed(6)
    W = torch.randn(80, 50)
    f = decompose_ldu(W, 12)
    g = decompose_ldu(W, 12, pivots=f.pivots)
    assert torch.equal(g.pivots, f.pivots)
    assert rel(g.L, f.L) < 1e-10 and rel(g.d, f.d) < 1e-10 and rel(g.U, f.U) < 1e-10


def test_prescribed_pivots_on_fp16_copy_of_a_near_tie():
    """A near-tie flips under fp16 rounding; the file's pivots still give factors within fp16
    error of the originals, with |L̃| ≤ 1 up to the tie."""
    torch.manual_seed(7)
    W = torch.randn(40, 20, dtype=torch.float64)
    W[5, 0] = 3.0
    W[9, 0] = -3.0004  # partial pivoting picks row 9 in float64 ...
    W16 = W.half()  # ... but fp16 rounds both to 3.0, and LAPACK takes the first: row 5
    f, h = decompose_ldu(W, 6), decompose_ldu(W16, 6)
    assert f.pivots[0] == 9 and h.pivots[0] == 5
    g = decompose_ldu(W16, 6, pivots=f.pivots)
    assert torch.equal(g.pivots, f.pivots) and g.L.abs().max() <= 1.01
    assert rel(g.d, f.d) < 5e-3


def test_bad_prescribed_pivots():
    with pytest.raises(ValueError, match="distinct row indices"):
        decompose_ldu(torch.randn(10, 8), 3, pivots=torch.tensor([1, 1, 2]))
