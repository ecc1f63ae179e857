"""The protocol every merge method implements: statistics to reduce, then apply.

A method never sees Ray, files or the whole tensor. The engine hands it *pieces*: a
row range of one output tensor, with the matching rows of every input already in the
compute dtype. Methods that need per-tensor (or per-model) statistics declare how many
statistics passes they need; the engine runs each pass over every piece of a reduction
group, hands the partial results to `reduce`, and passes what `reduce` returns back to
each piece for the next pass and finally for `apply`. Because reductions are exact
(integer histograms, or statistics combined in a fixed order), the output does not
depend on how a tensor is split into pieces or where they run.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

REQUIRED = object()


@dataclass(frozen=True)
class ParameterSpec:
    """One config parameter of a method.

    `per_model` parameters may be set per input model (`models[i].parameters`) or
    globally; global ones (`per_model=False`) only under the top-level `parameters`.
    `check` returns a description of what is wrong with a value, or None.
    """

    name: str
    type: type
    per_model: bool
    default: Any = REQUIRED
    choices: Tuple[Any, ...] = ()
    check: Optional[Callable[[Any], Optional[str]]] = None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class ResolvedParams:
    """Parameter values for one tensor: global ones, and one dict per non-base input."""

    shared: Mapping[str, Any]
    per_model: Tuple[Mapping[str, Any], ...]

    def model_values(self, name: str) -> List[Any]:
        return [p[name] for p in self.per_model]


@dataclass(frozen=True)
class PieceMeta:
    """What a method may know about a piece without reading it."""

    tensor: str
    shape: Tuple[int, ...]
    row_start: int
    row_end: int
    dtype: torch.dtype  # compute dtype
    params: ResolvedParams

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def numel(self) -> int:
        return (self.row_end - self.row_start) * self.row_numel


@dataclass
class PieceInputs:
    """The rows of one piece from every input, in the compute dtype (read-only).

    `base` is None for methods without a base model; `models` are the other inputs in
    config order. `memo` lets a method keep derived tensors between the statistics
    passes and `apply` when they run in the same process.
    """

    meta: PieceMeta
    base: Optional[torch.Tensor]
    models: Tuple[torch.Tensor, ...]
    memo: Dict[str, Any] = field(default_factory=dict)


class KeepsNothing(ValueError):
    """A density keeps no entry of a tensor (or model) for one input model."""

    def __init__(self, what: str, model_index: int, density: float, numel: int) -> None:
        super().__init__(f"density {density} keeps no entry of {what} ({numel} elements) for model "
                         f"#{model_index + 1}; raise density to at least {1 / numel:.3g}")
        self.what, self.model_index, self.density, self.numel = what, model_index, density, numel


@dataclass(frozen=True)
class StatisticsPlan:
    passes: int
    carries: List[Any]


class MergeMethod(ABC):
    """A configured merge method (one instance per config name)."""

    name: str
    parameters: Tuple[ParameterSpec, ...]
    uses_base: bool
    description: str = ""

    def parameter(self, name: str) -> Optional[ParameterSpec]:
        return next((p for p in self.parameters if p.name == name), None)

    def check_config(self, shared: Mapping[str, Any]) -> Optional[str]:
        """Cross-parameter checks on the global parameters; return a problem or None."""
        return None

    def reduction_scope(self, shared: Mapping[str, Any]) -> str:
        """'tensor' (statistics per tensor) or 'model' (one group for the whole model)."""
        return "tensor"

    def working_set_factor(self, n_models: int) -> float:
        """Peak bytes held while applying, per element, in units of the compute dtype size."""
        return 2.0 * n_models + 4.0

    def plan_statistics(self, metas: Sequence[PieceMeta]) -> StatisticsPlan:
        """How many statistics passes a reduction group needs, and each piece's first carry.

        `metas` come in tie order: by tensor name, then row.
        """
        return StatisticsPlan(0, [None] * len(metas))

    def collect(self, pass_index: int, inputs: PieceInputs, carry: Any) -> Any:
        raise NotImplementedError

    def reduce(self, pass_index: int, metas: Sequence[PieceMeta], partials: Sequence[Any],
               carries: Sequence[Any]) -> List[Any]:
        raise NotImplementedError

    @abstractmethod
    def apply(self, inputs: PieceInputs, carry: Any) -> torch.Tensor:
        """The merged rows of this piece, in the compute dtype (the engine casts to out_dtype)."""


def run_in_memory(method: MergeMethod, pieces: Sequence[PieceInputs]) -> List[torch.Tensor]:
    """Run the whole protocol over the pieces of one reduction group in this process."""
    metas = [p.meta for p in pieces]
    stats = method.plan_statistics(metas)
    carries = stats.carries
    for pass_index in range(stats.passes):
        partials = [method.collect(pass_index, p, c) for p, c in zip(pieces, carries)]
        carries = method.reduce(pass_index, metas, partials, carries)
    return [method.apply(p, c) for p, c in zip(pieces, carries)]
