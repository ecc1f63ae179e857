"""SCE (select, calculate, erase), as mergekit 0.1.5 computes it.

  tv_i = theta_i - theta_base (stacked, compute dtype)
  select: var = population variance of the tv_i per element; keep the
          k = int(count_nonzero(var) * select_topk) largest |var| (ties: lowest flat
          index first, a stable sort's order); other entries of every tv_i become 0
  erase:  mask_i = sign(tv_i) == elected sign of sum_i tv_i (zeros never match)
  weights: s_i = mean(tv_i^2) over the tensor; w_i = s_i / sum_j s_j (1/n if ~0)
  out = base + sum_i tv_i * w_i * mask_i / max(sum_i w_i * mask_i, 1e-6)

Both the selection and the weights are whole-tensor statistics. When a tensor is split
they come from named phases: "select_topk digits" (radix selection over the variance;
its first pass also counts the non-zero variances, which sets k) and "weights sum of
squares" (each model's exact sum of squares, rounded once). mergekit's mean rounds an
inexact float32 sum, so a weight can differ from it in its last bit ("near" parity).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, List, Optional, Sequence, Tuple

import torch

from distmerge.methods import exactsum, signs, topk
from distmerge.methods.base import MergeMethod, ParameterSpec, Phase, PieceInputs, PieceMeta, StatisticsPlan

SELECT = "select_topk digits"
WEIGHTS = "weights sum of squares"
WEIGHT_EPS = 1e-6


@dataclass(frozen=True)
class SceCarry:
    selection: Optional[topk.Selection]  # over the variance; None: keep every entry
    density: float
    sum_squares: Optional[Tuple[float, ...]] = None  # per model, exact, once reduced


class SceMerge(MergeMethod):
    name = "sce"
    description = "SCE: select high-variance entries, weight models by their energy, erase sign conflicts"
    parameters = (
        ParameterSpec("select_topk", float, per_model=False, default=1.0,
                      help="fraction of the entries with the largest variance across models kept"),
        ParameterSpec("int8_mask", bool, per_model=False, default=False,
                      help="store masks as int8 (memory only; same result)"),
    )

    def working_set_factor(self, n_models: int) -> float:
        return 4.0 * n_models + 8.0

    def plan_statistics(self, metas: Sequence[PieceMeta]) -> StatisticsPlan:
        density = metas[0].params.shared["select_topk"]
        phases: List[Phase] = []
        selection = None
        if density < 1:
            bits = topk.key_bits(metas[0].dtype)
            passes = topk.passes_for(bits)
            phases += [Phase(SELECT, p, passes) for p in range(passes)]
            # k is known once the first pass has counted the non-zero variances
            selection = topk.Selection(bits, last=topk.Boundary(0))
        phases.append(Phase(WEIGHTS))
        return StatisticsPlan(tuple(phases), [SceCarry(selection, density)] * len(metas))

    # -- statistics -----------------------------------------------------------------

    def _task_vectors(self, inputs: PieceInputs) -> torch.Tensor:
        if "tvs" not in inputs.memo:
            inputs.memo["tvs"] = torch.stack([m - inputs.base for m in inputs.models], dim=0)
        return inputs.memo["tvs"]

    def _variance_keys(self, inputs: PieceInputs) -> torch.Tensor:
        if "var_keys" not in inputs.memo:
            variance = torch.var(self._task_vectors(inputs), dim=0, unbiased=False)
            inputs.memo["var_keys"] = topk.magnitude_keys(variance)
        return inputs.memo["var_keys"]

    def _selected(self, inputs: PieceInputs, carry: SceCarry) -> torch.Tensor:
        """The task vectors with unselected entries zeroed (as mergekit's tvs * mask)."""
        if "selected" in inputs.memo:
            return inputs.memo["selected"]
        tvs = self._task_vectors(inputs)
        if carry.density <= 0:
            selected = tvs * 0
        elif carry.selection is None or carry.selection.keeps == "all":
            selected = tvs
        else:
            keep = topk.keep_bits(self._variance_keys(inputs), carry.selection)
            selected = (signs.as_int(tvs) & keep.unsqueeze(0)).view(tvs.dtype)
        inputs.memo["selected"] = selected
        return selected

    def collect(self, phase: Phase, inputs: PieceInputs, carry: SceCarry) -> Any:
        if phase.step == WEIGHTS:
            squares = self._selected(inputs, carry).square()
            return [exactsum.abs_sum_parts(squares[i]) for i in range(squares.shape[0])]
        keys = self._variance_keys(inputs)
        partial = {"histograms": None, "nonzero": None}
        if phase.index == 0:
            partial["nonzero"] = int(torch.count_nonzero(keys))
        if carry.selection.searching:
            partial["histograms"] = topk.histograms(keys, carry.selection, phase.index)
        return partial

    def reduce(self, phase: Phase, metas: Sequence[PieceMeta], partials: Sequence[Any],
               carries: Sequence[SceCarry]) -> List[SceCarry]:
        if phase.step == WEIGHTS:
            dtype = metas[0].dtype
            n = len(partials[0])
            totals = tuple(float(exactsum.value(exactsum.add_parts([p[i] for p in partials]), dtype))
                           for i in range(n))
            return [replace(c, sum_squares=totals) for c in carries]
        selections = [c.selection for c in carries]
        if phase.index == 0:
            nonzero = sum(p["nonzero"] for p in partials)
            total = sum(m.numel for m in metas)
            # mergekit multiplies an int64 tensor by the density: float32 arithmetic, truncated
            k = int(torch.tensor(nonzero, dtype=torch.int64) * carries[0].density)
            # the first pass's histograms (prefix 0) do not depend on k
            selections = [topk.top_k(selections[0].bits, total, k)] * len(carries)
        new = topk.reduce_pass(phase.index, selections, [p["histograms"] for p in partials])
        return [replace(c, selection=s) for c, s in zip(carries, new)]

    # -- apply ------------------------------------------------------------------------

    def _weights(self, carry: SceCarry, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """mergekit's mean(tv_i^2) / sum, from the exact sums of squares rounded once."""
        weights = torch.tensor([s / numel for s in carry.sum_squares], dtype=torch.float64).to(dtype)
        weight_sum = torch.sum(weights).item()
        if abs(weight_sum) < WEIGHT_EPS:
            return torch.ones_like(weights) / weights.shape[0]
        return weights / weight_sum

    def apply(self, inputs: PieceInputs, carry: SceCarry) -> torch.Tensor:
        selected = self._selected(inputs, carry)
        mask_dtype = torch.int8 if inputs.meta.params.shared["int8_mask"] else selected.dtype
        vote = selected.sum(dim=0)
        elected = (vote >= 0).to(mask_dtype) * 2 - 1
        erase = selected.sign().to(mask_dtype) == elected
        del vote, elected
        weights = self._weights(carry, selected.dtype, inputs.meta.tensor_numel)
        weights = weights.reshape((-1,) + (1,) * (selected.dim() - 1))
        erased_weights = weights * erase
        merged = (selected * erased_weights).sum(dim=0)
        final = merged / torch.sum(erased_weights, dim=0).clamp(min=WEIGHT_EPS)
        inputs.memo.clear()
        return inputs.base + final


SCE = SceMerge()
