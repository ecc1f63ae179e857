"""Plan a merge from headers only: validate inputs, split work into units, fix the layout.

The plan is a pure function of the config, the input headers and the options; the
output bytes depend on nothing else (not on worker count or scheduling).
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import psutil
import torch

from distmerge.config import LAYER_INDEX, MergeConfig, OutputSlice, resolve_parameters, resolve_slice_parameters
from distmerge.errors import ConfigError, InputError
from distmerge.io.checkpoint import Checkpoint, ModelFiles, open_checkpoint
from distmerge.io.header import TensorInfo
from distmerge.io.dtypes import SAFETENSORS_TO_TORCH, TORCH_DTYPE_NAMES, TORCH_TO_SAFETENSORS
from distmerge.io.storage import is_remote
from distmerge.io.layout import OutputLayout, OutputTensor, natural_key, plan_layout
from distmerge.methods.base import PieceMeta, ResolvedParams, StatisticsPlan
from distmerge.sizes import format_bytes

DEFAULT_SHARD_SIZE = 5 * 10**9
# Pack small tensors into one unit up to this much working memory (fewer, larger tasks).
PACK_TARGET = 256 * 2**20
# A worker fetches a unit's small pieces' remote bytes together, up to this many bytes a
# batch, so that adjacent tensors of one object come in one GET (engine.worker.InputReader).
FETCH_BATCH_BYTES = 32 * 2**20
# Row splits fall on multiples of this many elements, so vectorized kernels see the
# same element alignment whatever the split.
SPLIT_ALIGN_ELEMENTS = 64


def default_memory_per_worker(num_workers: int) -> int:
    """A quarter of this machine's memory shared among the workers, between 256 MiB and 1 GiB.

    Bigger units buy little: tensors are processed in cache-sized row ranges anyway, and
    a tensor over the budget is still read once (a streamed unit), at the cost of running
    in one task.
    """
    total = psutil.virtual_memory().total
    return int(min(2**30, max(256 * 2**20, total * 0.25 / max(1, num_workers))))


@dataclass(frozen=True)
class SourceRange:
    """Bytes of one input for one piece: a contiguous range of a safetensors file."""

    path: str  # local path or fsspec URL
    dtype: str
    start: int
    end: int
    version: str = ""  # the file's ETag / mtime when planned
    checkpoint: int = 0  # which input (index into MergePlan.checkpoints)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Piece:
    meta: PieceMeta
    sources: Tuple[SourceRange, ...]  # base first (if the merge has one), then models
    group: str  # reduction group id
    out_dtype: torch.dtype
    shard: int
    out_offset: int  # absolute file offset of this piece's first output byte
    out_nbytes: int
    memory: int  # estimated peak working bytes
    with_base: bool = True  # sources[0] is the base model, apart from the models merged

    @property
    def remote_bytes(self) -> int:
        """Input bytes fetched from remote storage (not memory-mapped)."""
        return sum(s.nbytes for s in self.sources if is_remote(s.path))


@dataclass(frozen=True)
class WorkUnit:
    """Pieces one task merges, in order. A *streamed* unit holds every piece of one tensor
    whose statistics need the whole tensor: its task runs each phase over the pieces one
    at a time, reading each input byte from storage once (remote ones are kept in a local
    scratch copy between passes), and sends each piece's output as soon as it is merged."""

    index: int
    pieces: Tuple[Piece, ...]
    streamed: bool = False

    @property
    def read_bytes(self) -> int:
        return sum(s.nbytes for p in self.pieces for s in p.sources)

    @property
    def remote_read_bytes(self) -> int:
        return sum(p.remote_bytes for p in self.pieces)

    @property
    def out_bytes(self) -> int:
        return sum(p.out_nbytes for p in self.pieces)

    @property
    def memory(self) -> int:
        """Peak working memory: the largest piece's, plus, with remote inputs, the batches
        of small pieces fetched together (the one computing and the next)."""
        batches = min(2 * FETCH_BATCH_BYTES, self.remote_read_bytes) if len(self.pieces) > 1 else 0
        return max(p.memory for p in self.pieces) + batches

    @property
    def chunks(self) -> Tuple[Tuple[Piece, ...], ...]:
        """The pieces whose output bytes the task sends together, in order: one chunk per
        piece for a streamed unit, else the whole unit."""
        return tuple((p,) for p in self.pieces) if self.streamed else (self.pieces,)

    @property
    def window_bytes(self) -> int:
        """Output bytes the unit holds at once before they are written (what the driver
        counts against its in-flight budget)."""
        return max(sum(p.out_nbytes for p in chunk) for chunk in self.chunks) * (2 if self.streamed else 1)

    @property
    def scratch_bytes(self) -> int:
        """Local scratch space its task may need: a streamed unit's remote input bytes."""
        return self.remote_read_bytes if self.streamed else 0

    def describe(self) -> str:
        p = self.pieces[0]
        if self.streamed:
            return f"{p.meta.tensor} (streamed, {len(self.pieces)} row ranges)"
        if len(self.pieces) == 1:
            rows = p.meta.shape[0] if p.meta.shape else 1
            if p.meta.row_end - p.meta.row_start == rows:
                return p.meta.tensor
            return f"{p.meta.tensor}[rows {p.meta.row_start}:{p.meta.row_end}]"
        return f"{p.meta.tensor} +{len(self.pieces) - 1} more"


@dataclass(frozen=True)
class ReductionGroup:
    """Pieces whose statistics are reduced together (tie order: tensor name, then row)."""

    id: str
    pieces: Tuple[Tuple[int, int], ...]  # (unit index, piece index within the unit)
    statistics: StatisticsPlan

    @property
    def distributed(self) -> bool:
        """Needs statistics passes across units (else one task runs the group's whole protocol)."""
        return self.statistics.passes > 0 and len({u for u, _ in self.pieces}) > 1


@dataclass(frozen=True)
class MergePlan:
    config: MergeConfig
    checkpoints: Tuple[Checkpoint, ...]  # base first (if used), then models
    units: Tuple[WorkUnit, ...]
    groups: Dict[str, ReductionGroup]
    layout: OutputLayout
    memory_per_worker: int
    notes: Tuple[str, ...] = field(default=())
    seed: int = 0  # the random seed every piece carries (random methods key on it)
    seed_drawn: bool = False  # drawn for this plan, not given (a later merge draws its own)
    # a `slices:` layout: each output layer's (input index, layer index in that input)
    layer_sources: Tuple[Tuple[int, int], ...] = ()

    @property
    def tensor_count(self) -> int:
        return sum(len(s.tensors) for s in self.layout.shards)

    def read_bytes_by_input(self) -> List[int]:
        """Bytes each input is read for, statistics passes included."""
        totals = [0] * len(self.checkpoints)
        for unit in self.units:
            for piece in unit.pieces:
                group = self.groups[piece.group]
                reads = 1 + (group.statistics.passes if group.distributed else 0)
                for src in piece.sources:
                    totals[src.checkpoint] += src.nbytes * reads
        return totals

    @property
    def statistics_passes(self) -> int:
        return max((g.statistics.passes for g in self.groups.values() if g.distributed), default=0)

    def phase_lists(self) -> Dict[Tuple[str, ...], int]:
        """Each distinct sequence of statistics phase names, with how many tensors (groups) run it."""
        counts: Dict[Tuple[str, ...], int] = {}
        for group in self.groups.values():
            names = tuple(p.name for p in group.statistics.phases)
            counts[names] = counts.get(names, 0) + 1
        return counts


def _compute_dtype(config: MergeConfig, dtypes: Sequence[torch.dtype]) -> torch.dtype:
    if config.dtype is not None:
        return config.dtype
    result = dtypes[0]
    for d in dtypes[1:]:
        result = torch.promote_types(result, d)
    return result


def _rows_per_piece(shape: Tuple[int, ...], bytes_per_element: float, budget: int) -> int:
    rows = shape[0] if shape else 1
    row_numel = math.prod(shape[1:]) if len(shape) > 1 else 1
    if rows <= 1:
        return rows
    granule = SPLIT_ALIGN_ELEMENTS // math.gcd(SPLIT_ALIGN_ELEMENTS, row_numel)
    fit = int(budget // max(1.0, row_numel * bytes_per_element))
    fit = max(granule, fit - fit % granule)
    return min(rows, fit)


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor: its inputs' headers (base first, when it has one), which input
    each comes from, dtypes and resolved parameters."""

    name: str
    infos: Tuple[TensorInfo, ...]
    dtype: torch.dtype  # compute dtype
    out_dtype: torch.dtype
    params: ResolvedParams
    shape: Tuple[int, ...]
    checkpoints: Tuple[int, ...]  # index of each info's input in MergePlan.checkpoints
    with_base: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def plan_merge(config: MergeConfig, *, shard_size: int = DEFAULT_SHARD_SIZE,
               memory_per_worker: Optional[int] = None, num_workers: int = 1, seed: int = 0) -> MergePlan:
    """Read every input's headers and build the complete plan, or raise a clear error.

    Stages: open the inputs' headers; check and describe every tensor; fix the output
    layout; cut tensors into pieces within the budget; pack pieces into units; group the
    pieces whose statistics are reduced together. `seed` feeds the counter-based
    generator of random methods (ignored by the others).
    """
    budget = memory_per_worker or default_memory_per_worker(num_workers)
    refs = [m.ref for m in config.inputs] + ([config.base_model.ref] if config.base_model else [])
    if config.tokenizer_source is not None and config.tokenizer_source not in refs:
        raise ConfigError(f"{config.source}: tokenizer_source: {config.tokenizer_source!r} is not one of the "
                          f"merge's models ({', '.join(refs)}); name one of them, or 'base'")
    with ThreadPoolExecutor(max(1, len(config.inputs)), thread_name_prefix="checkpoints") as pool:
        checkpoints = tuple(pool.map(lambda m: open_checkpoint(m.ref, m.path, config.storage), config.inputs))
    layer_sources: Tuple[Tuple[int, int], ...] = ()
    if config.slices:
        notes: List[str] = []
        specs, layer_sources = _sliced_specs(config, checkpoints)
    else:
        notes = _extra_tensor_notes(checkpoints)
        specs = _tensor_specs(config, checkpoints)
    if config.tokenizer_source is not None:
        _check_tokenizer_vocabulary(config, checkpoints, specs)
    layout = plan_layout([OutputTensor(s.name, TORCH_TO_SAFETENSORS[s.out_dtype], s.shape,
                                       s.numel * s.out_dtype.itemsize) for s in specs], shard_size)
    pieces = _cut_pieces(config, specs, checkpoints, layout, budget, seed)
    units = _pack_units(pieces, budget, _streamed_groups(config, pieces))
    groups = _reduction_groups(config, units)
    return MergePlan(config, checkpoints, tuple(units), groups, layout, budget, tuple(notes), seed,
                     layer_sources=layer_sources)


def _extra_tensor_notes(checkpoints: Sequence[Checkpoint]) -> List[str]:
    reference = checkpoints[0]
    notes = []
    for ckpt in checkpoints[1:]:
        extra = sorted(set(ckpt.tensors) - set(reference.tensors))
        if extra:
            notes.append(f"model {ckpt.ref!r} has {len(extra)} tensor(s) not in {reference.ref!r}, ignored "
                         f"(first: {extra[0]!r})")
    return notes


def _tensor_specs(config: MergeConfig, checkpoints: Sequence[Checkpoint]) -> List[TensorSpec]:
    """Every output tensor, in natural order, checked across the inputs, with its parameters resolved."""
    reference = checkpoints[0]
    method = config.method
    layer_ids = {int(m.group(1)) for name in reference.tensors if (m := LAYER_INDEX.search(name))}
    num_layers = max(layer_ids) + 1 if layer_ids else 0
    names = sorted(reference.tensors, key=natural_key)
    if not names:
        raise InputError(f"model {reference.ref!r} ({reference.path}) holds no tensors")
    specs = []
    model_refs = [m.ref for m in config.models]
    for name in names:
        infos = tuple(_tensor_info(ckpt, reference, name) for ckpt in checkpoints)
        params = resolve_parameters(config, name, num_layers)
        specs.append(_spec(config, name, infos, params, model_refs, tuple(range(len(checkpoints))),
                           config.base is not None))
    scopes = {method.reduction_scope(spec.params.shared) for spec in specs}
    if len(scopes) > 1:
        raise ConfigError(f"{config.source}: parameters: the reduction scope (density_scope) must be the same "
                          "for every tensor; set it once, without a gradient or filters")
    return specs


def _spec(config: MergeConfig, name: str, infos: Tuple[TensorInfo, ...], params: ResolvedParams,
          model_refs: List[str], inputs: Tuple[int, ...], with_base: bool) -> TensorSpec:
    """A TensorSpec, once the method accepts the values resolved for the tensor."""
    method = config.method
    shared_problem = method.check_config(params.shared)
    if shared_problem:
        raise ConfigError(f"{config.source}: parameters: {shared_problem} (for tensor {name!r})")
    tensor_problem = method.check_tensor(params)
    if tensor_problem:
        index, problem = tensor_problem
        whose = "" if index is None else f" of model {model_refs[index]!r}"
        raise ConfigError(f"{config.source}: parameters{whose} ({method.name}) for tensor {name!r}: {problem}")
    dtype = _compute_dtype(config, [SAFETENSORS_TO_TORCH[i.dtype] for i in infos])
    return TensorSpec(name, infos, dtype, config.out_dtype or dtype, params, infos[0].shape, inputs, with_base)


PRE_LAYER_NAMES = ("embed", "wte", "wpe", "word_embeddings")


def _layer_templates(ckpt: Checkpoint) -> Dict[int, Dict[str, str]]:
    """layer index -> {name template with '{}' for the index: tensor name}."""
    out: Dict[int, Dict[str, str]] = {}
    for name in ckpt.tensors:
        match = LAYER_INDEX.search(name)
        if match:
            template = name[:match.start(1)] + "{}" + name[match.end(1):]
            out.setdefault(int(match.group(1)), {})[template] = name
    return out


def _sliced_specs(config: MergeConfig, checkpoints: Sequence[Checkpoint]
                  ) -> Tuple[List[TensorSpec], Tuple[Tuple[int, int], ...]]:
    """The output tensors of a `slices:` layout, as mergekit 0.1.5 builds them: tensors
    before the layers (embeddings) from the first slice's sources, each slice's layers
    renumbered after the previous slices', tensors after the layers (final norm, lm_head)
    from the last slice's sources; gradients run over each slice's layers."""
    index = {ckpt.ref: i for i, ckpt in enumerate(checkpoints)}
    templates = {i: _layer_templates(ckpt) for i, ckpt in enumerate(checkpoints)}
    specs: List[TensorSpec] = []
    layer_sources: List[Tuple[int, int]] = []

    def add(output_slice: OutputSlice, out_name: str, names: List[Tuple[int, str]], t: float) -> None:
        infos = []
        for ckpt_index, name in names:
            ckpt = checkpoints[ckpt_index]
            info = ckpt.tensors.get(name)
            if info is None:
                raise InputError(f"model {ckpt.ref!r} ({ckpt.path}) has no tensor {name!r}, which slice "
                                 f"output tensor {out_name!r} needs")
            infos.append(info)
        for (ckpt_index, _), info in zip(names[1:], infos[1:]):
            if info.shape != infos[0].shape:
                raise InputError(_shape_mismatch(out_name, (checkpoints[ckpt_index].ref, info.shape),
                                                 (checkpoints[names[0][0]].ref, infos[0].shape)))
        model_names = [name for _, name in names[1 if output_slice.base is not None else 0:]]
        params = resolve_slice_parameters(config, output_slice, out_name, t, model_names)
        specs.append(_spec(config, out_name, tuple(infos), params, [s.model.ref for s in output_slice.models],
                           tuple(i for i, _ in names), output_slice.base is not None))

    def outside_layers(output_slice: OutputSlice, before: bool) -> None:
        first = index[output_slice.sources[0].model.ref]
        for name in sorted(checkpoints[first].tensors, key=natural_key):
            if LAYER_INDEX.search(name) is None and any(k in name for k in PRE_LAYER_NAMES) == before:
                add(output_slice, name, [(index[src.model.ref], name) for src in output_slice.sources], 0.0)

    outside_layers(config.slices[0], before=True)
    out_layer = 0
    for output_slice in config.slices:
        n = output_slice.layers
        for offset in range(n):
            t = offset / (n - 1) if n > 1 else 1.0
            first = output_slice.sources[0]
            first_index = index[first.model.ref]
            layer = first.layer_range[0] + offset
            found = templates[first_index].get(layer)
            if not found:
                raise InputError(f"model {first.model.ref!r} has no layer {layer} (its layer_range "
                                 f"{list(first.layer_range)} reaches past its last layer)")
            for template in sorted(found, key=natural_key):
                names = [(index[src.model.ref], template.format(src.layer_range[0] + offset))
                         for src in output_slice.sources]
                add(output_slice, template.format(out_layer), names, t)
            layer_sources.append((first_index, layer))
            out_layer += 1
    outside_layers(config.slices[-1], before=False)
    specs.sort(key=lambda spec: natural_key(spec.name))
    return specs, tuple(layer_sources)


def _tensor_info(ckpt: Checkpoint, reference: Checkpoint, name: str) -> TensorInfo:
    info = ckpt.tensors.get(name)
    if info is None:
        raise InputError(f"model {ckpt.ref!r} ({ckpt.path}) has no tensor {name!r}, "
                         f"which {reference.ref!r} has; every input needs the same tensors")
    if info.dtype not in SAFETENSORS_TO_TORCH:
        raise InputError(f"{info.path}: tensor {name!r} has dtype {info.dtype}; only floating-point "
                         "tensors (F16, BF16, F32, F64) can be merged")
    if info.shape != reference.tensors[name].shape:
        raise InputError(_shape_mismatch(name, (ckpt.ref, info.shape), (reference.ref, reference.tensors[name].shape)))
    return info


VOCABULARY_TENSORS = ("embed", "lm_head", "wte", "word_embeddings", "output.weight")


def tokenizer_size(tokenizer_json: bytes) -> Optional[int]:
    """How many tokens a tokenizer.json defines (its model's vocabulary and added tokens), or None."""
    try:
        data = json.loads(tokenizer_json)
        vocab = data["model"]["vocab"]
        ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
        ids.update(t["id"] for t in data.get("added_tokens") or [])
        return len(ids)
    except (ValueError, KeyError, TypeError):
        return None


def _check_tokenizer_vocabulary(config: MergeConfig, checkpoints: Sequence[Checkpoint],
                                specs: Sequence[TensorSpec]) -> None:
    """With a tokenizer source, mergekit 0.1.5 re-maps embedding rows to that tokenizer's tokens
    (so padded embeddings shrink); distmerge copies the tokenizer and keeps the rows, which is
    the same only when the tokenizer has exactly as many tokens as the embeddings have rows."""
    ref = config.tokenizer_source
    path = next((c.path for c in checkpoints if c.ref == ref), None)
    if path is None and config.base_model is not None and config.base_model.ref == ref:
        path = config.base_model.path
    files = ModelFiles(path, config.storage)
    url = files.url("tokenizer.json")
    size = tokenizer_size(files.read(url)) if files.exists(url) else None
    where = f"{config.source}: tokenizer_source"
    if size is None:
        raise ConfigError(f"{where}: {ref!r} has no readable tokenizer.json; distmerge checks the tokenizer's "
                          "size against the embedding rows (mergekit re-maps the rows to it). Leave "
                          "tokenizer_source out to copy the base model's tokenizer as it is")
    for spec in specs:
        if any(k in spec.name for k in VOCABULARY_TENSORS) and spec.shape and spec.shape[0] != size:
            raise ConfigError(
                f"{where}: the tokenizer of {ref!r} has {size} tokens but tensor {spec.name!r} has "
                f"{spec.shape[0]} rows. mergekit 0.1.5 re-maps embedding rows to the tokenizer "
                f"({spec.shape[0]} -> {size}); distmerge does not yet. Leave tokenizer_source out to keep every "
                "row (the base model's tokenizer is copied), or bring the models to that vocabulary first")


def _shape_mismatch(name: str, a: Tuple[str, Tuple[int, ...]], b: Tuple[str, Tuple[int, ...]]) -> str:
    """Two inputs' shapes of one tensor differ; vocabulary rows get mergekit's advice."""
    (ref_a, shape_a), (ref_b, shape_b) = a, b
    message = f"tensor {name!r} has shape {list(shape_a)} in {ref_a!r} but {list(shape_b)} in {ref_b!r}"
    if (any(k in name for k in VOCABULARY_TENSORS) and len(shape_a) == len(shape_b)
            and shape_a[1:] == shape_b[1:]):
        message += (": the models' vocabularies differ. mergekit merges such models only with a "
                    "tokenizer_source, re-mapping embedding rows to one tokenizer; distmerge does not re-map "
                    "vocabularies yet: bring the models to one vocabulary (same tokens, same embedding rows) first")
    return message


def _rows_per_step(config: MergeConfig, spec: TensorSpec, per_element: float, budget: int, seed: int) -> int:
    """Rows per piece under the method's split policy; a tensor it needs whole must fit the budget."""
    method = config.method
    rows = spec.shape[0] if spec.shape else 1
    if method.splittable(PieceMeta(spec.name, spec.shape, 0, rows, spec.dtype, spec.params, seed, spec.with_base)):
        return _rows_per_piece(spec.shape, per_element, budget)
    if spec.numel * per_element > budget:
        raise ConfigError(
            f"tensor {spec.name!r} ({spec.numel} elements) must be merged whole by {method.name}, which needs "
            f"about {format_bytes(int(spec.numel * per_element))} of working memory for it; raise "
            f"--memory-per-worker to at least that (now {format_bytes(budget)})")
    return rows


def _cut_pieces(config: MergeConfig, specs: Sequence[TensorSpec], checkpoints: Sequence[Checkpoint],
                layout: OutputLayout, budget: int, seed: int) -> List[Piece]:
    """Row ranges of every tensor (in natural order) with their input byte ranges and output offsets."""
    method = config.method
    per_model_scope = method.reduction_scope(specs[0].params.shared) == "model"
    pieces: List[Piece] = []
    for spec in specs:
        shape = spec.shape
        n_models = len(spec.infos) - (1 if spec.with_base else 0)
        # Remote inputs count twice: a task holds the next piece's (or batch's) fetched bytes while it computes.
        input_copies = 2 if any(is_remote(i.path) for i in spec.infos) else 1
        per_element = (method.working_set_factor(n_models) * spec.dtype.itemsize
                       + input_copies * sum(i.nbytes for i in spec.infos) / max(1, spec.numel)
                       + spec.out_dtype.itemsize)
        rows_total = shape[0] if shape else 1
        step = max(1, _rows_per_step(config, spec, per_element, budget, seed))
        row_numel = math.prod(shape[1:]) if len(shape) > 1 else 1
        shard, offset = layout.locate(spec.name)
        for r0 in range(0, max(rows_total, 1), step):
            r1 = min(rows_total, r0 + step) if shape else 1
            elems = (r1 - r0) * row_numel if shape else 1
            sources = tuple(
                SourceRange(i.path, i.dtype,
                            i.start + r0 * row_numel * SAFETENSORS_TO_TORCH[i.dtype].itemsize,
                            i.start + (r0 * row_numel + elems) * SAFETENSORS_TO_TORCH[i.dtype].itemsize,
                            checkpoints[c].versions.get(i.path, (0, ""))[1], c)
                for i, c in zip(spec.infos, spec.checkpoints))
            pieces.append(Piece(
                meta=PieceMeta(spec.name, shape, r0, r1, spec.dtype, spec.params, seed, spec.with_base),
                sources=sources,
                group="<model>" if per_model_scope else spec.name, out_dtype=spec.out_dtype, shard=shard,
                out_offset=offset + r0 * row_numel * spec.out_dtype.itemsize,
                out_nbytes=elems * spec.out_dtype.itemsize, memory=int(elems * per_element),
                with_base=spec.with_base))
            if spec.numel == 0:
                break
    return pieces


def _streamed_groups(config: MergeConfig, pieces: Sequence[Piece]) -> Set[str]:
    """Per-tensor reduction groups cut into several pieces whose method needs statistics:
    each becomes one streamed unit, so its inputs are read once, not once per phase and
    again to apply. A model-wide group (`density_scope: model`) spans every tensor and
    stays spread over the units."""
    members: Dict[str, List[Piece]] = {}
    for piece in pieces:
        members.setdefault(piece.group, []).append(piece)
    streamed = set()
    for gid, group in members.items():
        if len(group) > 1 and len({p.meta.tensor for p in group}) == 1:
            if config.method.plan_statistics([p.meta for p in group]).passes > 0:
                streamed.add(gid)
    return streamed


def _pack_units(pieces: Sequence[Piece], budget: int, streamed: Set[str] = frozenset()) -> List[WorkUnit]:
    """Consecutive pieces packed into units of up to min(budget, PACK_TARGET) working
    memory; the pieces of each `streamed` group (consecutive: one tensor's rows) make one
    streamed unit."""
    units: List[WorkUnit] = []
    batch: List[Piece] = []
    batch_memory = 0

    def flush(streamed_unit: bool = False) -> None:
        nonlocal batch, batch_memory
        if batch:
            units.append(WorkUnit(len(units), tuple(batch), streamed=streamed_unit))
        batch, batch_memory = [], 0

    for piece in pieces:
        if batch:
            last = batch[-1]
            if piece.group in streamed or last.group in streamed:
                full = piece.group != last.group
            else:
                full = batch_memory + piece.memory > min(budget, PACK_TARGET)
            if full:
                flush(last.group in streamed)
        batch.append(piece)
        batch_memory += piece.memory
    flush(bool(batch) and batch[-1].group in streamed)
    return units


def _reduction_groups(config: MergeConfig, units: Sequence[WorkUnit]) -> Dict[str, ReductionGroup]:
    """Each group's pieces in tie order (tensor name, then row) and its statistics plan."""
    members: Dict[str, List[Tuple[int, int]]] = {}  # insertion order: natural tensor order
    for unit in units:
        for j, piece in enumerate(unit.pieces):
            members.setdefault(piece.group, []).append((unit.index, j))
    groups = {}
    for gid, refs in members.items():
        refs.sort(key=lambda r: (units[r[0]].pieces[r[1]].meta.tensor, units[r[0]].pieces[r[1]].meta.row_start))
        metas = [units[u].pieces[j].meta for u, j in refs]
        groups[gid] = ReductionGroup(gid, tuple(refs), config.method.plan_statistics(metas))
    return groups


def format_plan(plan: MergePlan, units: bool = False) -> str:
    """A human summary of the plan, as `distmerge plan` prints it (with `units`: one line each)."""
    cfg = plan.config
    lines = [f"merge_method: {cfg.method.name}    tensors: {plan.tensor_count}    work units: {len(plan.units)}"]
    split = sorted({p.meta.tensor for u in plan.units for p in u.pieces
                    if p.meta.row_end - p.meta.row_start < (p.meta.shape[0] if p.meta.shape else 1)})
    packed = sum(1 for u in plan.units if len(u.pieces) > 1)
    lines.append(f"memory per worker: {format_bytes(plan.memory_per_worker)}    "
                 f"tensors split into row ranges: {len(split)}    units packing several tensors: {packed}")
    lines.append("phases (tensors: statistics phases, then apply):")
    for names, count in sorted(plan.phase_lists().items(), key=lambda item: (len(item[0]), item[0])):
        lines.append(f"  {count:>5}: {' -> '.join(names + ('apply',))}")
    streamed = [u for u in plan.units if u.streamed]
    if streamed:
        scratch = max(u.scratch_bytes for u in streamed)
        lines.append(f"streamed units: {len(streamed)} (a tensor over the memory budget whose statistics need "
                     "all of it: one task reads its row ranges once for every phase and apply"
                     + (f"; remote inputs kept in local scratch, at most {format_bytes(scratch)} per task"
                        if scratch else "") + ")")
    if plan.statistics_passes:
        dist = sum(1 for g in plan.groups.values() if g.distributed)
        lines.append(f"reduction groups across units: {dist} (a model-wide statistic: every piece is read once "
                     f"per phase, then again to apply; at most {plan.statistics_passes} phase(s))")
    if cfg.method.uses_random:
        lines.append(f"random seed: {plan.seed}" + (
            " (drawn for this plan; a merge without --random-seed or random_seed draws its own)"
            if plan.seed_drawn else ""))
    repeats = any(p.repeats for g in plan.groups.values() for p in g.statistics.phases)
    lines.append("inputs (bytes read" + (", at most: phases repeat as the data needs" if repeats else "") + "):")
    for ckpt, nbytes in zip(plan.checkpoints, plan.read_bytes_by_input()):
        role = "base " if cfg.base is not None and ckpt is plan.checkpoints[0] else "model"
        lines.append(f"  {role} {ckpt.ref}: {format_bytes(nbytes)} of {format_bytes(ckpt.nbytes)} "
                     f"in {len(ckpt.files)} file(s)")
    lines.append(f"output: {len(plan.layout.shards)} shard(s), {format_bytes(plan.layout.total_size)}")
    for shard in plan.layout.shards:
        lines.append(f"  {shard.file_name}: {len(shard.tensors)} tensors, {format_bytes(shard.size)}")
    biggest = max(plan.units, key=lambda u: u.memory)
    lines.append(f"largest unit: #{biggest.index} {biggest.describe()}, "
                 f"about {format_bytes(biggest.memory)} working memory")
    if split:
        lines.append(f"split tensors: {', '.join(split[:8])}{' ...' if len(split) > 8 else ''}")
    dtypes = sorted({TORCH_DTYPE_NAMES[p.meta.dtype] for u in plan.units for p in u.pieces})
    lines.append(f"compute dtype: {', '.join(dtypes)}")
    lines.extend(f"note: {n}" for n in plan.notes)
    if units:
        lines.append("units (index, tensors, bytes read, output bytes, peak working memory estimate):")
        for unit in plan.units:
            lines.append(f"  #{unit.index:<5} {unit.describe():<60} read {format_bytes(unit.read_bytes):>11}  "
                         f"out {format_bytes(unit.out_bytes):>11}  peak ~{format_bytes(unit.memory)}")
    return "\n".join(lines)
