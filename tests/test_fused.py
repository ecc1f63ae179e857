"""The fused 16-bit kernels (distmerge/methods/_fused.c) against the torch path they
replace: the same bits for every task-vector method and option they cover, on data made
to hit every rounding and sign edge (exact ties at the top-k threshold, zeros of both
signs, cancelling deltas, deltas that overflow to infinity, negative and tiny weights),
whole and cut into row ranges applied in parts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distmerge.methods import METHODS, fused, signs, topk
from test_methods_split import _bits, _merge_applied_in_parts, _params

FUSED_METHODS = ["ties", "task_arithmetic", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                 "della", "della_linear"]


def test_the_extension_is_built():
    """CI has a C compiler: the fast path must be there, or every merge silently runs slow."""
    assert fused.built(), "distmerge.methods._fused did not build: reinstall with a C compiler (pip install -e .)"
    assert fused.MAX_MODELS == signs.SEQUENTIAL_SUM_MAX
    assert fused.usable(torch.zeros(1, dtype=torch.float16)), "float16 kernels not built (no _Float16)"


HALVES = [torch.bfloat16, torch.float16]


def _hostile(g: torch.Generator, shape, kind: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Float32 values for `dtype` inputs (finite once rounded to it)."""
    info = torch.finfo(dtype)
    if kind == "ties":  # a handful of values: heavy exact ties at any threshold
        values = torch.tensor([-0.5, -0.25, -0.0, 0.0, 0.25, 0.5, info.smallest_normal / 4])
        return values[torch.randint(0, len(values), shape, generator=g)]
    if kind == "wide":  # magnitudes from subnormal to near the maximum
        low, high = int(math.log2(info.smallest_normal)) - 4, int(math.log2(info.max)) - 1
        exponent = torch.randint(low, high, shape, generator=g).float()
        return (torch.randn(shape, generator=g) * torch.exp2(exponent)).clamp(-info.max, info.max)
    return 0.02 * torch.randn(shape, generator=g)


@st.composite
def fused_case(draw):
    rows = draw(st.integers(1, 48))
    cols = draw(st.integers(1, 700))  # over one kernel block (512) for some rows
    n = draw(st.integers(1, fused.MAX_MODELS))
    kind = draw(st.sampled_from(["gauss", "ties", "wide"]))
    dtype = draw(st.sampled_from(HALVES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    base = _hostile(g, (rows, cols), kind, dtype).to(dtype)
    models = []
    for _ in range(n):
        change = _hostile(g, (rows, cols), draw(st.sampled_from(["gauss", "ties", kind])), dtype)
        model = (base.float() + change).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
        same = torch.rand(rows, cols, generator=g) < 0.1  # zero deltas
        models.append(torch.where(same, base, model))
    # Zero weights only where no delta overflows (inf * 0 is a NaN whose bits torch's own
    # scalar and vector paths disagree on).
    weight = st.floats(-2, 2).filter(lambda w: w != 0 or kind != "wide")
    weights = draw(st.lists(weight, min_size=n, max_size=n))
    method = draw(st.sampled_from(FUSED_METHODS))
    # DELLA's keep probabilities, density +/- epsilon (0.15), must lie in [0, 1]
    choices = [0.2, 0.3, 0.5, 0.8] if METHODS[method].parameter("epsilon") else [0.0, 0.01, 0.3, 0.5, 0.9, 1.0]
    densities = draw(st.lists(st.sampled_from(choices), min_size=n, max_size=n))
    shared = {"normalize": draw(st.booleans()), "lambda": draw(st.sampled_from([1.0, 0.7, -1.3, 3.0]))}
    cuts = draw(st.lists(st.integers(1, max(1, rows - 1)), max_size=4))
    part_rows = draw(st.integers(1, 12))
    return method, base, models, weights, densities, shared, cuts, part_rows


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=fused_case(), seed=st.integers(0, 2**63 - 1))
def test_fused_equals_torch(case, seed):
    method, base, models, weights, densities, shared, cuts, part_rows = case
    spec = METHODS[method]
    shared = dict(shared, rescale=False)  # rescale runs the torch path
    shared = {k: v for k, v in shared.items() if spec.parameter(k) and not spec.parameter(k).per_model}
    params = _params(method, weights, densities, **shared)
    fast = _merge_applied_in_parts(method, "t", base, models, params, cuts, part_rows, seed=seed)
    with fused.disabled():
        slow = _merge_applied_in_parts(method, "t", base, models, params, cuts, part_rows, seed=seed)
    differ = (_bits(fast) != _bits(slow)).nonzero()
    if len(differ):
        i = int(differ[0])
        raise AssertionError(
            f"{method} ({len(models)} models, {base.shape}, weights {weights}, densities {densities}, {shared}, "
            f"cuts {cuts}, part rows {part_rows}): {len(differ)} entries differ, the first at {i}: base "
            f"{base.reshape(-1)[i].item()}, models {[m.reshape(-1)[i].item() for m in models]}: "
            f"fused {fast[i].item()}, torch {slow[i].item()}")


@pytest.mark.parametrize("dtype", HALVES)
def test_histogram_equals_torch_keys(dtype):
    g = torch.Generator().manual_seed(3)
    base = _hostile(g, (300, 257), "wide", dtype).to(dtype)
    model = (base.float() + _hostile(g, (300, 257), "ties", dtype)).to(dtype)
    expected = topk.digit_histogram(topk.magnitude_keys(model - base), 16, 0, 0)
    assert np.array_equal(fused.delta_histogram(base, model), expected)


@pytest.mark.parametrize("dtype", HALVES)
def test_fused_path_runs_for_a_ties_piece(dtype):
    """Guard against silently falling back: a plain 16-bit TIES piece takes the kernel."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 8, generator=g).to(dtype)
    models = [(base.float() + 0.1 * torch.randn(8, 8, generator=g)).to(dtype) for _ in range(3)]
    params = _params("ties", [0.5, 0.3, 0.2], [0.5] * 3, normalize=True)
    from test_methods_split import _pieces
    piece = _pieces("t", base, models, params, ())[0]
    method = METHODS["ties"]
    carry = method.plan_statistics([piece.meta]).carries[0]
    assert method._apply_fused(piece, carry) is not None


def test_sum_models_sums_in_model_order():
    """Up to SEQUENTIAL_SUM_MAX models: float32 from +0 in model order, torch's own order
    for a tensor of whole vector blocks, and for any size; beyond, torch's tree of sums."""
    g = torch.Generator().manual_seed(1)
    for n in (3, 5, signs.SEQUENTIAL_SUM_MAX, signs.SEQUENTIAL_SUM_MAX + 2, 64):
        for numel in (4096, 1000, 7):
            x = (torch.randn(n, numel, generator=g) * torch.logspace(-3, 3, n).reshape(n, 1)).to(torch.bfloat16)
            x[:, :3] = -0.0
            total = torch.zeros(numel)
            for row in x:
                total = total + row.float()
            ours = _bits(signs.sum_models(x))
            if n <= signs.SEQUENTIAL_SUM_MAX:
                assert torch.equal(ours, _bits(total.to(torch.bfloat16))), (n, numel)
            if n > signs.SEQUENTIAL_SUM_MAX or numel % 64 == 0:
                assert torch.equal(ours, _bits(x.sum(dim=0))), (n, numel)


@pytest.mark.parametrize("models", [0, fused.MAX_MODELS + 1])
def test_kernel_refuses_a_bad_model_count(models):
    if not fused.built():
        pytest.skip("extension not built")
    base = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="models"):
        weights = torch.ones(max(models, 1), dtype=torch.bfloat16)
        fused.merge(base, [base] * models, [fused.KeepRule()] * models, weights,
                    consensus=True, normalize=True, divisor=1.0, scale=None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_first_nonfinite_finds_every_kind(dtype):
    x = torch.randn(5000).to(dtype)
    x[17] = torch.finfo(dtype).max  # large but finite
    assert fused.first_nonfinite(x) is None
    for bad in (float("inf"), float("-inf"), float("nan")):
        for at in (0, 511, 512, 4999):
            y = x.clone()
            y[at] = bad
            y[4999 if at != 4999 else 0] = bad
            assert fused.first_nonfinite(y) == min(at, 4999 if at != 4999 else 0)


@pytest.mark.parametrize("dtype", HALVES)
def test_delta_key_count_equals_torch(dtype):
    g = torch.Generator().manual_seed(5)
    base = _hostile(g, (64, 33), "ties", dtype).to(dtype)
    model = (base.float() + _hostile(g, (64, 33), "ties", dtype)).to(dtype)
    keys = topk.magnitude_keys(model - base)
    for key in keys.unique().tolist() + [0x7F80, 12345]:
        assert fused.delta_key_count(base, model, key) == int((keys == key).sum())


def test_kernel_refuses_mismatched_lengths():
    if not fused.built():
        pytest.skip("extension not built")
    base = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="model"):
        fused.delta_histogram(base, torch.zeros(5, dtype=torch.bfloat16))
