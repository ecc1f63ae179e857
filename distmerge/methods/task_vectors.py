"""The task-vector methods: mergekit's generalized task arithmetic, one class configured
by a sparsification kind and a consensus kind.

Math (DESIGN.md §2), mirroring mergekit 0.1.5's operation order and dtypes:
  delta_i = theta_i - theta_base                       (compute dtype)
  sparsify delta_i (sparsify.py), in the kind's work dtype
  rescale: kept *= L1(delta_i) / L1(kept)               (exact sums, rounded once)
  W_i = w_i * delta_i                                  (w_i cast to the compute dtype)
  consensus "sum": elected sign = sign(sum_i W_i) (>= 0 -> +1); mask_i = sign(W_i) == elected
        mixed = sum_i W_i * mask_i;  divisor = sum_i w_i * mask_i (0 -> 1)
  no consensus: mixed = sum_i W_i; divisor = sum_i w_i (|.| < 1e-8 -> 1)
  normalize: mixed /= divisor;  mixed *= lambda;  out = theta_base + mixed

16-bit pieces run the statistics histogram and the apply through the fused kernels
(fused.py) where the options allow; the torch code below is the reference they match.

Statistics phases (run only for what a tensor needs):
  "select digits i/n"  radix-selection passes of the ranked kinds' thresholds (topk.py)
  "rescale L1"         exact L1 sums of each task vector before and after sparsification
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from distmerge.methods import exactsum, fused, signs, topk
from distmerge.methods.base import (
    MergeMethod,
    ParameterSpec,
    Phase,
    PieceInputs,
    PieceMeta,
    ResolvedParams,
    StatisticsPlan,
)
from distmerge.methods.sparsify import SPARSIFIERS, Sparsifier

SELECT = "select digits"
RESCALE = "rescale L1"
RESCALE_EPS = 1e-7


@dataclass(frozen=True)
class PieceCarry:
    """Per-piece state: each model's selection (ranked kinds; None keeps everything), and
    after the rescale phase each model's exact L1 sums (before, after) as floats."""

    selections: Tuple[Optional[topk.Selection], ...]
    l1: Optional[Tuple[Tuple[float, float], ...]] = None


class TaskVectorMerge(MergeMethod):
    def __init__(self, name: str, *, sparsification: Optional[str], consensus: Optional[str],
                 default_normalize: bool, default_rescale: bool, description: str) -> None:
        self.name = name
        self.sparsifier: Optional[Sparsifier] = SPARSIFIERS[sparsification] if sparsification else None
        self.consensus = consensus
        self.description = description
        self.uses_random = bool(self.sparsifier and self.sparsifier.uses_random)
        params = [
            ParameterSpec("weight", float, per_model=True, help="scale of this model's task vector"),
            ParameterSpec("normalize", bool, per_model=False, default=default_normalize,
                          help="divide by the sum of (agreeing) weights"),
            ParameterSpec("lambda", float, per_model=False, default=1.0, help="scale of the merged task vector"),
            ParameterSpec("int8_mask", bool, per_model=False, default=False,
                          help="store sign masks as int8 (memory only; same result)"),
            ParameterSpec("rescale", bool, per_model=False, default=default_rescale,
                          help="rescale kept entries to the task vector's L1 norm"),
        ]
        if self.sparsifier is not None:
            params += list(self.sparsifier.parameters)
        else:
            params.append(ParameterSpec("density", float, per_model=True, default=1.0,
                                        help="accepted for mergekit compatibility; nothing is dropped"))
        if consensus:
            params.append(ParameterSpec("sign_election", str, per_model=False, default="weighted",
                                        choices=("weighted", "unweighted"),
                                        help="elect signs from weighted (mergekit) or unweighted (TIES paper) deltas"))
        if self.sparsifier is not None and self.sparsifier.kind == "magnitude":
            params.append(ParameterSpec("density_scope", str, per_model=False, default="tensor",
                                        choices=("tensor", "model"),
                                        help="top-k per tensor (mergekit) or over the whole model (TIES paper)"))
        self.parameters = tuple(params)

    # -- planning -----------------------------------------------------------------

    def check_config(self, shared: Mapping[str, Any]) -> Optional[str]:
        if shared.get("density_scope") == "model" and shared.get("rescale"):
            return "rescale is not supported with density_scope: model"
        return None

    def check_tensor(self, params: ResolvedParams) -> Optional[Tuple[Optional[int], str]]:
        if self.sparsifier is None:
            return None
        for i, values in enumerate(params.per_model):
            problem = self.sparsifier.check(values)
            if problem:
                return i, problem
        return None

    def splittable(self, meta: PieceMeta) -> bool:
        return self.sparsifier is None or self.sparsifier.splittable(meta)

    def reduction_scope(self, shared: Mapping[str, Any]) -> str:
        return shared.get("density_scope", "tensor")

    def working_set_factor(self, n_models: int) -> float:
        # inputs (n+1), deltas, stacked weighted deltas, masked product, keys, result.
        extra = self.sparsifier.extra_working_set if self.sparsifier else 0.0
        return (4.0 * n_models + 4.0 if self.consensus else 2.0 * n_models + 3.0) + extra

    @staticmethod
    def _rank_bits(dtypes: Set[torch.dtype]) -> int:
        """Key width for ranking magnitudes. mergekit ranks |delta| cast to float32 on the CPU,
        which is exact for 16-bit floats and makes float64 ones that round alike ties. A
        model-wide group (density_scope: model) with several dtypes ranks in the widest."""
        if len(dtypes) == 1:
            return min(32, topk.key_bits(next(iter(dtypes))))
        return 64 if torch.float64 in dtypes else 32

    def _sparsifying(self, params: ResolvedParams) -> List[bool]:
        if self.sparsifier is None:
            return [False] * len(params.per_model)
        return [values["density"] < 1 for values in params.per_model]

    def plan_statistics(self, metas: Sequence[PieceMeta]) -> StatisticsPlan:
        first = metas[0]
        sparsifying = self._sparsifying(first.params)
        if not any(sparsifying):
            return StatisticsPlan((), [None] * len(metas))
        phases: List[Phase] = []
        selections: List[Optional[topk.Selection]] = [None] * len(sparsifying)
        if self.sparsifier is not None and self.sparsifier.ranked:
            bits = self._rank_bits({m.dtype for m in metas})
            total = sum(m.numel for m in metas)
            selections = [self.sparsifier.selection(bits, total, values) if sparse else None
                          for sparse, values in zip(sparsifying, first.params.per_model)]
            if any(s is not None and s.searching for s in selections):
                passes = topk.passes_for(bits)
                phases += [Phase(SELECT, p, passes) for p in range(passes)]
        if first.params.shared.get("rescale"):
            phases.append(Phase(RESCALE))
        return StatisticsPlan(tuple(phases), [PieceCarry(tuple(selections))] * len(metas))

    # -- statistics -----------------------------------------------------------------

    def _deltas(self, inputs: PieceInputs) -> List[torch.Tensor]:
        if "deltas" not in inputs.memo:
            inputs.memo["deltas"] = [m - inputs.base for m in inputs.models]
        return inputs.memo["deltas"]

    def _keys(self, inputs: PieceInputs, selection: topk.Selection, index: int) -> torch.Tensor:
        memo_key = f"keys{index}"
        if memo_key not in inputs.memo:
            inputs.memo[memo_key] = topk.keys_of(self._deltas(inputs)[index], selection.bits)
        return inputs.memo[memo_key]

    def collect(self, phase: Phase, inputs: PieceInputs, carry: PieceCarry) -> Any:
        if phase.step == RESCALE:
            sums = []
            for i, delta in enumerate(self._deltas(inputs)):
                work = delta.to(self._work_dtype(delta))
                kept = self._sparse_delta(inputs, carry, i, work)
                inputs.memo[f"kept{i}"] = kept  # apply reuses it when it runs in this process
                sums.append((exactsum.abs_sum_parts(work), exactsum.abs_sum_parts(kept)))
            return sums
        return [None if s is None or not s.searching else self._histograms(inputs, s, i, phase.index)
                for i, s in enumerate(carry.selections)]

    @staticmethod
    def _fused_keys(inputs: PieceInputs, selection: topk.Selection, index: int) -> bool:
        """Whether model `index`'s magnitude keys come from the fused kernels (16-bit keys
        of 16-bit inputs) rather than from the torch path's memoized deltas."""
        return selection.bits == 16 and fused.usable(inputs.base, inputs.models[index])

    def _histograms(self, inputs: PieceInputs, selection: topk.Selection, index: int, pass_index: int) -> Any:
        if "deltas" not in inputs.memo and self._fused_keys(inputs, selection, index):
            histogram = fused.delta_histogram(inputs.base, inputs.models[index])  # 16-bit keys: one pass
            return {name: histogram for name in selection.boundaries()}
        return topk.histograms(self._keys(inputs, selection, index), selection, pass_index)

    def reduce(self, phase: Phase, metas: Sequence[PieceMeta], partials: Sequence[Any],
               carries: Sequence[PieceCarry]) -> List[PieceCarry]:
        if phase.step == RESCALE:
            dtype = self._work_dtype_of(metas[0].dtype)
            totals = []
            for i in range(len(carries[0].selections)):
                before = exactsum.value(exactsum.add_parts([p[i][0] for p in partials]), dtype)
                after = exactsum.value(exactsum.add_parts([p[i][1] for p in partials]), dtype)
                totals.append((float(before), float(after)))
            return [PieceCarry(c.selections, tuple(totals)) for c in carries]
        new = topk.reduce_pass_each(phase.index, [c.selections for c in carries], partials)
        return [PieceCarry(row, c.l1) for row, c in zip(new, carries)]

    # -- apply ------------------------------------------------------------------------

    def split_carry(self, inputs: PieceInputs, carry: Optional[PieceCarry],
                    parts: Sequence[PieceInputs]) -> Optional[List[Optional[PieceCarry]]]:
        if carry is None:
            return [None] * len(parts)
        columns = []
        for i, selection in enumerate(carry.selections):
            if selection is None:
                columns.append([None] * len(parts))
                continue
            columns.append(topk.split_boundaries(
                selection, lambda j, key, i=i, s=selection: self._key_count(parts[j], s, i, key), len(parts)))
        return [PieceCarry(tuple(column[j] for column in columns), carry.l1) for j in range(len(parts))]

    def _key_count(self, inputs: PieceInputs, selection: topk.Selection, index: int, key: int) -> int:
        if self._fused_keys(inputs, selection, index):
            return fused.delta_key_count(inputs.base, inputs.models[index], key)
        return int((self._keys(inputs, selection, index) == key).sum())

    def _work_dtype_of(self, dtype: torch.dtype) -> torch.dtype:
        return self.sparsifier.work_dtype(dtype) if self.sparsifier else dtype

    def _work_dtype(self, delta: torch.Tensor) -> torch.dtype:
        return self._work_dtype_of(delta.dtype)

    def _keep_bits(self, inputs: PieceInputs, carry: Optional[PieceCarry], index: int,
                   work: torch.Tensor) -> Optional[torch.Tensor]:
        """The integer keep mask (all ones kept, sign bit dropped) of model `index`, None: keep all."""
        sparsifier = self.sparsifier
        if sparsifier is None:
            return None
        values = inputs.meta.params.per_model[index]
        if sparsifier.ranked:
            selection = carry.selections[index] if carry is not None else None
            if selection is None or selection.keeps == "all":
                return None
            keys = self._keys(inputs, selection, index) if selection.searching else topk.magnitude_keys(work)
            if keys.element_size() != work.element_size():  # model-wide keys wider than this tensor
                return signs.keep_bits_of(topk.kept_mask(keys, selection), signs.INT_OF[work.element_size()])
            return topk.keep_bits(keys, selection)
        kept = sparsifier.keep(inputs, index, work, values["density"], values)
        if kept is None:
            return None
        return signs.keep_bits_of(kept, signs.INT_OF[work.element_size()])

    def _sparse_delta(self, inputs: PieceInputs, carry: Optional[PieceCarry], index: int,
                      work: torch.Tensor) -> torch.Tensor:
        """Model `index`'s sparsified delta, unscaled, in the work dtype (mergekit: delta * 0/1 mask)."""
        keep = self._keep_bits(inputs, carry, index, work)
        if keep is None:
            return work
        return (signs.as_int(work) & keep).view(work.dtype)

    def _sparsified_into(self, inputs: PieceInputs, carry: Optional[PieceCarry], index: int,
                         out: torch.Tensor) -> None:
        kept = inputs.memo.pop(f"kept{index}", None)
        if kept is None:
            delta = self._deltas(inputs)[index]
            kept = self._sparse_delta(inputs, carry, index, delta.to(self._work_dtype(delta)))
        if carry is not None and carry.l1 is not None:
            before, after = (torch.tensor(v, dtype=kept.dtype) for v in carry.l1[index])
            if self._sparsifying(inputs.meta.params)[index] and before >= RESCALE_EPS and after >= RESCALE_EPS:
                kept = kept * (before / after)
        out.copy_(kept)

    def _fused_keep(self, inputs: PieceInputs, carry: Optional[PieceCarry], index: int) -> fused.KeepRule:
        """Model `index`'s keep rule for the fused kernel: a key threshold where the
        selection is a top-k (nearly always), else keep bits."""
        selection = carry.selections[index] if carry is not None and self.sparsifier is not None else None
        if selection is not None and selection.bits == 16:
            rule = topk.keep_threshold(selection)
            if rule is not None:
                return fused.KeepRule(*rule)
        if self.sparsifier is None or (self.sparsifier.ranked and selection is None):
            return fused.KeepRule()
        keep = self._keep_bits(inputs, carry, index, self._deltas(inputs)[index])
        return fused.KeepRule(bits=keep)

    def _apply_fused(self, inputs: PieceInputs, carry: Optional[PieceCarry]) -> Optional[torch.Tensor]:
        """`apply` by the fused kernel, or None where it does not cover the options (rescale,
        unweighted sign election, a dtype other than bfloat16 and float16, over MAX_MODELS
        models, a work dtype wider than the inputs')."""
        shared = inputs.meta.params.shared
        dtype = inputs.base.dtype
        if (len(inputs.models) > fused.MAX_MODELS or not fused.usable(inputs.base, *inputs.models)
                or (carry is not None and carry.l1 is not None) or shared.get("sign_election") == "unweighted"
                or (self.sparsifier is not None and self.sparsifier.work_dtype(dtype) != dtype)):
            return None
        keeps = [self._fused_keep(inputs, carry, i) for i in range(len(inputs.models))]
        inputs.memo.clear()
        weights = torch.tensor(inputs.meta.params.model_values("weight"), dtype=dtype)
        divisor = _weight_sum_divisor(weights)
        scale = None if shared["lambda"] == 1 else float(shared["lambda"])
        return fused.merge(inputs.base, inputs.models, keeps, weights, consensus=bool(self.consensus),
                           normalize=bool(shared["normalize"]), divisor=float(divisor), scale=scale)

    def apply(self, inputs: PieceInputs, carry: Optional[PieceCarry]) -> torch.Tensor:
        merged = self._apply_fused(inputs, carry)
        if merged is not None:
            return merged
        params = inputs.meta.params
        shared = params.shared
        base = inputs.base
        n = len(inputs.models)
        dtype = base.dtype
        deltas = base.new_empty((n, *base.shape))
        for i in range(n):
            self._sparsified_into(inputs, carry, i, deltas[i])
        inputs.memo.clear()

        weights = torch.tensor(params.model_values("weight"), dtype=dtype)
        weights = weights.reshape((n,) + (1,) * base.dim())
        unweighted_sum = None
        if self.consensus and shared.get("sign_election") == "unweighted":
            unweighted_sum = signs.sum_models(deltas)
        deltas.mul_(weights)

        if self.consensus:
            if unweighted_sum is None:
                agree = signs.agreement(deltas, signs.sum_models(deltas))
            else:
                # TIES paper order: signs voted by the unweighted trimmed deltas; a model
                # agrees when its own (unweighted) delta has the elected sign.
                flip = torch.where(weights < 0, torch.iinfo(signs.INT_OF[dtype.itemsize]).min, 0)
                own = (signs.as_int(deltas) ^ flip.to(signs.INT_OF[dtype.itemsize])).view(dtype)
                agree = signs.agreement(own, unweighted_sum)
                del own, unweighted_sum
            mixed = signs.sum_models(signs.masked(deltas, agree))
            divisor = signs.sum_models(weights * signs.as_float_mask(agree, dtype))
            signs.zeros_to_one(divisor)
            del agree
        else:
            mixed = signs.sum_models(deltas)
            divisor = _weight_sum_divisor(weights)
        del deltas
        if shared["normalize"]:
            mixed /= divisor
        if shared["lambda"] != 1:
            mixed *= shared["lambda"]
        return (base + mixed).to(dtype)


def _weight_sum_divisor(weights: torch.Tensor) -> torch.Tensor:
    """The divisor without sign election: the sum of the weights (mergekit: 1 when |sum| < 1e-8)."""
    divisor = weights.sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    return divisor


def _gta(name: str, sparsification: Optional[str], consensus: Optional[str], normalize: bool, rescale: bool,
         description: str) -> TaskVectorMerge:
    return TaskVectorMerge(name, sparsification=sparsification, consensus=consensus,
                           default_normalize=normalize, default_rescale=rescale, description=description)


TASK_ARITHMETIC = _gta("task_arithmetic", None, None, False, False,
                       "Task arithmetic: base + lambda * sum of weighted task vectors")
TIES = _gta("ties", "magnitude", "sum", True, False,
            "TIES: trim to top-k magnitudes, elect signs, disjoint mean")
DARE_TIES = _gta("dare_ties", "random", "sum", False, True,
                 "DARE TIES: random drop with rescale, elect signs, disjoint sum")
DARE_LINEAR = _gta("dare_linear", "random", None, False, True,
                   "DARE linear: random drop with rescale, weighted sum")
BREADCRUMBS = _gta("breadcrumbs", "magnitude_outliers", None, False, False,
                   "Model Breadcrumbs: drop the smallest and the largest magnitudes, weighted sum")
BREADCRUMBS_TIES = _gta("breadcrumbs_ties", "magnitude_outliers", "sum", False, False,
                        "Model Breadcrumbs with TIES sign election")
DELLA = _gta("della", "della_magprune", "sum", True, True,
             "DELLA: magnitude-ranked random drop per row, rescale, elect signs, disjoint mean")
DELLA_LINEAR = _gta("della_linear", "della_magprune", None, False, True,
                    "DELLA linear: magnitude-ranked random drop per row, rescale, weighted sum")
TASK_VECTOR_METHODS = (TASK_ARITHMETIC, TIES, DARE_TIES, DARE_LINEAR, BREADCRUMBS, BREADCRUMBS_TIES, DELLA,
                       DELLA_LINEAR)
