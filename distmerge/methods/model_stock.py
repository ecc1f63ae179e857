"""Model Stock, as mergekit 0.1.5 computes it (in the input dtype).

  offsets_i = model_i - base; c = mean over pairs i < j of clamp(<o_i, o_j> / max(|o_i| |o_j|, 1e-6), -1, 1)
  t = n c / (1 + (n - 1) c)  (0 where the denominator is within 1e-6 of 0)
  out = t * mean(models) + (1 - t) * base

By default the vectors are whole tensors: the norms and pairwise dot products are exact
sums over the tensor (one "norms and dot products" phase). With `filter_wise` each row
is its own vector (a 1-D tensor is one row), so rows stay whole and nothing is reduced.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from distmerge.methods.base import InputRules, ParameterSpec, PieceInputs, PieceMeta
from distmerge.methods.tensor_sums import Sums, TensorSumsMethod, norm_of, rounded

SUMS = "norms and dot products"


class ModelStock(TensorSumsMethod):
    name = "model_stock"
    description = "Model Stock: move from the base toward the models' mean by their agreement"
    inputs = InputRules(base="required", min_models=2)
    parameters = (ParameterSpec("filter_wise", bool, per_model=False, default=False,
                                help="one interpolation factor per row instead of per tensor"),)

    def working_set_factor(self, n_models: int) -> float:
        return 3.0 * n_models + 8.0

    def splittable(self, meta: PieceMeta) -> bool:
        return not meta.params.shared["filter_wise"] or len(meta.shape) >= 2

    def sum_phases(self, first: PieceMeta) -> List[str]:
        return [] if first.params.shared["filter_wise"] else [SUMS]

    @staticmethod
    def _pairs(n: int):
        return [(i, j) for i in range(n) for j in range(i + 1, n)]

    def sums(self, phase: str, inputs: PieceInputs, known: Sums) -> Dict[str, torch.Tensor]:
        offsets = [m - inputs.base for m in inputs.models]
        out = {f"norm{i}": o.double().square() for i, o in enumerate(offsets)}
        out.update({f"dot{i},{j}": offsets[i] * offsets[j] for i, j in self._pairs(len(offsets))})
        return out

    def apply(self, inputs: PieceInputs, carry: Sums) -> torch.Tensor:
        base, models = inputs.base, list(inputs.models)
        shape = base.shape
        if inputs.meta.params.shared["filter_wise"]:
            if base.dim() == 1:
                base, models = base.unsqueeze(0), [m.unsqueeze(0) for m in models]
            offsets = [m - base for m in models]
            cos_thetas = []
            for i, j in self._pairs(len(offsets)):
                norm_product = torch.norm(offsets[i], dim=-1) * torch.norm(offsets[j], dim=-1)
                cos_thetas.append(((offsets[i] * offsets[j]).sum(dim=-1)
                                   / norm_product.clamp(min=1e-6)).clamp(-1, 1))
        else:
            base, models = base.reshape(-1), [m.reshape(-1) for m in models]
            cos_thetas = []
            for i, j in self._pairs(len(models)):
                norm_product = norm_of(carry[f"norm{i}"], base.dtype) * norm_of(carry[f"norm{j}"], base.dtype)
                cos_thetas.append((rounded(carry[f"dot{i},{j}"], base.dtype)
                                   / norm_product.clamp(min=1e-6)).clamp(-1, 1))
        cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
        count = len(models)
        denominator = 1 + (count - 1) * cos_theta
        singular = denominator.abs() < 1e-6
        safe_denominator = torch.where(singular, torch.ones_like(denominator), denominator)
        t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe_denominator)
        average = sum(models) / count
        return (t * average + (1 - t) * base).reshape(shape)


MODEL_STOCK = ModelStock()
