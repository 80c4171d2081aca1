"""LoRA modules on layers that a file's layout fuses into one: FLUX's BFL layout (sd-scripts' and ComfyUI's
names) keeps q, k and v in one `qkv` Linear, and a single block's q, k, v and MLP input in one `linear1`,
where diffusers' FluxTransformer2DModel (which training adapts) has a Linear each.

Writing, the parts' LoRAs become one exactly: the fused down stacks the parts' downs, the fused up is block
diagonal, so the fused update `scale · up @ down` is each part's own update in its rows. That is the layout
sd-scripts writes for FLUX with `split_qkv`, which diffusers' kohya FLUX conversion recognises as "sparse" and
splits again; parts without a LoRA are written as zero blocks so that every part has the same rank, as that
recognition needs. Parts that share one down (a dense file read back, or resized as one: see below) are
written dense again, so converting or resizing such a file does not multiply its rank. Reading, a fused
module is split back: the block-diagonal layout into each part's own
down and up (all-zero parts dropped), the dense layout of a LoRA trained on the fused layer (sd-scripts'
default) into the shared down and each part's rows of the up. Both are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FusedPart:
    """A layer that files name as part `index` of the fused layer `path` (kohya path, dots), whose output
    rows are the parts' outputs in order, of `sizes`."""

    path: str
    index: int
    sizes: tuple[int, ...]


@dataclass
class PartLora:
    """One part's LoRA: down [r, in], up [out, r], alpha (scale alpha / r)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.down.shape[0]


def fuse(parts: dict[int, PartLora], sizes: tuple[int, ...]) -> PartLora:
    """One LoRA for the fused layer from the LoRAs of some of its parts (by part index).

    Every part gets a block of the common rank r (the first part's; a part of another rank is padded with
    zero rows, a missing one is all zero), so the fused rank is len(sizes) * r. The fused alpha keeps the
    first part's scale, and each other part's up block is multiplied by its own scale over that one, so every
    part's update is exactly its own.

    Parts that share one down (equal tensors, as `split` gives for the dense layout) are written dense: that
    down, and the parts' ups (each times its scale over the first's) in their rows, rank r, not n * r.
    """
    first = parts[min(parts)]
    if _share_one_down(parts):
        up = torch.zeros(sum(sizes), first.down.shape[0], dtype=torch.float32)
        for index, part in parts.items():
            start = sum(sizes[:index])
            up[start : start + sizes[index]] = part.up.float() * (part.scale / first.scale)
        return PartLora(first.down, up.to(first.down.dtype), first.alpha)
    rank = max(p.down.shape[0] for p in parts.values())
    scale = first.scale
    in_features = first.down.shape[1]
    dtype = first.down.dtype
    down = torch.zeros(len(sizes) * rank, in_features, dtype=torch.float32)
    up = torch.zeros(sum(sizes), len(sizes) * rank, dtype=torch.float32)
    row = 0
    for index, size in enumerate(sizes):
        part = parts.get(index)
        if part is not None:
            r = part.down.shape[0]
            down[index * rank : index * rank + r] = part.down.float()
            up[row : row + size, index * rank : index * rank + r] = part.up.float() * (part.scale / scale)
        row += size
    return PartLora(down.to(dtype), up.to(dtype), scale * len(sizes) * rank)


def split(fused: PartLora, sizes: tuple[int, ...]) -> dict[int, PartLora]:
    """The parts' LoRAs of a fused layer's LoRA, by part index; parts whose update is zero are left out."""
    up = fused.up.flatten(1)
    rank = fused.down.shape[0]
    n = len(sizes)
    starts = [sum(sizes[:i]) for i in range(n)]
    block = rank // n if rank % n == 0 else 0
    if block and _is_block_diagonal(up, sizes, starts, block):
        out = {}
        for i in range(n):
            down = fused.down[i * block : (i + 1) * block]
            part_up = fused.up[starts[i] : starts[i] + sizes[i], i * block : (i + 1) * block]
            if bool(part_up.any()) and bool(down.any()):
                out[i] = PartLora(down, part_up, fused.scale * block)
        return out
    # A LoRA of the fused layer itself: one down shared by every part, the up's rows split.
    out = {}
    for i in range(n):
        part_up = fused.up[starts[i] : starts[i] + sizes[i]]
        if bool(part_up.any()):
            out[i] = PartLora(fused.down, part_up, fused.alpha)
    return out


def _share_one_down(parts: dict[int, PartLora]) -> bool:
    """Whether two or more parts have one down (the same values and dtype)."""
    downs = [part.down for part in parts.values()]
    first = downs[0]
    return len(downs) > 1 and all(
        d.shape == first.shape and d.dtype == first.dtype and torch.equal(d, first) for d in downs[1:]
    )


def _is_block_diagonal(up: torch.Tensor, sizes: tuple[int, ...], starts: list[int], block: int) -> bool:
    for i, (start, size) in enumerate(zip(starts, sizes, strict=True)):
        rows = up[start : start + size]
        others = torch.cat([rows[:, : i * block], rows[:, (i + 1) * block :]], dim=1)
        if bool(others.any()):
            return False
    return True
