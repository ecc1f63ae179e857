"""Whole-tensor sums (norms, dot products) as exact reductions: a base for methods built on them.

A method lists its sum phases in order; in each phase every piece returns, for each
named statistic, a tensor whose sum is wanted (squares, products: computed entry by
entry as the method's reference computes them). Pieces' sums are exact (integers per
binary exponent, exactsum.py) and add up across any split; the reduction turns them
into exact fractions, which later phases and `apply` round as they need. So a norm or a
dot product is the same whatever the split, and differs from a float sum of the same
entries (mergekit's) at most in its last bit.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

from distmerge.methods import exactsum
from distmerge.methods.base import MergeMethod, Phase, PieceInputs, PieceMeta, StatisticsPlan

Sums = Mapping[str, Fraction]


def exact_parts(x: torch.Tensor) -> Tuple[Dict[int, int], Dict[int, int]]:
    """Exact signed parts of sum(x), for x of any float dtype (widened to float64 exactly)."""
    return exactsum.signed_sum_parts(x.to(torch.float64).reshape(-1))


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch's CPU reductions accumulate `dtype` in (float32 for 16-bit floats)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rounded(value: Fraction, dtype: torch.dtype) -> torch.Tensor:
    """An exact sum as a 0-d tensor of `dtype`, rounded as a torch reduction's result is:
    to its accumulator dtype first, then to `dtype` (so double-rounding ties go the same way)."""
    return torch.tensor(float(value), dtype=torch.float64).to(accumulator(dtype)).to(dtype)


def norm_of(sum_of_squares: Fraction, dtype: torch.dtype) -> torch.Tensor:
    """sqrt of an exact sum of squares as torch's norm gives it: sum and root in the
    accumulator dtype, then cast to `dtype`."""
    acc = accumulator(dtype)
    return torch.sqrt(torch.tensor(float(sum_of_squares), dtype=torch.float64).to(acc)).to(dtype)


class TensorSumsMethod(MergeMethod):
    """A method whose statistics are exact whole-tensor sums, phase after phase."""

    def sum_phases(self, first: PieceMeta) -> List[str]:
        """The names of the sum phases a tensor needs, in order (may depend on its parameters)."""
        return []

    def sums(self, phase: str, inputs: PieceInputs, known: Sums) -> Dict[str, torch.Tensor]:
        """For `phase`, each statistic's entries on this piece (their sum is wanted), given
        the sums reduced in earlier phases."""
        raise NotImplementedError

    def plan_statistics(self, metas: Sequence[PieceMeta]) -> StatisticsPlan:
        names = self.sum_phases(metas[0])
        return StatisticsPlan(tuple(Phase(name) for name in names), [{} for _ in metas])

    def collect(self, phase: Phase, inputs: PieceInputs, carry: Sums) -> Any:
        return {name: exact_parts(entries) for name, entries in self.sums(phase.step, inputs, carry).items()}

    def reduce(self, phase: Phase, metas: Sequence[PieceMeta], partials: Sequence[Any],
               carries: Sequence[Sums]) -> List[Sums]:
        known = dict(carries[0])
        for name in partials[0]:
            parts = exactsum.add_signed([p[name] for p in partials])
            known[name] = exactsum.signed_value(parts, torch.float64)
        return [known] * len(carries)
