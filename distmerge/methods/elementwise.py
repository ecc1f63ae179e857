"""Methods computed entry by entry, with no statistics: passthrough and NearSwap (mergekit 0.1.5).

  passthrough: out = model * scale (scale unset: the model as it is); one input
  nearswap:    w = clamp(t / max(|base - model|, 1e-6), 0, 1); out = w * model + (1 - w) * base
"""

from __future__ import annotations

from typing import Any

import torch

from distmerge.methods.base import InputRules, MergeMethod, ParameterSpec, PieceInputs


class Passthrough(MergeMethod):
    name = "passthrough"
    description = "Passthrough: one model's tensors as they are (optionally scaled)"
    inputs = InputRules(base="ignored", min_models=1, max_models=1)
    parameters = (ParameterSpec("scale", float, per_model=True, default=None,
                                help="multiply the model's tensors by this (default: unchanged)"),)

    def working_set_factor(self, n_models: int) -> float:
        return 2.0

    def apply(self, inputs: PieceInputs, carry: Any) -> torch.Tensor:
        tensor = inputs.models[0]
        scale = inputs.meta.params.per_model[0]["scale"]
        return tensor if scale is None else tensor * scale


class NearSwap(MergeMethod):
    name = "nearswap"
    description = "NearSwap: take the model's value where it is within t of the base, interpolate beyond"
    inputs = InputRules(base="required", min_models=1, max_models=1)
    parameters = (ParameterSpec("t", float, per_model=False, help="distance at which the swap starts fading"),)

    def working_set_factor(self, n_models: int) -> float:
        return 8.0

    def apply(self, inputs: PieceInputs, carry: Any) -> torch.Tensor:
        base, model = inputs.base, inputs.models[0]
        absdiff = torch.abs(base - model)
        weight = (inputs.meta.params.shared["t"] / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
        return weight * model + (1 - weight) * base


PASSTHROUGH = Passthrough()
NEARSWAP = NearSwap()
