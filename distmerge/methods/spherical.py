"""Spherical interpolation: SLERP, NuSLERP and Multi-SLERP, as mergekit 0.1.5 computes them.

Each needs norms and dot products over the whole tensor; they come from exact sums
(tensor_sums.py), rounded once, so a split tensor merges to the same bits as a whole one.
mergekit's sums are float sums, so a statistic can differ from it in its last bit
("near" parity).

slerp (base and one model; float32 math, float64 for float64 inputs):
  a, b = base, model; na, nb = ||a||, ||b|| (1 where <= 1e-8); d = clamp(<a/na, b/nb>, -1, 1)
  |d| > 0.9995: (1 - t) a + t b;  else sin((1 - t) θ)/sin θ · a + sin(t θ)/sin θ · b, θ = acos d
nuslerp (two models, base optional; the input dtype): with a base, interpolates the task
  vectors and adds the base; t = w2 / (w1 + w2). `nuslerp_flatten` (default) treats the
  tensor as one vector; otherwise each row (or, `nuslerp_row_wise`, each column) is one.
multislerp (any number of models, base optional; the input dtype): the weighted mean of
  the unit vectors, projected to the tangent space, mapped back, scaled to the weighted
  mean norm.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from distmerge.errors import MergeFailed
from distmerge.methods.base import InputRules, ParameterSpec, PieceInputs, PieceMeta
from distmerge.methods.tensor_sums import Sums, TensorSumsMethod, accumulator, norm_of, rounded

SLERP_NORMS, SLERP_DOT = "norms", "dot product"


class Slerp(TensorSumsMethod):
    name = "slerp"
    description = "SLERP: spherical interpolation between the base and one model"
    inputs = InputRules(base="required", min_models=1, max_models=1)
    parameters = (ParameterSpec("t", float, per_model=False, help="0: the base, 1: the model"),)
    eps = 1e-8
    dot_threshold = 0.9995

    def working_set_factor(self, n_models: int) -> float:
        return 16.0

    def sum_phases(self, first: PieceMeta) -> List[str]:
        return [SLERP_NORMS, SLERP_DOT]

    def _norms(self, known: Sums, dtype: torch.dtype):
        norms = []
        for name in ("base", "model"):
            norm = norm_of(known[name], dtype)
            norms.append(torch.where(norm > self.eps, norm, 1))
        return norms

    def sums(self, phase: str, inputs: PieceInputs, known: Sums) -> Dict[str, torch.Tensor]:
        dtype = accumulator(inputs.base.dtype)
        a, b = inputs.base.to(dtype), inputs.models[0].to(dtype)
        if phase == SLERP_NORMS:
            return {"base": a.double().square(), "model": b.double().square()}
        norm_a, norm_b = self._norms(known, dtype)
        return {"dot": (a / norm_a) * (b / norm_b)}

    def apply(self, inputs: PieceInputs, carry: Sums) -> torch.Tensor:
        dtype = accumulator(inputs.base.dtype)
        t = torch.tensor(inputs.meta.params.shared["t"], dtype=torch.float64).to(dtype)
        dot = rounded(carry["dot"], dtype).clamp(-1, 1)
        linear = dot.abs() > self.dot_threshold
        theta = torch.acos(torch.where(linear, 0, dot))
        sin_theta = torch.sin(theta)
        coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
        coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
        return (coef_a * inputs.base.to(dtype) + coef_b * inputs.models[0].to(dtype)).to(inputs.base.dtype)


class NuSlerp(TensorSumsMethod):
    name = "nuslerp"
    description = "NuSLERP: spherical interpolation of two models (or their task vectors)"
    inputs = InputRules(base="optional", min_models=2, max_models=2)
    parameters = (
        ParameterSpec("weight", float, per_model=True, help="this model's share (t = w2 / (w1 + w2))"),
        ParameterSpec("nuslerp_row_wise", bool, per_model=False, default=False,
                      help="without flattening: interpolate columns instead of rows"),
        ParameterSpec("nuslerp_flatten", bool, per_model=False, default=True,
                      help="treat the whole tensor as one vector"),
    )
    eps = 1e-8

    def working_set_factor(self, n_models: int) -> float:
        return 14.0

    def _whole(self, meta: PieceMeta) -> bool:
        shared = meta.params.shared
        return shared["nuslerp_flatten"] or len(meta.shape) < 2

    def splittable(self, meta: PieceMeta) -> bool:
        # rows are the vectors (dim -1) unless row_wise asks for columns: then the tensor stays whole
        shared = meta.params.shared
        return self._whole(meta) or not shared["nuslerp_row_wise"]

    def sum_phases(self, first: PieceMeta) -> List[str]:
        return [SLERP_NORMS, SLERP_DOT] if self._whole(first) else []

    def _t(self, meta: PieceMeta) -> float:
        w1, w2 = meta.params.model_values("weight")
        total = w1 + w2
        return 0.5 if abs(total) < 1e-6 else w2 / total

    @staticmethod
    def _vectors(inputs: PieceInputs):
        v0, v1 = inputs.models
        if inputs.base is not None:
            v0, v1 = v0 - inputs.base, v1 - inputs.base
        return v0, v1

    def sums(self, phase: str, inputs: PieceInputs, known: Sums) -> Dict[str, torch.Tensor]:
        v0, v1 = self._vectors(inputs)
        if phase == SLERP_NORMS:
            return {"v0": v0.double().square(), "v1": v1.double().square()}
        n0, n1 = (norm_of(known[k], v0.dtype).clamp(min=1e-7) for k in ("v0", "v1"))
        return {"cos": (v0 / n0) * (v1 / n1)}

    def apply(self, inputs: PieceInputs, carry: Sums) -> torch.Tensor:
        v0, v1 = self._vectors(inputs)
        t = self._t(inputs.meta)
        if self._whole(inputs.meta):
            n0, n1 = (norm_of(carry[k], v0.dtype).clamp(min=1e-7) for k in ("v0", "v1"))
            cos_theta = rounded(carry["cos"], v0.dtype).clamp(-1, 1)
            result = self._interpolate(t, v0, v1, cos_theta)
        else:
            row_wise = inputs.meta.params.shared["nuslerp_row_wise"]
            a, b = (v0.transpose(0, -1), v1.transpose(0, -1)) if row_wise else (v0, v1)
            a_u = a / torch.norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
            b_u = b / torch.norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
            cos_theta = torch.sum(a_u * b_u, dim=-1, keepdim=True).clamp(-1, 1)
            result = self._interpolate(t, a, b, cos_theta)
            if row_wise:
                result = result.transpose(0, -1)
        return result if inputs.base is None else inputs.base + result

    def _interpolate(self, t: float, v0: torch.Tensor, v1: torch.Tensor, cos_theta: torch.Tensor) -> torch.Tensor:
        colinear = (1 - cos_theta.square()) <= self.eps ** 2
        theta = torch.acos(torch.where(colinear, 0, cos_theta))
        sin_theta = torch.sin(theta)
        result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
        return torch.where(colinear, (1 - t) * v0 + t * v1, result)


MS_NORMS, MS_MEAN, MS_DOTS, MS_TANGENT = "norms", "mean norm", "tangent dots", "tangent norm"


class MultiSlerp(TensorSumsMethod):
    name = "multislerp"
    description = "Multi-SLERP: weighted barycentric interpolation of several models on the hypersphere"
    inputs = InputRules(base="optional", min_models=1)
    parameters = (
        ParameterSpec("weight", float, per_model=True, help="this model's weight"),
        ParameterSpec("normalize_weights", bool, per_model=False, default=True, help="divide weights by their sum"),
        ParameterSpec("eps", float, per_model=False, default=1e-8, help="numerical floor"),
    )

    def working_set_factor(self, n_models: int) -> float:
        return 6.0 * n_models + 8.0

    def sum_phases(self, first: PieceMeta) -> List[str]:
        return [] if len(first.params.per_model) == 1 else [MS_NORMS, MS_MEAN, MS_DOTS, MS_TANGENT]

    @staticmethod
    def _stack(inputs: PieceInputs) -> torch.Tensor:
        tensors = torch.stack(inputs.models, dim=0)
        if inputs.base is not None:
            tensors -= inputs.base
        return tensors.reshape(tensors.shape[0], -1)

    def _weights(self, inputs: PieceInputs, dtype: torch.dtype) -> torch.Tensor:
        weights = torch.tensor(inputs.meta.params.model_values("weight"), dtype=dtype)
        if inputs.meta.params.shared["normalize_weights"]:
            weights = weights / weights.sum()
        return weights

    def _state(self, inputs: PieceInputs, known: Sums, upto: str) -> Dict[str, Any]:
        """Recompute this piece's intermediate tensors up to (not including) phase `upto`."""
        eps = inputs.meta.params.shared["eps"]
        flat = self._stack(inputs)
        n = flat.shape[0]
        state: Dict[str, Any] = {"flat": flat, "weights": self._weights(inputs, flat.dtype)}
        if upto == MS_NORMS:
            return state
        norms = torch.stack([norm_of(known[f"norm{i}"], flat.dtype) for i in range(n)]).reshape(n, 1)
        unit = flat / (norms + eps)
        mean = (unit * state["weights"].view(-1, 1)).sum(0)
        state.update(norms=norms, unit=unit, mean=mean)
        if upto == MS_MEAN:
            return state
        mean_norm = norm_of(known["mean"], flat.dtype)
        state["mean_norm"] = mean_norm
        if mean_norm < eps:
            return state
        mean = mean / mean_norm
        state["mean"] = mean
        if upto == MS_DOTS:
            return state
        dots = torch.stack([rounded(known[f"dot{i}"], flat.dtype) for i in range(n)]).reshape(n, 1)
        tangent = unit - dots * mean
        state["tangent_result"] = (tangent * state["weights"].view(-1, 1)).sum(0)
        return state

    def sums(self, phase: str, inputs: PieceInputs, known: Sums) -> Dict[str, torch.Tensor]:
        state = self._state(inputs, known, phase)
        if phase == MS_NORMS:
            return {f"norm{i}": row.double().square() for i, row in enumerate(state["flat"])}
        if phase == MS_MEAN:
            return {"mean": state["mean"].double().square()}
        if phase == MS_DOTS:
            if state["mean_norm"] < inputs.meta.params.shared["eps"]:
                return {}
            return {f"dot{i}": row * state["mean"] for i, row in enumerate(state["unit"])}
        if "tangent_result" not in state:
            return {}
        return {"tangent": state["tangent_result"].double().square()}

    def apply(self, inputs: PieceInputs, carry: Sums) -> torch.Tensor:
        if len(inputs.models) == 1:
            return inputs.models[0]
        eps = inputs.meta.params.shared["eps"]
        state = self._state(inputs, carry, "apply")
        shape = inputs.models[0].shape
        weights = state["weights"]
        if state["mean_norm"] < eps:
            if len(inputs.models) != 2:
                raise MergeFailed(
                    f"multislerp: the weighted sum of the unit task vectors of {inputs.meta.tensor!r} is zero "
                    "(antipodal inputs whose weights balance out); use different weights")
            flat = state["flat"]
            result = (flat[0] * weights[0] + flat[1] * weights[1]).view(shape)
        else:
            tangent_norm = norm_of(carry["tangent"], weights.dtype) + eps
            tangent_result = state["tangent_result"]
            result = state["mean"] * torch.cos(tangent_norm) + tangent_result * (
                torch.sin(tangent_norm) / tangent_norm)
            avg_norm = (state["norms"].squeeze(-1) * weights).sum()
            result = (result * avg_norm).view(shape)
        return result if inputs.base is None else result + inputs.base


SLERP = Slerp()
NUSLERP = NuSlerp()
MULTISLERP = MultiSlerp()
