"""Arcee Fusion, as mergekit 0.1.5 computes it (in the input dtype).

  importance = |model - base| * KL(softmax(model) || softmax(base)) per row (the last dim)
  threshold  = median + 1.5 * (q3 - q1) of the importance over the whole tensor
  out        = base + (model - base) * (importance >= threshold)

The quartiles are order statistics of the whole tensor, at mergekit's positions
int(q * (n - 1)) of the sorted values, found exactly by radix selection over
value-ordered keys ("quartile digits" phases), so any split gives the same threshold.
mergekit sorts the tensor itself up to 1,000,000 entries (the same values as here) and
above that estimates the quartiles from a random sample of a million entries, drawn from
torch's global generator; distmerge uses the exact quartiles there too (deterministic).
Rows (softmax over the last dim) stay whole; a 1-D tensor is merged whole.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from distmerge.methods import topk
from distmerge.methods.base import InputRules, MergeMethod, Phase, PieceInputs, PieceMeta, StatisticsPlan

QUARTILES = "quartile digits"
KL_EPS = 1e-8


@dataclass(frozen=True)
class QuartileCarry:
    selections: Tuple[topk.Selection, ...]  # q1, median, q3: each the element at one ascending position


def importance(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    diff = (model - base).abs()
    p = F.softmax(model, dim=-1) + KL_EPS
    q = F.softmax(base, dim=-1) + KL_EPS
    kl_div = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return diff * kl_div


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    description = "Arcee Fusion: take the model's entries whose importance is an upper outlier"
    inputs = InputRules(base="required", min_models=1, max_models=1)
    parameters = ()

    def working_set_factor(self, n_models: int) -> float:
        return 16.0

    def splittable(self, meta: PieceMeta) -> bool:
        return len(meta.shape) >= 2

    def plan_statistics(self, metas: Sequence[PieceMeta]) -> StatisticsPlan:
        total = sum(m.numel for m in metas)
        bits = topk.key_bits(metas[0].dtype)
        positions = (torch.tensor([0.25, 0.5, 0.75]) * (total - 1)).long().tolist()
        # the element at ascending position i is the (total - i)-th largest
        selections = tuple(topk.Selection(bits, last=topk.Boundary(total - i)) for i in positions)
        passes = topk.passes_for(bits)
        return StatisticsPlan(tuple(Phase(QUARTILES, p, passes) for p in range(passes)),
                              [QuartileCarry(selections)] * len(metas))

    def _keys(self, inputs: PieceInputs) -> torch.Tensor:
        if "keys" not in inputs.memo:
            inputs.memo["keys"] = topk.order_keys(importance(inputs.base, inputs.models[0]))
        return inputs.memo["keys"]

    def collect(self, phase: Phase, inputs: PieceInputs, carry: QuartileCarry) -> Any:
        keys = self._keys(inputs)
        return [topk.histograms(keys, s, phase.index) for s in carry.selections]

    def reduce(self, phase: Phase, metas: Sequence[PieceMeta], partials: Sequence[Any],
               carries: Sequence[QuartileCarry]) -> List[QuartileCarry]:
        new = topk.reduce_pass_each(phase.index, [c.selections for c in carries], partials)
        return [replace(c, selections=row) for c, row in zip(carries, new)]

    def apply(self, inputs: PieceInputs, carry: QuartileCarry) -> torch.Tensor:
        base, model = inputs.base, inputs.models[0]
        scores = importance(base, model)
        q1, median, q3 = (topk.value_of_order_key(s.last.prefix, scores.dtype) for s in carry.selections)
        threshold = median + 1.5 * (q3 - q1)
        mask = (scores >= threshold).float()
        inputs.memo.clear()
        return base + (model - base) * mask


ARCEE_FUSION = ArceeFusion()
