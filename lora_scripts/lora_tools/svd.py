"""Low-rank approximation of LoRA updates by SVD, and how many singular values to keep: the math that
`resize` (and merge's SVD merge) share.

A matrix here is a layer's update flattened to 2-D: [out, in] for a Linear, [out, in·kh·kw] for a Conv2d
(a LoRA's up [out, r] times its down [r, in·kh·kw]). Its best rank-k approximation (Eckart–Young) is
`up_k @ down_k` with `up_k = U[:, :k] · S[:k]` and `down_k = Vh[:k]`; like sd-scripts, the singular values go
into up and down keeps orthonormal rows.

The rank rules are sd-scripts' (networks/resize_lora.py, `rank_resize` and its `index_sv_*` helpers), quirks
included, so that `--dynamic sv_fro --dynamic-param 0.9` picks the ranks users know from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DYNAMIC_RULES = ("sv_ratio", "sv_fro", "sv_cumulative")
# sd-scripts' MIN_SV: a matrix whose largest singular value is this small is taken for zero and gets rank 1.
MIN_SINGULAR_VALUE = 1e-6


@dataclass(frozen=True)
class Svd:
    """A thin SVD `matrix = u @ diag(s) @ vh`: u [out, k], s [k] (descending, ≥ 0), vh [k, n]; float32 or
    float64, on the device it was computed on."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [out, rank], down [rank, n]) whose product is the best rank-`rank` approximation
        (`rank` ≤ len(s))."""
        if not 1 <= rank <= len(self.s):
            raise ValueError(f"rank {rank} is not in 1..{len(self.s)}")
        return self.u[:, :rank] * self.s[:rank], self.vh[:rank]


def svd(matrix: torch.Tensor, *, device: str | torch.device | None = None) -> Svd:
    """Thin SVD of a 2-D `matrix` [out, n] (any dtype), computed in float32 on `device` (default: where it
    is). float32, not float64: a summed full-size update is up to 1280 × 11520 (SDXL's 3x3 convs), float64 is
    several times slower on CPUs and 32-64x slower on consumer GPUs, and its relative error (~1e-7 of the
    largest singular value) is far below what the fp16 / bf16 output keeps."""
    if matrix.dim() != 2:
        raise ValueError(f"svd takes a 2-D matrix [out, n]; got shape {tuple(matrix.shape)}")
    u, s, vh = torch.linalg.svd(matrix.to(device=device, dtype=torch.float32), full_matrices=False)
    return Svd(u, s, vh)


def svd_of_product(up: torch.Tensor, down: torch.Tensor, *, device: str | torch.device | None = None) -> Svd:
    """The thin SVD of `up @ down` (up [out, r], down [r, n]) without forming it: QR of both factors, then
    the SVD of the small r × r core. Exact, and milliseconds where the SVD of the product takes seconds,
    so it is the way for anything that is a sum of LoRA products (concatenate the ups and the downs).
    Computed in float64, which costs nothing at these sizes and leaves float32 rounding as the only error.
    Gives min(out, r, n) singular values: the product has no more."""
    if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"up [out, r] @ down [r, n] expected; got {tuple(up.shape)} @ {tuple(down.shape)}")
    up = up.to(device=device, dtype=torch.float64)
    down = down.to(device=device, dtype=torch.float64)
    q_up, r_up = torch.linalg.qr(up)  # up = q_up @ r_up
    q_down, r_down = torch.linalg.qr(down.T)  # down = r_down.T @ q_down.T
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return Svd(q_up @ u_core, s, vh_core @ q_down.T)


def low_rank(
    update: torch.Tensor, rank: int, *, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-`rank` approximation of `update` [out, n] (a layer's update flattened to 2-D):
    (up [out, k], down [k, n], singular values [min(out, n)]) in float32 on `device`, with
    k = min(rank, out, n), `up @ down ≈ update`, and all the singular values (to report or choose by)."""
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1; got {rank}")
    decomposition = svd(update, device=device)
    up, down = decomposition.factors(min(rank, len(decomposition.s)))
    return up, down, decomposition.s


def choose_rank(s: torch.Tensor, max_rank: int, rule: str | None = None, param: float | None = None) -> int:
    """How many of the singular values `s` (descending) to keep: `max_rank` (rule None), or by sd-scripts'
    dynamic rule, at most `max_rank`; never more than len(s), and 1 for a zero matrix.

    - sv_ratio: the values above s[0] / param, plus one;
    - sv_cumulative: the first k whose cumulative sum reaches `param` of the sum, plus one;
    - sv_fro: the first k whose Frobenius norm reaches `param` of the whole (k counted on the squares), plus
      one.
    The "plus one" is sd-scripts' (it adds 1 to a count that is already a rank, and searchsorted's index is
    one short of a rank before that): kept so that a param gives the rank it gives there."""
    if max_rank < 1:
        raise ValueError(f"max_rank must be ≥ 1; got {max_rank}")
    if rule is not None and param is None:
        raise ValueError(f"rule {rule} needs a param")
    if float(s[0]) <= MIN_SINGULAR_VALUE:
        return 1
    new_rank = max_rank if rule is None else _dynamic_index(s, rule, param) + 1
    return min(new_rank, max_rank, len(s))


def _dynamic_index(s: torch.Tensor, rule: str, param: float) -> int:
    """sd-scripts' `index_sv_ratio` / `index_sv_cumulative` / `index_sv_fro`, clamped to [1, len(s) - 1]
    as there."""
    s = s.double()
    target = torch.tensor(param, dtype=torch.float64, device=s.device)
    if rule == "sv_ratio":
        index = int((s > s[0] / param).sum())
    elif rule == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), target)) + 1
    elif rule == "sv_fro":
        squares = s.pow(2)
        index = int(torch.searchsorted(torch.cumsum(squares, 0) / squares.sum(), target**2)) + 1
    else:
        raise ValueError(f"rule must be one of {DYNAMIC_RULES}; got {rule!r}")
    return max(1, min(index, len(s) - 1))


def retained_fro(s: torch.Tensor, rank: int) -> float:
    """The fraction of the Frobenius norm the top `rank` singular values keep: sqrt(Σ_{i<rank} s_i² / Σ s_i²)
    (1.0 for a zero matrix, which any rank reproduces)."""
    squares = s.double().pow(2)
    total = float(squares.sum())
    if total == 0.0:
        return 1.0
    return (float(squares[:rank].sum()) / total) ** 0.5
