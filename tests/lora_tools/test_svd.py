"""lora_tools/svd.py: SVDs that reproduce what they factor, best rank-k approximations, and sd-scripts'
rank rules on spectra whose ranks are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lora_scripts.lora_tools.svd import choose_rank, low_rank, retained_fro, svd, svd_of_product


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q


def _known_matrix(s: list[float], out: int = 40, n: int = 50) -> torch.Tensor:
    """U diag(s) Vᵀ with random orthonormal U [out, k], V [n, k]: a matrix whose singular values are `s`."""
    u, v = _orthonormal(out, len(s), 1), _orthonormal(n, len(s), 2)
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


SPECTRUM = [10.0, 6.0, 3.0, 1.0, 0.5, 0.2, 0.1, 0.05]


@pytest.mark.parametrize(
    ("out", "rank", "n"), [(40, 6, 50), (3, 6, 10), (20, 6, 4)], ids=["thin", "r>out", "r>n"]
)
def test_svd_of_product_is_the_svd_of_the_product(out, rank, n):
    gen = torch.Generator().manual_seed(0)
    up, down = torch.randn(out, rank, generator=gen), torch.randn(rank, n, generator=gen)
    product = up.double() @ down.double()
    result = svd_of_product(up, down)
    assert len(result.s) == min(out, rank, n)
    torch.testing.assert_close(
        result.s, torch.linalg.svdvals(product)[: len(result.s)], rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(result.u @ torch.diag(result.s) @ result.vh, product, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        result.u.T @ result.u, torch.eye(len(result.s), dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_low_rank_is_the_best_approximation_and_returns_every_singular_value():
    matrix = _known_matrix(SPECTRUM)
    up, down, s = low_rank(matrix, 3)
    assert up.shape == (40, 3) and down.shape == (3, 50) and up.dtype == torch.float32
    torch.testing.assert_close(
        s[:8].double(), torch.tensor(SPECTRUM, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )
    assert len(s) == 40 and float(s[8:].abs().max()) < 1e-5
    best = _known_matrix(SPECTRUM[:3] + [0.0] * 5)  # the same singular vectors, the tail dropped
    torch.testing.assert_close((up @ down).double(), best, rtol=0, atol=1e-5)
    # Eckart–Young: the error is the dropped singular values' norm
    error = torch.linalg.matrix_norm((up @ down).double() - matrix)
    assert float(error) == pytest.approx(math.sqrt(sum(x * x for x in SPECTRUM[3:])), rel=1e-4)
    up, down, _ = low_rank(matrix[:5], 16)  # never more than the matrix has
    assert up.shape == (5, 5) and down.shape == (5, 50)


def test_svd_takes_matrices_only():
    with pytest.raises(ValueError, match="2-D matrix"):
        svd(torch.zeros(2, 3, 3, 3))
    with pytest.raises(ValueError, match="rank 9 is not in 1..8"):
        svd_of_product(torch.randn(10, 8), torch.randn(8, 10)).factors(9)


# sd-scripts' rules (rank_resize): index = rule's count, clamped to [1, len(s) - 1]; rank = index + 1.
# (No parameter puts a threshold on one of the values: float32 0.1 is not 10 / 100.)
# SPECTRUM: sum 20.85, cumulative fractions .480 .767 .911 .959 .983 .993 .998 1;
# squares 100 36 9 1 .25 .04 .01 .0025 (sum 146.3025), cumulative fractions .684 .930 .991 .998 ...
@pytest.mark.parametrize(
    ("rule", "param", "max_rank", "expected"),
    [
        (None, None, 4, 4),  # fixed
        (None, None, 16, 8),  # never more than the spectrum has
        ("sv_ratio", 4, 16, 4),  # > 10/4 = 2.5: 10, 6, 3 → 3, + 1
        ("sv_ratio", 30, 16, 6),  # > 1/3: five values, + 1
        ("sv_ratio", 1000, 16, 8),  # all eight, clamped to 7, + 1
        ("sv_ratio", 1000, 5, 5),  # capped at max_rank
        ("sv_ratio", 1.5, 16, 2),  # > 6.67: s[0] alone, + 1
        ("sv_cumulative", 0.75, 16, 3),  # first fraction ≥ .75 at index 1; + 1, + 1
        ("sv_cumulative", 0.95, 16, 5),  # first ≥ .95 at index 3 (.959)
        ("sv_cumulative", 0.3, 16, 2),  # index 0 → 1, clamped ≥ 1, + 1
        ("sv_fro", 0.9, 16, 3),  # .81 of the squares: first at index 1 (.930)
        ("sv_fro", 0.99, 16, 4),  # .9801: first at index 2 (.991)
        ("sv_fro", 0.999, 3, 3),  # .998: index 4 → rank 6, capped at 3
    ],
)
def test_rank_rules_give_sd_scripts_ranks(rule, param, max_rank, expected):
    s = torch.tensor(SPECTRUM)
    assert choose_rank(s, max_rank, rule, param) == expected


def test_a_zero_matrix_gets_rank_one_and_keeps_all_of_its_norm():
    zeros = torch.zeros(8)
    assert choose_rank(zeros, 4) == 1
    assert choose_rank(zeros, 4, "sv_fro", 0.9) == 1
    assert choose_rank(torch.tensor([1e-7, 0.0]), 4) == 1  # sd-scripts' MIN_SV
    assert retained_fro(zeros, 1) == 1.0


def test_retained_fro():
    s = torch.tensor(SPECTRUM)
    assert retained_fro(s, 2) == pytest.approx(math.sqrt(136 / 146.3025))
    assert retained_fro(s, 8) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sv_foo"):
        choose_rank(s, 4, "sv_foo", 0.5)
