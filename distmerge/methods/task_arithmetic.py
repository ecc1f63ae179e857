"""Task-vector methods: task_arithmetic and TIES (mergekit's generalized task arithmetic).

Math (DESIGN.md §2), mirroring mergekit's operation order and dtypes so results are
bit-identical to it:
  delta_i = theta_i - theta_base                       (compute dtype)
  sparsify each delta_i to its top-k magnitudes        (TIES; k = int(density * numel))
  W_i = w_i * delta_i                                  (w_i cast to the compute dtype)
  TIES: elected sign = sign(sum_i W_i) (>= 0 -> +1); mask_i = sign(W_i) == elected
        mixed = sum_i W_i * mask_i;  divisor = sum_i w_i * mask_i (0 -> 1)
  task_arithmetic: mixed = sum_i W_i; divisor = sum_i w_i (|.| < 1e-8 -> 1)
  normalize: mixed /= divisor;  mixed *= lambda;  out = theta_base + mixed
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch

from distmerge.methods import exactsum, signs, topk
from distmerge.methods.base import (
    KeepsNothing,
    MergeMethod,
    ParameterSpec,
    PieceInputs,
    PieceMeta,
    StatisticsPlan,
)


def _density_problem(value: float) -> Optional[str]:
    if not 0 < value <= 1:
        return "must be in (0, 1]"
    return None


@dataclass(frozen=True)
class PieceCarry:
    """Per-piece state: one topk.Selection per model (None: keep all), and rescale factors."""

    selections: Tuple[Optional[topk.Selection], ...]
    # per model: (sum|delta|, sum|kept|, their ratio), each from exact sums rounded once
    l1: Optional[Tuple[Tuple[float, float, float], ...]] = None


class TaskVectorMerge(MergeMethod):
    uses_base = True

    def __init__(self, name: str, *, sparsify: bool, consensus: bool,
                 default_normalize: bool, description: str) -> None:
        self.name = name
        self.sparsify = sparsify
        self.consensus = consensus
        self.description = description
        params = [
            ParameterSpec("weight", float, per_model=True, help="scale of this model's task vector"),
            ParameterSpec("normalize", bool, per_model=False, default=default_normalize,
                          help="divide by the sum of (agreeing) weights"),
            ParameterSpec("lambda", float, per_model=False, default=1.0, help="scale of the merged task vector"),
            ParameterSpec("int8_mask", bool, per_model=False, default=False,
                          help="store sign masks as int8 (memory only; same result)"),
        ]
        if sparsify:
            params += [
                ParameterSpec("density", float, per_model=True, default=1.0, check=_density_problem,
                              help="fraction of each task vector kept, by magnitude"),
                ParameterSpec("rescale", bool, per_model=False, default=False,
                              help="rescale kept entries to the task vector's L1 norm"),
            ]
        if consensus:
            params += [
                ParameterSpec("sign_election", str, per_model=False, default="weighted",
                              choices=("weighted", "unweighted"),
                              help="elect signs from weighted (mergekit) or unweighted (TIES paper) deltas"),
                ParameterSpec("density_scope", str, per_model=False, default="tensor",
                              choices=("tensor", "model"),
                              help="top-k per tensor (mergekit) or over the whole model (TIES paper)"),
            ]
        self.parameters = tuple(params)

    # -- planning -----------------------------------------------------------------

    def check_config(self, shared: Mapping[str, Any]) -> Optional[str]:
        if shared.get("density_scope") == "model" and shared.get("rescale"):
            return "rescale is not supported with density_scope: model"
        return None

    def reduction_scope(self, shared: Mapping[str, Any]) -> str:
        return shared.get("density_scope", "tensor")

    def working_set_factor(self, n_models: int) -> float:
        # inputs (n+1), deltas, stacked weighted deltas, masked product, keys, result.
        return 4.0 * n_models + 4.0 if self.consensus else 2.0 * n_models + 3.0

    def _selecting(self, meta: PieceMeta) -> List[bool]:
        if not self.sparsify:
            return [False] * len(meta.params.per_model)
        return [d < 1 for d in meta.params.model_values("density")]

    def plan_statistics(self, metas: Sequence[PieceMeta]) -> StatisticsPlan:
        first = metas[0]
        selecting = self._selecting(first)
        if not any(selecting):
            return StatisticsPlan(0, [None] * len(metas))
        dtypes = {m.dtype for m in metas}
        key_dtype = dtypes.pop() if len(dtypes) == 1 else (
            torch.float64 if torch.float64 in dtypes else torch.float32)
        bits = topk.key_bits(key_dtype)
        total = sum(m.numel for m in metas)
        states = []
        for model_index, (sel, density) in enumerate(zip(selecting, first.params.model_values("density"))):
            if not sel:
                states.append(None)
                continue
            k = int(density * total)
            if k == 0:
                what = f"tensor {first.tensor!r}" if len({m.tensor for m in metas}) == 1 else "the model"
                raise KeepsNothing(what, model_index, density, total)
            states.append(topk.Selection(bits, 0, k))
        passes = topk.passes_for(bits) + (1 if first.params.shared.get("rescale") else 0)
        carry = PieceCarry(tuple(states))
        return StatisticsPlan(passes, [carry] * len(metas))

    # -- statistics -----------------------------------------------------------------

    def _deltas(self, inputs: PieceInputs) -> List[torch.Tensor]:
        if "deltas" not in inputs.memo:
            inputs.memo["deltas"] = [m - inputs.base for m in inputs.models]
        return inputs.memo["deltas"]

    def _keys(self, inputs: PieceInputs, carry: PieceCarry, index: int) -> torch.Tensor:
        memo_key = f"keys{index}"
        if memo_key not in inputs.memo:
            delta = self._deltas(inputs)[index]
            bits = carry.selections[index].bits
            if topk.key_bits(delta.dtype) != bits:
                delta = delta.to({16: torch.float16, 32: torch.float32, 64: torch.float64}[bits])
            inputs.memo[memo_key] = topk.magnitude_keys(delta)
        return inputs.memo[memo_key]

    def _radix_passes(self, carry: PieceCarry) -> int:
        bits = next(s.bits for s in carry.selections if s is not None)
        return topk.passes_for(bits)

    def collect(self, pass_index: int, inputs: PieceInputs, carry: PieceCarry) -> Any:
        if pass_index < self._radix_passes(carry):
            return [
                None if sel is None else topk.digit_histogram(self._keys(inputs, carry, i), sel.bits, pass_index, sel.prefix)
                for i, sel in enumerate(carry.selections)
            ]
        sums = []
        for i, delta in enumerate(self._deltas(inputs)):
            kept = self._sparse_delta(inputs, carry, i)
            sums.append((exactsum.abs_sum_parts(delta), exactsum.abs_sum_parts(kept)))
        return sums

    def reduce(self, pass_index: int, metas: Sequence[PieceMeta], partials: Sequence[Any],
               carries: Sequence[PieceCarry]) -> List[PieceCarry]:
        if pass_index >= self._radix_passes(carries[0]):
            dtype = metas[0].dtype
            totals = []
            for i in range(len(carries[0].selections)):
                before = exactsum.value(exactsum.add_parts([p[i][0] for p in partials]), dtype)
                after = exactsum.value(exactsum.add_parts([p[i][1] for p in partials]), dtype)
                totals.append((float(before), float(after), float(before / after) if after else 0.0))
            return [PieceCarry(c.selections, tuple(totals)) for c in carries]
        per_piece: List[List[Optional[topk.Selection]]] = [[] for _ in carries]
        for i in range(len(carries[0].selections)):
            states = [c.selections[i] for c in carries]
            if states[0] is None:
                for row in per_piece:
                    row.append(None)
                continue
            new_states = topk.reduce_pass(pass_index, states, [p[i] for p in partials])
            for row, state in zip(per_piece, new_states):
                row.append(state)
        return [PieceCarry(tuple(row)) for row in per_piece]

    # -- apply ------------------------------------------------------------------------

    def _sparse_delta_into(self, inputs: PieceInputs, carry: Optional[PieceCarry], index: int,
                           out: torch.Tensor) -> torch.Tensor:
        """Write the trimmed delta of model `index` into `out` (mergekit: delta * 0/1 mask)."""
        delta = self._deltas(inputs)[index]
        if carry is None or carry.selections[index] is None:
            return out.copy_(delta)
        keys = self._keys(inputs, carry, index)
        keep = topk.keep_bits(keys, carry.selections[index])
        if keys.element_size() == delta.element_size():
            torch.bitwise_and(signs.as_int(delta), keep, out=signs.as_int(out))
        else:  # model-wide keys in a wider dtype than this tensor
            torch.mul(delta, (keep == -1).to(delta.dtype), out=out)
        return out

    def _sparse_delta(self, inputs: PieceInputs, carry: Optional[PieceCarry], index: int) -> torch.Tensor:
        delta = self._deltas(inputs)[index]
        return self._sparse_delta_into(inputs, carry, index, torch.empty_like(delta))

    def apply(self, inputs: PieceInputs, carry: Optional[PieceCarry]) -> torch.Tensor:
        params = inputs.meta.params
        shared = params.shared
        base = inputs.base
        n = len(inputs.models)
        dtype = base.dtype
        deltas = base.new_empty((n, *base.shape))
        for i in range(n):
            self._sparse_delta_into(inputs, carry, i, deltas[i])
            if carry is not None and carry.l1 is not None and carry.selections[i] is not None:
                before, after, ratio = carry.l1[i]
                if before >= 1e-7 and after >= 1e-7:
                    deltas[i] *= torch.tensor(ratio, dtype=dtype)
        inputs.memo.clear()

        weights = torch.tensor(params.model_values("weight"), dtype=dtype)
        weights = weights.reshape((n,) + (1,) * base.dim())
        unweighted_sum = None
        if self.consensus and shared.get("sign_election") == "unweighted":
            unweighted_sum = deltas.sum(dim=0)
        deltas.mul_(weights)

        if self.consensus:
            if unweighted_sum is None:
                agree = signs.agreement(deltas, deltas.sum(dim=0))
            else:
                # TIES paper order: signs voted by the unweighted trimmed deltas; a model
                # agrees when its own (unweighted) delta has the elected sign.
                flip = torch.where(weights < 0, torch.iinfo(signs.INT_OF[dtype.itemsize]).min, 0)
                own = (signs.as_int(deltas) ^ flip.to(signs.INT_OF[dtype.itemsize])).view(dtype)
                agree = signs.agreement(own, unweighted_sum)
                del own, unweighted_sum
            mixed = signs.masked(deltas, agree).sum(dim=0)
            divisor = (weights * signs.as_float_mask(agree, dtype)).sum(dim=0)
            divisor[divisor == 0] = 1
            del agree
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        del deltas
        if shared["normalize"]:
            mixed /= divisor
        if shared["lambda"] != 1:
            mixed *= shared["lambda"]
        return (base + mixed).to(dtype)


TIES = TaskVectorMerge("ties", sparsify=True, consensus=True, default_normalize=True,
                       description="TIES: trim to top-k magnitudes, elect signs, disjoint mean")
TASK_ARITHMETIC = TaskVectorMerge("task_arithmetic", sparsify=False, consensus=False, default_normalize=False,
                                  description="Task arithmetic: base + lambda * sum of weighted task vectors")
