"""Linear (weighted average) merge, as mergekit computes it.

out = sum_i w_i * theta_i (accumulated in float32, float64 for float64 inputs),
divided by sum_i w_i when `normalize` (default), cast back to the compute dtype.
There is no base model: every listed model is an input.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from distmerge.methods.base import InputRules, MergeMethod, ParameterSpec, PieceInputs


class LinearMerge(MergeMethod):
    name = "linear"
    inputs = InputRules(base="ignored")
    description = "Linear: weighted average of the models"
    parameters = (
        ParameterSpec("weight", float, per_model=True, help="this model's weight"),
        ParameterSpec("normalize", bool, per_model=False, default=True, help="divide by the sum of weights"),
    )

    def working_set_factor(self, n_models: int) -> float:
        return n_models + 5.0

    def apply(self, inputs: PieceInputs, carry: Optional[Any]) -> torch.Tensor:
        first = inputs.models[0]
        acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        weight = torch.tensor(inputs.meta.params.model_values("weight"), dtype=torch.float64).to(acc_dtype)
        result = torch.zeros_like(first, dtype=acc_dtype)
        for tensor, coefficient in zip(inputs.models, weight.unbind(0)):
            result.addcmul_(tensor, coefficient)
        if inputs.meta.params.shared["normalize"]:
            result.div_(weight.sum())
        return result.to(first.dtype)


LINEAR = LinearMerge()
