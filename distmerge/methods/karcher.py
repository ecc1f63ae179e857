"""The Karcher (Riemannian) mean on the unit hypersphere, as mergekit 0.1.5 computes it.

Every input (the base too, when the config names one: where it is listed, else last, as
mergekit orders its inputs) is a point u_i = x_i / |x_i| with weight 1/n; the mean starts at the normalized weighted sum
of the units and moves along the sphere until the tangent step is below `tol` or
`max_iter` steps are done; the result is the mean scaled by the mean norm.

Every norm and dot product is a whole-tensor reduction, and how many steps run depends
on the data, so the phases are decided as they go (`next_phase`): "norms", "mean norm",
then per step "step k dots", "step k tangent norm" and "step k unit norm". Between
phases a piece keeps only scalars: the mean after step k is recomputed from the inputs
and the reduced scalars, entry by entry, exactly as mergekit's loop computes it (same
dtypes, same operations), so a split tensor gives the same bits as a whole one.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Dict, List, Optional, Sequence

import torch

from distmerge.methods.base import InputRules, ParameterSpec, Phase, PieceInputs, PieceMeta, StatisticsPlan
from distmerge.methods.tensor_sums import TensorSumsMethod, accumulator, exact_parts, norm_of, rounded

NORMS, MEAN_NORM, DOTS, TANGENT, UNIT = "norms", "mean norm", "dots", "tangent norm", "unit norm"
Known = Dict[str, Fraction]


def _non_negative_int(value: Any) -> Optional[str]:
    return None if value >= 0 else "must be 0 or more"


class Karcher(TensorSumsMethod):
    name = "karcher"
    description = "Karcher mean: the weighted mean of the models on the hypersphere, by iteration"
    inputs = InputRules(base="input", min_models=1)
    parameters = (
        ParameterSpec("max_iter", int, per_model=False, default=10, check=_non_negative_int,
                      help="most steps of the iteration"),
        ParameterSpec("tol", float, per_model=False, default=1e-5, help="stop when a step is shorter than this"),
    )

    def working_set_factor(self, n_models: int) -> float:
        return 3.0 * n_models + 12.0

    # -- phases -------------------------------------------------------------------------

    def plan_statistics(self, metas: Sequence[PieceMeta]) -> StatisticsPlan:
        first = metas[0]
        shared = first.params.shared
        steps = int(shared["max_iter"])
        n = len(first.params.per_model)
        phases = (Phase(NORMS), Phase(MEAN_NORM), Phase("step (dots, tangent norm, unit norm)", 0, 3 * steps,
                                                        repeats=True))
        start = {"n": n, "tol": float(shared["tol"]), "max_iter": steps, "single": n == 1,
                 "wide": str(accumulator(first.dtype)).split(".")[-1]}
        return StatisticsPlan(phases, [start] * len(metas))

    def next_phase(self, plan: StatisticsPlan, done: int, carries: Sequence[Known]) -> Optional[Phase]:
        known = carries[0] if carries else {}
        if done == 0:
            return None if known.get("single") else Phase(NORMS)
        tol = known["tol"]
        if done == 1:
            return Phase(MEAN_NORM) if self._valid(known) else None
        step, part = divmod(done - 2, 3)
        if part == 2 and rounded_norm(known, f"tangent{step}") < tol:
            return None  # the last step found the tangent below tol: the mean stands
        if part == 0 and step >= known["max_iter"]:
            return None
        return Phase((DOTS, TANGENT, UNIT)[part], step)

    # -- the iteration, recomputed from the reduced scalars --------------------------------

    @staticmethod
    def _valid(known: Known) -> List[int]:
        return [i for i in range(known["n"]) if rounded_norm(known, f"norm{i}") > known["tol"]]

    def _start(self, tensors: List[torch.Tensor], known: Known):
        """(units, valid indices, normalized alphas, norms as tensors) from the norms phase."""
        wide = accumulator(tensors[0].dtype)
        norms = [norm_of(known[f"norm{i}"], wide) for i in range(len(tensors))]
        units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
        valid = [i for i, n in enumerate(norms) if n.item() > known["tol"]]
        alphas = [1.0 / len(tensors)] * len(tensors)
        alpha_sum = sum(alphas[i] for i in valid)
        normalized = [alphas[i] / alpha_sum for i in valid]
        return units, valid, normalized, norms, wide

    def _mean(self, tensors: List[torch.Tensor], known: Known, through: int, memo: Dict[str, Any]) -> torch.Tensor:
        """The mean after `through` completed steps (0: the starting mean), this piece's entries."""
        cached = memo.get("mean")
        units, valid, alphas, _, wide = self._start(tensors, known)
        if cached is not None and cached[0] == through:
            return cached[1]
        if cached is not None and cached[0] < through:
            first, mean = cached
        else:
            mean = self._weighted_units(units, valid, alphas)
            mean_norm = norm_of(known["mean"], wide)
            mean = units[valid[0]].clone() if mean_norm.item() < known["tol"] else (mean / mean_norm).to(mean.dtype)
            first = 0
        for step in range(first, through):
            tangent = self._tangent(mean, units, valid, alphas, known, step)
            mean = self._moved(mean, tangent, norm_of(known[f"tangent{step}"], wide))
            unit_norm = norm_of(known[f"unit{step}"], wide)
            if unit_norm.item() > known["tol"]:
                mean = (mean / unit_norm).to(mean.dtype)
        memo["mean"] = (through, mean)
        return mean

    @staticmethod
    def _weighted_units(units: List[torch.Tensor], valid: List[int], alphas: List[float]) -> torch.Tensor:
        """The starting mean before normalization: sum of alpha * unit, in the inputs' dtype."""
        mean = torch.zeros_like(units[valid[0]])
        for alpha, i in zip(alphas, valid):
            mean += alpha * units[i]
        return mean

    @staticmethod
    def _moved(mean: torch.Tensor, tangent: torch.Tensor, tangent_norm: torch.Tensor) -> torch.Tensor:
        """One step along the sphere (before renormalization), as mergekit computes it."""
        return (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)

    def _tangent(self, mean: torch.Tensor, units: List[torch.Tensor], valid: List[int], alphas: List[float],
                 known: Known, step: int) -> torch.Tensor:
        tangent = torch.zeros_like(mean)
        for alpha, i in zip(alphas, valid):
            dot = torch.clamp(rounded(known[f"dot{step},{i}"], mean.dtype), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < known["tol"]:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (units[i] - dot * mean)
        return tangent

    # -- protocol -------------------------------------------------------------------------

    def collect(self, phase: Phase, inputs: PieceInputs, carry: Known) -> Any:
        tensors = list(inputs.models)
        wide = accumulator(tensors[0].dtype)
        if phase.step == NORMS:
            return {f"norm{i}": exact_parts(t.to(wide).double().square()) for i, t in enumerate(tensors)}
        units, valid, alphas, _, _ = self._start(tensors, carry)
        if phase.step == MEAN_NORM:
            return {"mean": exact_parts(self._weighted_units(units, valid, alphas).to(wide).double().square())}
        step = phase.index
        mean = self._mean(tensors, carry, step, inputs.memo)
        if phase.step == DOTS:
            return {f"dot{step},{i}": exact_parts(mean.double().reshape(-1) * units[i].double().reshape(-1))
                    for i in valid}
        tangent = self._tangent(mean, units, valid, alphas, carry, step)
        if phase.step == TANGENT:
            return {f"tangent{step}": exact_parts(tangent.to(wide).double().square())}
        moved = self._moved(mean, tangent, norm_of(carry[f"tangent{step}"], wide))
        return {f"unit{step}": exact_parts(moved.to(wide).double().square())}

    def apply(self, inputs: PieceInputs, carry: Known) -> torch.Tensor:
        tensors = list(inputs.models)
        if len(tensors) == 1:
            return tensors[0]
        _, valid, _, norms, _ = self._start(tensors, carry)
        if not valid:
            return sum(t * 0 for t in tensors)
        mean = self._mean(tensors, carry, self._completed_steps(carry), inputs.memo)
        inputs.memo.clear()
        alphas = [1.0 / len(tensors)] * len(tensors)
        scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
        return scale * mean

    @staticmethod
    def _completed_steps(known: Known) -> int:
        """Steps that moved the mean: each whose unit norm was reduced."""
        return sum(1 for name in known if name.startswith("unit"))


def rounded_norm(known: Known, name: str) -> float:
    """A reduced norm as mergekit compares it with tol: in float32, float64 for float64 inputs."""
    return float(norm_of(known[name], getattr(torch, known["wide"])))


KARCHER = Karcher()
