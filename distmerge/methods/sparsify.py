"""How a task vector is thinned before merging: mergekit 0.1.5's sparsification kinds.

Each kind is a small object the task-vector methods are configured with:
- `magnitude` (TIES): keep the k = max(1, int(density * numel)) largest magnitudes;
- `magnitude_outliers` (breadcrumbs): drop the gamma share of largest magnitudes and
  enough of the smallest to keep int(density * numel), in a stable ascending order;
- `random` (DARE): keep each entry with probability density;
- `della_magprune` (DELLA): keep each entry with a probability that grows with its
  magnitude rank within its row, from density - epsilon to density + epsilon.

Ranked kinds find their thresholds with exact radix selection (topk.py) over the whole
tensor (or model); random kinds draw from the counter-based generator keyed by
(seed, tensor, model, flat element index). Either way, any split of a tensor into row
ranges keeps exactly the same entries.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch

from distmerge.methods import counter_rng, topk
from distmerge.methods.base import ParameterSpec, PieceInputs, PieceMeta


def _non_negative_share(value: float) -> Optional[str]:
    return None if value >= 0 else "must be >= 0 (0 keeps nothing, 1 or more keeps every entry)"


def _fraction(value: float) -> Optional[str]:
    return None if 0 <= value <= 1 else "must be between 0 and 1"


DENSITY = ParameterSpec("density", float, per_model=True, default=1.0, check=_non_negative_share,
                        help="fraction of each task vector kept")


class Sparsifier:
    """One way of thinning a task vector (see the module docstring)."""

    kind: str = ""
    parameters: Tuple[ParameterSpec, ...] = (DENSITY,)
    ranked = False  # thresholds found by radix selection over the group
    uses_random = False
    extra_working_set = 0.0  # per element, in units of the compute dtype size

    def work_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """mergekit's dtype for the mask and rescale (its CPU kernels widen float16)."""
        return dtype

    def splittable(self, meta: PieceMeta) -> bool:
        return True

    def check(self, values: Mapping[str, float]) -> Optional[str]:
        """A problem with one model's resolved values for one tensor, or None."""
        return None

    def selection(self, bits: int, numel: int, values: Mapping[str, float]) -> Optional[topk.Selection]:
        """The group's selection for a ranked kind (None: keeps every entry)."""
        raise NotImplementedError

    def keep(self, inputs: PieceInputs, model: int, delta: torch.Tensor, density: float,
             values: Mapping[str, float]) -> Optional[torch.Tensor]:
        """A boolean mask of kept entries for a random kind (None: keeps every entry)."""
        raise NotImplementedError


class Magnitude(Sparsifier):
    kind = "magnitude"
    ranked = True

    def selection(self, bits: int, numel: int, values: Mapping[str, float]) -> Optional[topk.Selection]:
        density = values["density"]
        if density >= 1:
            return None
        k = max(1, int(density * numel)) if density > 0 and numel else 0
        return topk.top_k(bits, numel, k)


class MagnitudeOutliers(Sparsifier):
    kind = "magnitude_outliers"
    ranked = True
    parameters = (DENSITY, ParameterSpec("gamma", float, per_model=True, default=0.01, check=_fraction,
                                         help="fraction of the largest magnitudes dropped as outliers"))

    def selection(self, bits: int, numel: int, values: Mapping[str, float]) -> Optional[topk.Selection]:
        density = values["density"]
        if density >= 1:
            return None
        keep = int(density * numel)
        drop_top = int(values["gamma"] * numel)
        drop_bottom = max(0, numel - keep - drop_top)
        return topk.ascending_window(bits, numel, drop_bottom, drop_bottom + keep)


class Random(Sparsifier):
    kind = "random"
    uses_random = True
    extra_working_set = 6.0

    def work_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if dtype == torch.float16 else dtype

    def keep(self, inputs: PieceInputs, model: int, delta: torch.Tensor, density: float,
             values: Mapping[str, float]) -> Optional[torch.Tensor]:
        if density >= 1:
            return None
        meta = inputs.meta
        # mergekit's keep probability is the density held in the work dtype (bf16: 0.3 -> 0.30078125)
        probability = float(torch.tensor(density, dtype=delta.dtype))
        return counter_rng.below(meta.seed, meta.tensor, model, meta.first_element, meta.numel,
                                 probability).reshape(delta.shape)


class DellaMagprune(Sparsifier):
    """DELLA's MAGPRUNE: within each row (a 1-D tensor is one row), the entry of magnitude
    rank r (0-based, stable ascending) is kept with probability
    density - epsilon + 2 * epsilon * r / (n - 1)."""

    kind = "della_magprune"
    uses_random = True
    extra_working_set = 14.0
    parameters = (DENSITY, ParameterSpec("epsilon", float, per_model=True, default=0.15,
                                         help="spread of the keep probabilities around density"))

    def work_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if dtype == torch.float16 else dtype

    def splittable(self, meta: PieceMeta) -> bool:
        return len(meta.shape) >= 2  # ranks run along dim 1: rows stay whole; a 1-D tensor is one row

    def check(self, values: Mapping[str, float]) -> Optional[str]:
        density, epsilon = values["density"], values["epsilon"]
        if 0 < density < 1 and not (0 < density - epsilon and density + epsilon < 1):
            return (f"density {density:g} +/- epsilon {epsilon:g} must lie inside (0, 1); "
                    f"lower epsilon below {min(density, 1 - density):g}")
        return None

    def keep(self, inputs: PieceInputs, model: int, delta: torch.Tensor, density: float,
             values: Mapping[str, float]) -> Optional[torch.Tensor]:
        if density >= 1:
            return None
        if density <= 0:
            return torch.zeros(delta.shape, dtype=torch.bool)
        epsilon = values["epsilon"]
        rows = delta if delta.dim() >= 2 else delta.reshape(1, -1)
        probability = self._probabilities(rows, density, epsilon)
        meta = inputs.meta
        draws = counter_rng.uniform(meta.seed, meta.tensor, model, meta.first_element, meta.numel)
        return (draws.reshape(probability.shape) < probability).reshape(delta.shape)

    @staticmethod
    def _probabilities(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
        """Each entry's keep probability, computed as mergekit does, in the work dtype of `rows`
        (so bf16 ranks round as they do there); ranks are 1-based, stable along dim 1.
        A row of one entry (mergekit fails on it: 0/0) keeps it with probability density - epsilon."""
        order = torch.argsort(topk.magnitude_keys(rows), dim=1, stable=True)
        ranks = torch.empty_like(order)
        positions = torch.arange(rows.shape[1], dtype=order.dtype).reshape((1, -1) + (1,) * (rows.dim() - 2))
        ranks.scatter_(1, order, positions.expand_as(order).contiguous())
        del order
        ranks = ranks.to(rows.dtype) + 1
        lowest, highest = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
        span = highest - lowest
        rank_norm = ((ranks - lowest) / torch.where(span == 0, 1, span)).clamp(0, 1)
        return ((density - epsilon) + rank_norm * 2 * epsilon).double()


SPARSIFIERS = {s.kind: s for s in (Magnitude(), MagnitudeOutliers(), Random(), DellaMagprune())}
