"""mergekit 0.1.5 as the oracle, with its sorts made stable.

mergekit ranks magnitudes with `torch.argsort`, `torch.sort` and `torch.topk`, whose
order among equal values is unspecified. distmerge's rule is the one a stable sort
gives: equal magnitudes ordered by flat index. Within `stable_sorts()` mergekit's calls
use stable sorts, so "bit-identical to mergekit" is a well-defined claim.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch


@contextlib.contextmanager
def stable_sorts() -> Iterator[None]:
    original_argsort, original_sort, original_topk = torch.argsort, torch.sort, torch.topk

    def argsort(input, dim=-1, descending=False, stable=True, **kwargs):
        return original_argsort(input, dim=dim, descending=descending, stable=True, **kwargs)

    def sort(input, dim=-1, descending=False, stable=True, **kwargs):
        return original_sort(input, dim=dim, descending=descending, stable=True, **kwargs)

    def topk(input, k, dim=-1, largest=True, sorted=True, **kwargs):
        order = original_argsort(input, dim=dim, descending=largest, stable=True)
        indices = order.narrow(dim, 0, k)
        return torch.gather(input, dim, indices), indices

    torch.argsort, torch.sort, torch.topk = argsort, sort, topk
    try:
        yield
    finally:
        torch.argsort, torch.sort, torch.topk = original_argsort, original_sort, original_topk


def merge_tensor(method: str, base: Optional[torch.Tensor], models: Sequence[torch.Tensor],
                 shared: Dict[str, Any], per_model: List[Dict[str, Any]], name: str = "t") -> torch.Tensor:
    """mergekit's merge of one tensor (stable sorts), parameters already resolved."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import ParameterScope, TensorGroup

    merge_method = registry.get(method)
    # mergekit appends a base model that is not listed among the models after them
    tensors = list(models) + ([base] if base is not None else [])
    ids = [f"m{i}" for i in range(len(models))] + (["base"] if base is not None else [])
    group = TensorGroup.from_tensors(tensors, ids=ids, base_index=len(models) if base is not None else None,
                                     name=name)
    parameters: Dict[str, Any] = {}
    for spec in merge_method.spec.parameters:
        if spec.scope == ParameterScope.SHARED:
            if spec.name in shared:
                parameters[spec.name] = shared[spec.name]
        else:
            values = {f"m{i}": p.get(spec.name, None if spec.required else spec.default)
                      for i, p in enumerate(per_model)}
            if any(v is not None for v in values.values()):
                parameters[spec.name] = values
    with stable_sorts():
        return merge_method([group], parameters=parameters)[0]
