"""The protocol every merge method implements: named statistics phases, then apply.

A method never sees Ray, files or the whole tensor. The engine hands it *pieces*: a
row range of one output tensor, with the matching rows of every input already in the
compute dtype. Methods that need per-tensor (or per-model) statistics declare them as
named *phases* (`plan_statistics`); the engine runs each phase over every piece of a
reduction group (`collect`), hands the partial results to `reduce`, and passes what
`reduce` returns back to each piece for the next phase and finally for `apply`.
Because reductions are exact (integer histograms and counts, sums kept as integers),
the output does not depend on how a tensor is split into pieces or where they run.

What else a method declares to the engine, without the engine knowing the method:
- `inputs`: its input rules (base required/forbidden, how many models), checked at planning;
- `splittable`: whether a tensor may be cut into row ranges (a method that ranks
  within whole rows, or along a 1-D tensor, says no for those tensors);
- `working_set_factor`: its peak working memory per element, for the split sizes;
- `uses_random`: whether it draws from the seeded counter-based generator (random.py).
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
class InputRules:
    """What inputs a method accepts: mergekit's input contract, checked at planning.

    `base`: "required", "optional" (used when the config names one), "input" (a named
    base_model is one more input, where it is listed under models, else last: mergekit's
    default for methods that do not single the base out), "ignored" (a base_model is only
    the donor of config.json and the tokenizer) or "forbidden". Counts are of the models
    other than the base.
    """

    base: str = "required"
    min_models: int = 1
    max_models: Optional[int] = None

    def takes_base(self, base_given: bool) -> bool:
        """Whether the base model is an input apart (pieces then carry a base tensor)."""
        return base_given and self.base in ("required", "optional")

    def problems(self, method: str, base_given: bool, n_models: int) -> Optional[Tuple[str, str]]:
        """(config key, what is wrong and how to fix it), or None when the inputs fit.

        `base_given`: the config names a base_model; `n_models`: the models other than the base."""
        if self.base == "required" and not base_given:
            return "base_model", f"is required by merge_method {method}; name the model the others were tuned from"
        if self.base == "forbidden" and base_given:
            return "base_model", f"merge_method {method} takes no base model; remove base_model"
        has_base = self.takes_base(base_given)
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            if self.max_models == self.min_models:
                want = f"exactly {self.min_models}"
            elif self.max_models is None:
                want = f"at least {self.min_models}"
            else:
                want = f"{self.min_models} to {self.max_models}"
            others = " besides the base model" if has_base else ""
            return "models", f"merge_method {method} needs {want} model(s){others}, got {n_models}"
        return None


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
    seed: int = 0  # the merge's random seed (methods that draw random numbers key on it)
    with_base: bool = True  # whether pieces carry a base tensor apart from the models

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def numel(self) -> int:
        return (self.row_end - self.row_start) * self.row_numel

    @property
    def tensor_numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1

    @property
    def first_element(self) -> int:
        """Flat index (in the whole tensor) of this piece's first element."""
        return self.row_start * self.row_numel


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


@dataclass(frozen=True)
class Phase:
    """One statistics phase: what the method computes (`step`, and which pass of a
    multi-pass step), and the name `distmerge plan` shows. The engine treats it as opaque.

    A phase with `repeats` stands for a step run up to `of` times, as often as the data
    needs (an iteration to convergence); the method's `next_phase` decides."""

    step: str
    index: int = 0
    of: int = 1
    repeats: bool = False

    @property
    def name(self) -> str:
        if self.repeats:
            return f"{self.step} (up to {self.of}x)"
        return self.step if self.of == 1 else f"{self.step} {self.index + 1}/{self.of}"


@dataclass(frozen=True)
class StatisticsPlan:
    """The named statistics phases a reduction group runs, in order, and each piece's first carry."""

    phases: Tuple[Phase, ...]
    carries: List[Any]

    @property
    def passes(self) -> int:
        """At most how many times each piece's inputs are read for statistics (one per phase run)."""
        return sum(p.of if p.repeats else 1 for p in self.phases)


class MergeMethod(ABC):
    """A configured merge method (one instance per config name)."""

    name: str
    parameters: Tuple[ParameterSpec, ...]
    inputs: InputRules = InputRules()
    description: str = ""
    uses_random: bool = False

    @property
    def uses_base(self) -> bool:
        """Whether pieces always carry a base tensor (a base model is required)."""
        return self.inputs.base == "required"

    def parameter(self, name: str) -> Optional[ParameterSpec]:
        return next((p for p in self.parameters if p.name == name), None)

    def check_config(self, shared: Mapping[str, Any]) -> Optional[str]:
        """Cross-parameter checks on the global parameters; return a problem or None."""
        return None

    def check_tensor(self, params: ResolvedParams) -> Optional[Tuple[Optional[int], str]]:
        """Checks on the values resolved for one tensor (after gradients and filters):
        None, or (the index of the model whose values are wrong, or None; the problem)."""
        return None

    def splittable(self, meta: PieceMeta) -> bool:
        """Whether this tensor may be processed as separate row ranges (the split policy)."""
        return True

    def reduction_scope(self, shared: Mapping[str, Any]) -> str:
        """'tensor' (statistics per tensor) or 'model' (one group for the whole model)."""
        return "tensor"

    def working_set_factor(self, n_models: int) -> float:
        """Peak bytes held while applying, per element, in units of the compute dtype size."""
        return 2.0 * n_models + 4.0

    def plan_statistics(self, metas: Sequence[PieceMeta]) -> StatisticsPlan:
        """The statistics phases a reduction group needs, and each piece's first carry.

        `metas` come in tie order: by tensor name, then row.
        """
        return StatisticsPlan((), [None] * len(metas))

    def next_phase(self, plan: StatisticsPlan, done: int, carries: Sequence[Any]) -> Optional[Phase]:
        """The phase to run after `done` phases, seeing what was reduced so far (None: apply).

        By default the plan's phases in order; a method whose number of rounds depends on
        the data (a `repeats` phase) decides here, from `carries` (the same for every piece's
        decision, since reductions are exact)."""
        return plan.phases[done] if done < len(plan.phases) else None

    def collect(self, phase: Phase, inputs: PieceInputs, carry: Any) -> Any:
        """One piece's partial statistics for `phase` (small: histograms, counts, sums)."""
        raise NotImplementedError

    def reduce(self, phase: Phase, metas: Sequence[PieceMeta], partials: Sequence[Any],
               carries: Sequence[Any]) -> List[Any]:
        """Combine the pieces' partials of `phase` (in tie order); return each piece's next carry."""
        raise NotImplementedError

    def split_carry(self, inputs: PieceInputs, carry: Any, parts: Sequence[PieceInputs]) -> Optional[List[Any]]:
        """The carries of `parts`, consecutive row ranges (views) of the piece `inputs` whose
        reduced carry is `carry`, so that a piece over the CPU caches is applied in
        cache-sized ranges; None (the default) applies it whole. Only for a method whose
        `splittable` allows the piece to be cut."""
        return None

    @abstractmethod
    def apply(self, inputs: PieceInputs, carry: Any) -> torch.Tensor:
        """The merged rows of this piece, in the compute dtype (the engine casts to out_dtype)."""


def reduce_statistics(method: MergeMethod, metas: Sequence[PieceMeta],
                      load: Callable[[int], PieceInputs]) -> List[Any]:
    """Run every statistics phase of one reduction group in this process; return each
    piece's final carry. `load(i)` gives piece i's inputs, once per phase: the same object
    each time (its memo kept), or loaded anew (one piece in memory at a time)."""
    stats = method.plan_statistics(metas)
    carries = stats.carries
    done = 0
    while (phase := method.next_phase(stats, done, carries)) is not None:
        partials = [method.collect(phase, load(i), c) for i, c in enumerate(carries)]
        carries = method.reduce(phase, metas, partials, carries)
        done += 1
    return carries


def run_in_memory(method: MergeMethod, pieces: Sequence[PieceInputs]) -> List[torch.Tensor]:
    """Run the whole protocol over the pieces of one reduction group in this process."""
    carries = reduce_statistics(method, [p.meta for p in pieces], lambda i: pieces[i])
    return [method.apply(p, c) for p, c in zip(pieces, carries)]
