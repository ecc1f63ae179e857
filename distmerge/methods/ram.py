"""RAM and RAM+ (tensor-local), as mergekit 0.1.5 computes them.

  tv_i = theta_i - theta_base; active_i = |tv_i| > epsilon
  count = number of models active at an entry; unique: count == 1, overlap: count > 1
  ram:        out = base + sum_i tv_i*active_i*unique + tv_i*active_i*overlap / max(count, 1)
  ramplus_tl: each model's unique entries are scaled by
              lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha)
              where shared_i / unique_i count model i's active overlap / unique entries
              over the whole tensor.

RAM is elementwise. RAM+'s counts are whole-tensor statistics: when a tensor is split
they come from one phase, "overlap counts" (integers, so exact under any split).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch

from distmerge.methods.base import MergeMethod, ParameterSpec, Phase, PieceInputs, PieceMeta, StatisticsPlan

COUNTS = "overlap counts"


@dataclass(frozen=True)
class ActiveEntries:
    """The task vectors of a piece with mergekit's masks (flattened per model)."""

    tv: torch.Tensor  # (n, elements)
    active: torch.Tensor
    counts: torch.Tensor  # (1, elements)
    overlap: torch.Tensor
    unique: torch.Tensor

    @classmethod
    def of(cls, inputs: PieceInputs) -> "ActiveEntries":
        epsilon = inputs.meta.params.shared["epsilon"]
        tv = torch.stack([m - inputs.base for m in inputs.models], dim=0).reshape(len(inputs.models), -1)
        active = tv.abs() > epsilon
        counts = active.sum(dim=0, keepdim=True)
        return cls(tv, active, counts, counts > 1, counts == 1)

    def overlap_part(self) -> torch.Tensor:
        return self.tv * self.active * self.overlap / self.counts.clamp(min=1)


class RamMerge(MergeMethod):
    name = "ram"
    description = "RAM: average task vectors where models overlap, keep unique entries whole"
    parameters = (ParameterSpec("epsilon", float, per_model=False, default=1e-5,
                                help="|task vector| at or below this counts as inactive"),)

    def working_set_factor(self, n_models: int) -> float:
        return 4.0 * n_models + 12.0

    def apply(self, inputs: PieceInputs, carry: Any) -> torch.Tensor:
        entries = ActiveEntries.of(inputs)
        merged = (entries.tv * entries.active * entries.unique + entries.overlap_part()).sum(dim=0, keepdim=True)
        return inputs.base + merged.reshape_as(inputs.base)


@dataclass(frozen=True)
class CountsCarry:
    shared: Optional[Tuple[int, ...]] = None  # per model, over the tensor
    unique: Optional[Tuple[int, ...]] = None


class RamPlusMerge(RamMerge):
    name = "ramplus_tl"
    description = "RAM+ (tensor-local): RAM with unique entries scaled up by each model's overlap ratio"
    parameters = RamMerge.parameters + (
        ParameterSpec("r", float, per_model=False, default=0.1, help="strength of the unique-entry scaling"),
        ParameterSpec("alpha", float, per_model=False, default=0.2, help="cap on the overlap ratio"),
    )

    def plan_statistics(self, metas: Sequence[PieceMeta]) -> StatisticsPlan:
        return StatisticsPlan((Phase(COUNTS),), [CountsCarry()] * len(metas))

    def collect(self, phase: Phase, inputs: PieceInputs, carry: CountsCarry) -> Any:
        entries = ActiveEntries.of(inputs)
        return ((entries.active & entries.overlap).sum(dim=1).tolist(),
                (entries.active & entries.unique).sum(dim=1).tolist())

    def reduce(self, phase: Phase, metas: Sequence[PieceMeta], partials: Sequence[Any],
               carries: Sequence[CountsCarry]) -> List[CountsCarry]:
        n = len(partials[0][0])
        shared = tuple(sum(p[0][i] for p in partials) for i in range(n))
        unique = tuple(sum(p[1][i] for p in partials) for i in range(n))
        return [CountsCarry(shared, unique)] * len(carries)

    def apply(self, inputs: PieceInputs, carry: CountsCarry) -> torch.Tensor:
        shared = inputs.meta.params.shared
        entries = ActiveEntries.of(inputs)
        shared_counts = torch.tensor(carry.shared, dtype=torch.int64)
        unique_counts = torch.tensor(carry.unique, dtype=torch.int64)
        rho = shared_counts / unique_counts.clamp(min=shared["epsilon"])
        scale = 1 + shared["r"] * rho.clamp(min=0, max=shared["alpha"])
        merged = (entries.tv * entries.active * entries.unique * scale.unsqueeze(-1)
                  + entries.overlap_part()).sum(dim=0, keepdim=True)
        return inputs.base + merged.reshape_as(inputs.base)


RAM = RamMerge()
RAMPLUS_TL = RamPlusMerge()
