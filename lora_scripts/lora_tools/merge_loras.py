"""`lora-scripts merge`: one LoRA file from several, each with its weight (any real number; a negative one
subtracts that LoRA). No base model is touched: the result is a LoRA whose update to every layer is the
weighted sum of the inputs' updates, `Σ wᵢ · (alphaᵢ / rankᵢ) · upᵢ @ downᵢ`.

Two ways, those of sd-scripts' networks/merge_lora.py --concat and networks/svd_merge_lora.py:

- Concatenation (the default) is exact and ranks add up. A module that several inputs adapt gets their
  factors side by side: down = [down₁; down₂; …] and up = [w₁·s₁·up₁, w₂·s₂·up₂, …] (sᵢ = alphaᵢ / rankᵢ),
  with alpha = the summed rank, so the loaders' scale alpha / rank is exactly 1 in any dtype and the only
  rounding is that of each up weight times wᵢ·sᵢ. (Keeping an input's alpha instead would change the other
  inputs' scales, as sd-scripts' --concat does, or need an alpha that fp16 cannot hold.) A module that one
  input adapts keeps its down and its alpha, its up times the weight: with weight 1 it is the input's, bit
  for bit.
- SVD (`rank`, `conv_rank`): each module's summed update becomes its best rank-N approximation (truncated
  SVD, Eckart–Young) with alpha = N. The summed update is the concatenated module's product, so its SVD comes
  from those factors (svd.svd_of_product, float64) without forming the out × in matrix. N is at most the
  layer's full rank and the summed rank of the module's inputs (the update has no more non-zero singular
  values). Each module reports the fraction of its update's Frobenius norm it keeps. Unlike sd-scripts, the
  factors are not clamped to a quantile, which would make the result no longer the best approximation.

LoHa and LoKr inputs (LyCORIS) have no LoRA factors to concatenate: they merge by SVD only (`--rank`), of the
summed update Σ wᵢ · updateᵢ formed in full (svd.svd, float32), and are refused otherwise. DoRA inputs are
refused: a DoRA module's update depends on the base weights (`merge --base` applies it exactly).

Every input must be for one base model version; the output's metadata keeps what all inputs agree on, gets
sd-scripts' dim / alpha keys from the merged modules and a history entry naming each input, weight and hash.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lora_scripts.devices import pick_device
from lora_scripts.errors import UserError
from lora_scripts.export.hashes import file_model_hash
from lora_scripts.export.lora_layouts import LAYOUTS, module_tensors
from lora_scripts.export.lora_model import LoraModel, LoraModule
from lora_scripts.lora_tools.files import (
    OpenedLora,
    a_or_an,
    check_output,
    history_entry,
    is_spatial,
    lora_facts,
    module_dtype,
    open_lora,
    output_metadata,
    refuse_unless_plain,
    save_lora,
)
from lora_scripts.lora_tools.svd import Svd, retained_fro, svd, svd_of_product
from lora_scripts.models.detect import VERSION_NAMES

log = logging.getLogger(__name__)


CANCELLED = 1e-6  # a summed update this small relative to its factors' norms is zero (fp32 keeps ~1e-7)
Part = tuple[LoraModule, float]  # one input's module and that input's weight


@dataclass(frozen=True)
class MergedModule:
    """One module of the output: how many inputs adapt it, its rank, and for an SVD merge the fraction of
    the summed update's Frobenius norm its low-rank update keeps, ‖Δₙ‖_F / ‖Δ‖_F (None: concatenated,
    exact)."""

    name: str
    sources: int
    rank: int
    retained: float | None = None


@dataclass(frozen=True)
class MergeReport:
    output: Path
    version: str
    layout: str
    method: str  # "concat" or "svd" (svd when any module went through the SVD)
    modules: list[MergedModule]

    @property
    def ranks(self) -> tuple[int, int]:
        """The smallest and largest module rank of the output."""
        ranks = [m.rank for m in self.modules]
        return min(ranks), max(ranks)

    @property
    def least_retained(self) -> MergedModule | None:
        """The SVD-merged module that keeps the smallest fraction of its update (None: no SVD)."""
        svd = [m for m in self.modules if m.retained is not None]
        return min(svd, key=lambda m: m.retained) if svd else None


def merge_loras(
    inputs: list[tuple[Path, float]],
    output: Path,
    *,
    rank: int | None = None,
    conv_rank: int | None = None,
    layout: str = "kohya",
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    config_dir: Path | None = None,
    allow_pickle: bool = False,
) -> MergeReport:
    """Write to `output` one LoRA whose update is Σ weight · update of the `inputs` ((path, weight) pairs).

    rank: SVD-merge the linear and 1x1-conv modules to this rank (None: concatenate them, exact).
    conv_rank: the same for 3x3 convs (LoCon); None: `rank`, as in sd-scripts.
    layout: "kohya", "diffusers" or "peft". dtype: the output's (None: the inputs' stored dtype, widened to
    hold all of them). device: where the SVDs run ("cpu", "cuda", ...). config_dir: a diffusers folder whose
    configs name and size the layers (default: the full-size model of the files' family)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    _check_ranks(rank, conv_rank)
    where = pick_device(device)
    if not inputs:
        raise UserError("--lora: give the LoRAs to merge, each as PATH or PATH:WEIGHT.")
    paths = [Path(path) for path, _ in inputs]
    weights = [float(weight) for _, weight in inputs]
    for path, weight in zip(paths, weights, strict=True):
        if not math.isfinite(weight):
            raise UserError(f"--lora {path}:{weight}: the weight must be a finite number, e.g. 0.5 or -1.")
    check_output(output, overwrite=overwrite, inputs=paths)
    opened = [
        open_lora(path, key="--lora", config_dir=config_dir, allow_pickle=allow_pickle) for path in paths
    ]
    _check_one_version(opened)
    conv_rank = rank if conv_rank is None else conv_rank
    for lora in opened:
        _check_mergeable(lora, rank, conv_rank)

    merged: list[LoraModule] = []
    report: list[MergedModule] = []
    groups = _group_modules(opened, weights)
    for name, parts in tqdm(groups.items(), desc="merging", unit="module", leave=False):
        target = conv_rank if is_spatial(parts[0][0]) else rank
        if target is None:
            module, retained = _concatenate(parts), None
        else:
            module, retained = _svd_merge(parts, target, where)
        merged.append(module)
        report.append(MergedModule(name, len(parts), module.rank, retained))

    first = opened[0]
    model = LoraModel(family=first.model.family, modules=merged, layout=layout)
    method = "svd" if any(m.retained is not None for m in report) else "concat"
    params = {"method": method, "rank": rank, "conv_rank": conv_rank, "layout": layout}
    entry = history_entry("merge", _history_inputs(opened, weights), **params)
    shared = _shared_metadata(opened)
    if not all(lora.model.plain for lora in opened):  # LyCORIS' algo etc. no longer describe the output
        shared.pop("ss_network_args", None)
    metadata = output_metadata(shared, entry, **lora_facts(model, first.version))
    save_lora(output, model, first.base, metadata, layout=layout, dtype=dtype or _stored_dtype(opened))
    log.info("Merged %d LoRAs into %d modules (%s) at %s", len(opened), len(merged), method, output)
    return MergeReport(Path(output), first.version, layout, method, report)


def _check_ranks(rank: int | None, conv_rank: int | None) -> None:
    for option, value in (("--rank", rank), ("--conv-rank", conv_rank)):
        if value is not None and value < 1:
            raise UserError(f"{option} {value}: give a rank of 1 or more, or leave it out to concatenate.")


def _check_one_version(opened: list[OpenedLora]) -> None:
    first = opened[0]
    for other in opened[1:]:
        if other.version != first.version:
            other_name, first_name = VERSION_NAMES[other.version], VERSION_NAMES[first.version]
            raise UserError(
                f"--lora {other.path} is {a_or_an(other_name)} LoRA and --lora {first.path} "
                f"{a_or_an(first_name)} one; merge LoRAs made for one base model."
            )


def _check_mergeable(lora: OpenedLora, rank: int | None, conv_rank: int | None) -> None:
    """UserError for an input this merge cannot apply exactly: a DoRA file (its update depends on the base
    weights), or a LoHa / LoKr one with a module that would be concatenated (concatenation joins LoRA factors:
    the SVD of their summed update makes a LoRA of them)."""
    if lora.model.network_type == "dora" or any(m.dora_scale is not None for m in lora.model.modules):
        why = (
            "its update depends on the base weights, so it cannot be merged into a LoRA; fuse it into a "
            "checkpoint with `merge --base` instead."
        )
        refuse_unless_plain(lora, f"--lora {lora.path}", why)
    concatenated = [
        m for m in lora.model.modules if not m.plain and (conv_rank if is_spatial(m) else rank) is None
    ]
    if concatenated:
        why = (
            "merging by concatenation is exact for plain LoRA only; give --rank N (and --conv-rank N) to "
            "merge it by SVD of the summed update, or fuse it into a checkpoint with `merge --base`."
        )
        refuse_unless_plain(lora, f"--lora {lora.path}", why)


def _group_modules(opened: list[OpenedLora], weights: list[float]) -> dict[str, list[Part]]:
    """Each module name (in order of first appearance) with the inputs' modules on that layer."""
    groups: dict[str, list[Part]] = {}
    for lora, weight in zip(opened, weights, strict=True):
        for module in lora.model.modules:
            groups.setdefault(module.name, []).append((module, weight))
    return groups


def _concatenate(parts: list[Part]) -> LoraModule:
    """The exact merge of one layer's modules (fp32): see the module docstring."""
    module, weight = parts[0]
    if len(parts) == 1:
        return replace(module, down=module.down.float(), up=module.up.float() * weight)
    down = torch.cat([m.down.float() for m, _ in parts])
    up = torch.cat([m.up.float() * (w * m.scale) for m, w in parts], dim=1)
    return replace(module, down=down, up=up, alpha=float(down.shape[0]))


def _svd_merge(parts: list[Part], target: int, device: torch.device) -> tuple[LoraModule, float]:
    """The best approximation of rank `target` (capped) of the layer's summed update, alpha = its rank, and
    the fraction of the update's Frobenius norm it keeps. For LoRAs the summed update is the concatenated
    module's product, so its SVD comes from the factors (svd_of_product: exact, no out × in matrix); with a
    LoHa or LoKr among the parts it is the SVD of the summed updates (`LoraModule.update()`)."""
    if not all(m.plain for m, _ in parts):
        return _svd_merge_updates(parts, target, device)
    module = _concatenate(parts)
    up, down = module.up.flatten(1) * module.scale, module.down.flatten(1)
    decomposition = svd_of_product(up, down, device=device)
    new_rank = min(target, len(decomposition.s))  # len(s) = min(out, in·kh·kw, summed input rank)
    retained = retained_fro(decomposition.s, new_rank)
    # Inputs that cancel (a LoRA minus itself) leave rounding noise, whose "retained fraction" means nothing:
    # the update is zero to within the factors' precision, and any rank keeps all of it.
    if float(decomposition.s.norm()) <= CANCELLED * float(up.norm() * down.norm()):  # ≥ ‖up @ down‖_F
        retained = 1.0
    return _low_rank_module(module, decomposition, new_rank), retained


def _svd_merge_updates(parts: list[Part], target: int, device: torch.device) -> tuple[LoraModule, float]:
    """`_svd_merge` of parts among which a LoHa or LoKr: the SVD (float32, svd.svd) of Σ wᵢ · updateᵢ
    flattened to [out, in·kh·kw]. Those updates are of full rank in general, so the result approximates."""
    weighted = [m.update(torch.float32).to(device) * w for m, w in parts]
    summed = torch.stack(weighted).sum(0)
    decomposition = svd(summed.flatten(1), device=device)
    new_rank = min(target, len(decomposition.s))
    retained = retained_fro(decomposition.s, new_rank)
    if float(decomposition.s.norm()) <= CANCELLED * sum(float(u.norm()) for u in weighted):
        retained = 1.0
    plain = replace(parts[0][0], factors={}, dora_scale=None)
    return _low_rank_module(plain, decomposition, new_rank), retained


def _low_rank_module(module: LoraModule, decomposition: Svd, rank: int) -> LoraModule:
    """`module` as a LoRA of the best rank-`rank` factors of `decomposition` (float32, on the CPU) with
    alpha = rank: down [rank, in(, kh, kw)], up [out, rank(, 1, 1)]."""
    out, *rest = module.weight_shape
    new_up, new_down = decomposition.factors(rank)
    new_up = new_up.to("cpu", torch.float32).reshape(out, rank, *([1] * len(rest[1:])))
    new_down = new_down.to("cpu", torch.float32).reshape(rank, *rest)
    return replace(module, down=new_down, up=new_up, alpha=float(rank))


def _stored_dtype(opened: list[OpenedLora]) -> torch.dtype:
    """The dtype that holds every input's weights as stored (fp16 and bf16 together: fp32)."""
    dtype = module_dtype(opened[0].model.modules[0])
    for lora in opened:
        for module in lora.model.modules:
            for tensor in module_tensors(module).values():
                dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _shared_metadata(opened: list[OpenedLora]) -> dict[str, str]:
    """The metadata entries every input has with the same value (the rest described one input only)."""
    shared = dict(opened[0].model.metadata)
    for lora in opened[1:]:
        shared = {k: v for k, v in shared.items() if lora.model.metadata.get(k) == v}
    return shared


def _history_inputs(opened: list[OpenedLora], weights: list[float]) -> list[tuple[Path, dict, float]]:
    """Each input for the history entry, with its sshs_model_hash as A1111 computes it from the file (peft
    folders: the hash their metadata gives, if any)."""
    out = []
    for lora, weight in zip(opened, weights, strict=True):
        meta = dict(lora.model.metadata)
        if lora.path.is_file():
            meta["sshs_model_hash"] = file_model_hash(lora.path)
        out.append((lora.path, meta, weight))
    return out
