"""The merge methods alone (no Ray, no files): splitting a tensor into row ranges never
changes a bit, top-k keeps exactly k, ties go to the lowest flat index."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from distmerge.methods import METHODS, topk
from distmerge.methods.base import PieceInputs, PieceMeta, ResolvedParams, reduce_statistics, run_in_memory

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _params(method, weights, densities, **shared):
    """Every parameter of `method` at its default, overridden by the given values."""
    spec = METHODS[method]
    values = {p.name: p.default for p in spec.parameters if not p.per_model}
    values.update(shared)
    per_model = []
    for w, d in zip(weights, densities):
        entry = {p.name: p.default for p in spec.parameters if p.per_model and not p.required}
        if spec.parameter("weight"):
            entry["weight"] = w
        if spec.parameter("density"):
            entry["density"] = d
        per_model.append(entry)
    return ResolvedParams(values, tuple(per_model))


def _pieces(name, base, models, params, cuts, uses_base=True, seed=0, method=None):
    rows = base.shape[0]
    if method is not None and not method.splittable(PieceMeta(name, tuple(base.shape), 0, rows, base.dtype, params)):
        cuts = ()  # the method's split policy keeps this tensor whole, as the planner does
    bounds = [0] + sorted(set(c for c in cuts if 0 < c < rows)) + [rows]
    pieces = []
    for r0, r1 in zip(bounds, bounds[1:]):
        meta = PieceMeta(name, tuple(base.shape), r0, r1, base.dtype, params, seed, uses_base)
        if uses_base:
            pieces.append(PieceInputs(meta, base[r0:r1], tuple(m[r0:r1] for m in models)))
        else:
            pieces.append(PieceInputs(meta, None, (base[r0:r1],) + tuple(m[r0:r1] for m in models)))
    return pieces


def _merge(method, name, base, models, params, cuts=(), seed=0, with_base=None):
    """Run `method` in memory over row ranges cut at `cuts`. Without a base (`with_base`
    false; default: whether the method requires one) the base tensor is the first model."""
    m = METHODS[method]
    with_base = m.uses_base if with_base is None else with_base
    outs = run_in_memory(m, _pieces(name, base, models, params, cuts, with_base, seed, m))
    return torch.cat([o.reshape(-1) for o in outs])


def _merge_applied_in_parts(method, name, base, models, params, cuts, part_rows, seed=0, with_base=None):
    """As `_merge`, but each piece is applied in ranges of `part_rows` rows with the carries
    the method splits from the piece's (`split_carry`), as the worker applies a piece over
    the CPU caches."""
    m = METHODS[method]
    with_base = m.uses_base if with_base is None else with_base
    pieces = _pieces(name, base, models, params, cuts, with_base, seed, m)
    carries = reduce_statistics(m, [p.meta for p in pieces], lambda i: pieces[i])
    outs = []
    for piece, carry in zip(pieces, carries):
        rows = piece.meta.row_end - piece.meta.row_start
        parts = [piece]
        if m.splittable(piece.meta) and rows > part_rows:
            parts = [PieceInputs(replace(piece.meta, row_start=piece.meta.row_start + r0,
                                         row_end=piece.meta.row_start + min(rows, r0 + part_rows)),
                                 None if piece.base is None else piece.base[r0:r0 + part_rows],
                                 tuple(x[r0:r0 + part_rows] for x in piece.models))
                     for r0 in range(0, rows, part_rows)]
        part_carries = m.split_carry(piece, carry, parts) if len(parts) > 1 else None
        if part_carries is None:
            outs.append(m.apply(piece, carry))
        else:
            outs += [m.apply(part, c) for part, c in zip(parts, part_carries)]
    return torch.cat([o.reshape(-1) for o in outs])


def _bits(t):
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@st.composite
def merge_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(1, 40))
    cols = draw(st.integers(1, 19))
    n = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    ties = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g).to(dtype)
    if ties:  # deltas from a handful of values: heavy ties at every threshold
        choices = torch.tensor([-0.5, -0.25, 0.0, 0.25, 0.5])
        models = [base + choices[torch.randint(0, 5, (rows, cols), generator=g)].to(dtype) for _ in range(n)]
    else:
        models = [base + (0.1 * torch.randn(rows, cols, generator=g)).to(dtype) for _ in range(n)]
    weights = draw(st.lists(st.floats(0.05, 2.0), min_size=n, max_size=n))
    densities = draw(st.lists(st.sampled_from([0.05, 0.1, 0.3, 0.5, 0.77, 1.0]), min_size=n, max_size=n))
    cuts = draw(st.lists(st.integers(1, max(1, rows - 1)), max_size=6))
    shared = dict(normalize=draw(st.booleans()), **{"lambda": draw(st.sampled_from([1.0, 0.7, 1.5]))})
    return dtype, base, models, weights, densities, cuts, shared


REQUIRED_SHARED = {"t": 0.3}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=merge_case(), method=st.sampled_from(sorted(METHODS)), rescale=st.booleans(),
       seed=st.integers(0, 2**63 - 1), with_base=st.booleans(), part_rows=st.integers(1, 9))
def test_split_equals_whole(case, method, rescale, seed, with_base, part_rows):
    """Every method, any cut into row ranges its split policy allows: the same bits (random
    methods for one seed); also when each piece is applied in smaller ranges with the
    carries the method splits from the piece's."""
    dtype, base, models, weights, densities, cuts, shared = case
    spec = METHODS[method]
    rules = spec.inputs
    with_base = rules.base == "required" or (with_base and rules.base == "optional")
    if not with_base:  # no base: the base tensor is one more model
        models, weights, densities = [base] + models, weights[:1] + weights, densities[:1] + densities
    n = min(len(models), rules.max_models or len(models))
    assume(n >= rules.min_models)
    models, weights, densities = models[:n], weights[:n], densities[:n]
    shared = dict(shared, rescale=rescale, select_topk=densities[0], **REQUIRED_SHARED)
    shared = {k: v for k, v in shared.items() if spec.parameter(k) and not spec.parameter(k).per_model}
    if spec.parameter("epsilon") and spec.parameter("epsilon").per_model:
        densities = [min(max(d, 0.2), 0.8) for d in densities]  # della: density +/- 0.15 inside (0, 1)
    params = _params(method, weights, densities, **shared)
    first = base if with_base else models[0]
    rest = models if with_base else models[1:]
    whole = _merge(method, "t", first, rest, params, seed=seed, with_base=with_base)
    split = _merge(method, "t", first, rest, params, cuts, seed=seed, with_base=with_base)
    assert torch.equal(_bits(whole), _bits(split))
    in_parts = _merge_applied_in_parts(method, "t", first, rest, params, cuts, part_rows, seed, with_base)
    assert torch.equal(_bits(whole), _bits(in_parts))


@settings(max_examples=150, deadline=None)
@given(dtype=st.sampled_from(DTYPES + [torch.float64]), numel=st.integers(1, 600), density=st.floats(0.001, 0.999),
       levels=st.sampled_from([2, 5, 1000]), cuts=st.lists(st.integers(1, 599), max_size=8),
       seed=st.integers(0, 2**16))
def test_radix_select_keeps_exactly_k_lowest_index_ties_first(dtype, numel, density, levels, cuts, seed):
    k = int(density * numel)
    assume(k > 0)
    values = _levels(dtype, numel, levels, seed)
    bits = topk.key_bits(dtype)
    mask, fast = _select(values, topk.top_k(bits, numel, k), cuts)
    assert mask.sum().item() == k
    # Reference: stable sort by magnitude descending keeps lower indices first among equals.
    order = np.argsort(-values.abs().to(torch.float64).numpy(), kind="stable")[:k]
    expected = torch.zeros(numel, dtype=torch.bool)
    expected[torch.from_numpy(order.copy())] = True
    assert torch.equal(mask, expected)
    assert torch.equal(fast, expected)


@settings(max_examples=150, deadline=None)
@given(dtype=st.sampled_from(DTYPES + [torch.float64]), numel=st.integers(1, 600), start=st.integers(0, 600),
       length=st.integers(0, 600), levels=st.sampled_from([2, 5, 1000]), cuts=st.lists(st.integers(1, 599), max_size=8),
       seed=st.integers(0, 2**16))
def test_ascending_window_matches_a_stable_ascending_sort(dtype, numel, start, length, levels, cuts, seed):
    """Breadcrumbs' selection: positions [start, start + length) of a stable ascending sort."""
    values = _levels(dtype, numel, levels, seed)
    mask, fast = _select(values, topk.ascending_window(topk.key_bits(dtype), numel, start, start + length), cuts)
    order = np.argsort(values.abs().to(torch.float64).numpy(), kind="stable")[start:start + length]
    expected = torch.zeros(numel, dtype=torch.bool)
    expected[torch.from_numpy(order.copy())] = True
    assert torch.equal(mask, expected)
    assert torch.equal(fast, expected)


def _levels(dtype, numel, levels, seed):
    """Values from a few levels: many exact ties at any threshold."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-levels, levels + 1, (numel,), generator=g).to(torch.float64) / levels).to(dtype)


def _select(values, selection, cuts):
    """Run the radix selection over pieces cut at `cuts`; return its mask, from kept_mask and keep_bits."""
    numel = values.numel()
    keys = topk.magnitude_keys(values)
    bounds = [0] + sorted(set(c for c in cuts if 0 < c < numel)) + [numel]
    ranges = list(zip(bounds, bounds[1:]))
    states = [selection] * len(ranges)
    if selection.searching:
        for p in range(topk.passes_for(selection.bits)):
            partials = [topk.histograms(keys[a:b], s, p) for (a, b), s in zip(ranges, states)]
            states = topk.reduce_pass(p, states, partials)
    mask = torch.cat([topk.kept_mask(keys[a:b], s) for (a, b), s in zip(ranges, states)])
    fast = torch.cat([topk.keep_bits(keys[a:b], s) == -1 for (a, b), s in zip(ranges, states)])
    return mask, fast


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_deltas_give_the_base(dtype):
    base = torch.randn(17, 9).to(dtype)
    params = _params("ties", [0.5, 0.5], [0.3, 0.6], normalize=True, int8_mask=False, sign_election="weighted",
                     density_scope="tensor", rescale=False, **{"lambda": 1.0})
    out = _merge("ties", "t", base, [base.clone(), base.clone()], params, cuts=[3, 11])
    assert torch.equal(_bits(out), _bits(base.reshape(-1)))


def test_unweighted_sign_election_matches_paper_reference():
    """Paper order: elect signs from the unweighted trimmed deltas, then the weighted disjoint mean."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 32, generator=g)
    models = [base + 0.1 * torch.randn(64, 32, generator=g) for _ in range(3)]
    weights, densities = [1.0, 0.35, 0.2], [0.5, 0.4, 0.6]
    params = _params("ties", weights, densities, normalize=True, int8_mask=False, sign_election="unweighted",
                     density_scope="tensor", rescale=False, **{"lambda": 1.0})
    ours = _merge("ties", "t", base, models, params, cuts=[10, 40]).reshape(64, 32)

    trimmed = []
    for m, d in zip(models, densities):
        delta = (m - base).double()
        k = int(d * delta.numel())
        keep = torch.zeros(delta.numel(), dtype=torch.bool)
        keep[torch.topk(delta.abs().reshape(-1), k).indices] = True
        trimmed.append(delta * keep.reshape(delta.shape))
    elected = torch.where(sum(trimmed) >= 0, 1.0, -1.0)
    agree = [(torch.sign(t) == elected) for t in trimmed]
    num = sum(w * t * a for w, t, a in zip(weights, trimmed, agree))
    den = sum(w * a.double() for w, a in zip(weights, agree))
    reference = base.double() + num / torch.where(den == 0, 1.0, den)
    assert torch.allclose(ours.double(), reference, rtol=0, atol=1e-6)

    weighted = _merge("ties", "t", base, models, _params(
        "ties", weights, densities, normalize=True, int8_mask=False, sign_election="weighted",
        density_scope="tensor", rescale=False, **{"lambda": 1.0})).reshape(64, 32)
    differ = (weighted != ours).float().mean().item()
    assert 0 < differ < 0.2  # unequal weights: a few percent of entries differ

    equal = [0.4, 0.4, 0.4]
    a = _merge("ties", "t", base, models, _params("ties", equal, densities, normalize=True, int8_mask=False,
                                                  sign_election="unweighted", density_scope="tensor", rescale=False,
                                                  **{"lambda": 1.0}))
    b = _merge("ties", "t", base, models, _params("ties", equal, densities, normalize=True, int8_mask=False,
                                                  sign_election="weighted", density_scope="tensor", rescale=False,
                                                  **{"lambda": 1.0}))
    assert torch.equal(a, b)


def test_rescale_restores_l1_norm_whole_or_split():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(40, 16, generator=g)
    models = [base + 0.1 * torch.randn(40, 16, generator=g)]
    params = _params("ties", [1.0], [0.3], normalize=False, int8_mask=False, sign_election="weighted",
                     density_scope="tensor", rescale=True, **{"lambda": 1.0})
    whole = _merge("ties", "t", base, models, params)
    split = _merge("ties", "t", base, models, params, cuts=[7, 19, 33])
    assert torch.equal(whole, split)
    delta = (models[0] - base).reshape(-1)
    merged_delta = whole - base.reshape(-1)
    assert math.isclose(merged_delta.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-4)


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(DTYPES), rows=st.integers(2, 30), cuts=st.lists(st.integers(1, 29), max_size=6),
       seed=st.integers(0, 2**16))
def test_rescale_is_split_invariant(dtype, rows, cuts, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, 13, generator=g).to(dtype)
    models = [base + (0.1 * torch.randn(rows, 13, generator=g) * torch.logspace(-3, 1, 13)).to(dtype)
              for _ in range(2)]
    params = _params("ties", [0.7, 0.4], [0.3, 0.6], normalize=True, int8_mask=False, sign_election="weighted",
                     density_scope="tensor", rescale=True, **{"lambda": 1.0})
    whole = _merge("ties", "t", base, models, params)
    assert torch.equal(_bits(whole), _bits(_merge("ties", "t", base, models, params, cuts)))
