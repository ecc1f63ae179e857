"""Every method against mergekit 0.1.5 on one tensor at a time (no Ray, no files), whole
and cut into row ranges, in each parity class the README states:

- exact: bit-identical to mergekit run with its sorts made stable;
- near (sce's whole-tensor weights): at least 99% of entries bit-identical;
- statistical (dare_*, della*): mergekit draws from torch's global generator, so the
  fraction of changed entries, the quantiles of |merged - base| and the norm match.
"""

from __future__ import annotations

import pytest
import torch

from distmerge.methods import METHODS
from mergekit_oracle import merge_tensor
from test_methods_split import _bits, _merge, _params

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CUTS = [(), (5, 61, 62), tuple(range(3, 128, 9))]

EXACT_CASES = {
    "ties": ({}, [dict(weight=0.5, density=0.3), dict(weight=0.3, density=0.6), dict(weight=0.8, density=1.0)]),
    "ties-rescale-density-edges": ({"rescale": True, "normalize": False},
                                   [dict(weight=0.5, density=1e-4), dict(weight=-0.3, density=0.0),
                                    dict(weight=0.8, density=0.45)]),
    "task_arithmetic": ({"lambda": 0.7}, [dict(weight=0.5), dict(weight=0.3), dict(weight=-0.8)]),
    "breadcrumbs": ({}, [dict(weight=0.5, density=0.3, gamma=0.05), dict(weight=0.3, density=0.6),
                         dict(weight=0.8, density=0.9, gamma=0.2)]),
    "breadcrumbs-rescale": ({"rescale": True, "normalize": True},
                            [dict(weight=0.5, density=0.5, gamma=0.3), dict(weight=0.3, density=0.99, gamma=0.0),
                             dict(weight=0.8, density=0.2, gamma=0.01)]),
    "breadcrumbs_ties": ({"int8_mask": True}, [dict(weight=0.5, density=0.3, gamma=0.05), dict(weight=0.3, density=0.6),
                                               dict(weight=0.8, density=0.9, gamma=0.2)]),
    "ram": ({}, [{}, {}, {}]),
    "ram-epsilon": ({"epsilon": 0.004}, [{}, {}, {}]),
    "ramplus_tl": ({}, [{}, {}, {}]),
    "ramplus_tl-options": ({"epsilon": 0.004, "r": 0.5, "alpha": 0.9}, [{}, {}, {}]),
    "linear": ({"normalize": True}, [dict(weight=0.2), dict(weight=0.5), dict(weight=0.7)]),
    "nearswap": ({"t": 0.004}, [{}]),
    "passthrough": ({}, [dict(scale=None)]),
    "passthrough-scaled": ({}, [dict(scale=0.7)]),
    "model_stock-filter_wise": ({"filter_wise": True}, [{}, {}, {}]),
    "nuslerp-rows": ({"nuslerp_flatten": False}, [dict(weight=0.3), dict(weight=0.9)]),
    "nuslerp-rows-nobase": ({"nuslerp_flatten": False}, [dict(weight=0.3), dict(weight=0.9)]),
    "nuslerp-columns": ({"nuslerp_flatten": False, "nuslerp_row_wise": True}, [dict(weight=0.6), dict(weight=0.4)]),
    "multislerp-one": ({}, [dict(weight=0.5)]),
    "arcee_fusion": ({}, [{}]),
}
NEAR_CASES = {
    "slerp": ({"t": 0.3}, [{}]),
    "nuslerp": ({}, [dict(weight=0.3), dict(weight=0.9)]),
    "nuslerp-nobase": ({}, [dict(weight=0.5), dict(weight=0.5)]),
    "multislerp": ({}, [dict(weight=0.5), dict(weight=0.2), dict(weight=0.9)]),
    "multislerp-nobase": ({"normalize_weights": False}, [dict(weight=0.5), dict(weight=0.2), dict(weight=0.3)]),
    "model_stock": ({}, [{}, {}, {}]),
    "karcher": ({}, [{}, {}, {}]),
    "karcher-nobase": ({"max_iter": 3, "tol": 1e-4}, [{}, {}]),
    "karcher-nosteps-nobase": ({"max_iter": 0}, [{}, {}, {}]),
    "sce": ({}, [{}, {}, {}]),
    "sce-select": ({"select_topk": 0.3}, [{}, {}, {}]),
    "sce-select-int8": ({"select_topk": 0.05, "int8_mask": True}, [{}, {}, {}]),
}
RANDOM_CASES = {
    "dare_ties": ({}, [dict(weight=0.5, density=0.3), dict(weight=0.3, density=0.6), dict(weight=0.8, density=0.9)]),
    "dare_linear": ({"normalize": True}, [dict(weight=0.5, density=0.3), dict(weight=0.3, density=0.6),
                                         dict(weight=0.8, density=0.9)]),
    "della": ({}, [dict(weight=0.5, density=0.3, epsilon=0.1), dict(weight=0.3, density=0.6),
                   dict(weight=0.8, density=0.5, epsilon=0.3)]),
    "della_linear": ({"lambda": 1.3}, [dict(weight=0.5, density=0.3, epsilon=0.1), dict(weight=0.3, density=0.6),
                                       dict(weight=0.8, density=0.5, epsilon=0.3)]),
}


def _models(dtype, rows=128, cols=96, seed=0):
    return _models_of(dtype, rows, cols, seed)


def _models_of(dtype, rows, cols, seed):
    """A base and three fine-tunes with heavy-tailed deltas, some rows untouched (zero deltas)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g).to(dtype)
    models = []
    for i in range(3):
        delta = 0.01 * torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, cols, generator=g))
        model = base + delta.to(dtype)
        model[i * 7:i * 7 + 4] = base[i * 7:i * 7 + 4]
        models.append(model)
    return base, models


def _run_both(case, cases, dtype, cuts, seed=0):
    """(base, ours, mergekit's) for a case named "method[-variant]": as many models as the case
    has per-model entries; a method without a base (linear, passthrough) gets the base tensor
    as its first model; "-nobase" runs a method whose base is optional without one."""
    method = case.split("-")[0]
    shared, per_model = cases[case]
    base, models = _models(dtype, seed=seed)
    rules = METHODS[method].inputs
    with_base = rules.takes_base(True) and "-nobase" not in case
    if rules.base in ("ignored", "forbidden"):
        if method == "linear":
            per_model = [dict(weight=0.4)] + per_model
        inputs = ([base] + models)[:len(per_model)]
    elif rules.base == "input" and "-nobase" not in case:  # a named base is one more input, last
        inputs = models[:len(per_model)] + [base]
        per_model = per_model + [{}]
    else:
        inputs = models[:len(per_model)]
    theirs = merge_tensor(method, base if with_base else None, inputs, shared, per_model)
    weights = [p.get("weight", 1.0) for p in per_model]
    densities = [p.get("density", 1.0) for p in per_model]
    params = _params(method, weights, densities, **shared)
    params = type(params)(params.shared, tuple({**p, **given} for p, given in zip(params.per_model, per_model)))
    name = "model.layers.0.mlp.up_proj.weight"
    if with_base:
        ours = _merge(method, name, base, inputs, params, cuts, seed=seed, with_base=True)
    else:  # _merge takes its base argument as the first model
        ours = _merge(method, name, inputs[0], inputs[1:], params, cuts, seed=seed, with_base=False)
    return base, ours.reshape(base.shape), theirs


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", EXACT_CASES)
def test_exact_methods_are_bit_identical_to_mergekit(case, dtype):
    for cuts in CUTS:
        _, ours, theirs = _run_both(case, EXACT_CASES, dtype, cuts)
        assert ours.dtype == theirs.dtype
        differ = (_bits(ours) != _bits(theirs)).sum().item()
        assert differ == 0, f"{case} cut at {cuts}: {differ} of {ours.numel()} entries differ"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", NEAR_CASES)
def test_near_methods_match_mergekit(case, dtype):
    """Whole-tensor statistics (SCE's weights, norms, dot products) are exact sums rounded once
    here and float sums in mergekit; at least 99% of entries are bit-identical, the rest within rounding."""
    for cuts in CUTS:
        _, ours, theirs = _run_both(case, NEAR_CASES, dtype, cuts)
        same = (_bits(ours) == _bits(theirs)).float().mean().item()
        assert same >= 0.99, f"{case}: {same:.4%} bit-identical"
        assert torch.allclose(ours.float(), theirs.float(), rtol=2e-2, atol=1e-3)


def test_sce_truncates_k_like_mergekit():
    """mergekit's k = int(count_nonzero(var) * select_topk) is float32 arithmetic: 100 * 0.29 -> 29, not 28."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, 10, generator=g).to(torch.bfloat16)
    models = [base + (0.05 * torch.randn(10, 10, generator=g)).to(torch.bfloat16) for _ in range(3)]
    theirs = merge_tensor("sce", base, models, {"select_topk": 0.29}, [{}, {}, {}])
    params = _params("sce", [1.0] * 3, [1.0] * 3, select_topk=0.29)
    for cuts in [(), (3, 7)]:
        ours = _merge("sce", "t", base, models, params, cuts).reshape(base.shape)
        assert torch.equal(_bits(ours), _bits(theirs))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_float64_merges_rank_magnitudes_as_mergekit_does(method):
    """mergekit ranks |delta| cast to float32: float64 deltas that round alike are ties (lower index first)."""
    g = torch.Generator().manual_seed(1)
    base = torch.zeros(64, 8, dtype=torch.float64)
    delta = torch.randn(64, 8, generator=g, dtype=torch.float64)
    delta[1::2] = delta[::2] * (1 + 2**-40)  # every odd row: the row above, larger by less than a float32 ulp
    models = [base + delta]
    per_model = [dict(weight=1.0, density=0.4985, gamma=0.1)]  # odd k: the threshold splits a pair
    theirs = merge_tensor(method, base, models, {}, per_model)
    params = _params(method, [1.0], [0.4985])
    params = type(params)(params.shared, tuple({**p, **given} for p, given in zip(params.per_model, per_model)))
    for cuts in [(), (9, 33)]:
        ours = _merge(method, "t", base, models, params, cuts).reshape(base.shape)
        assert torch.equal(_bits(ours), _bits(theirs))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", ["ties-rescale-density-edges", "breadcrumbs-rescale"])
def test_rescale_is_near_mergekit_on_larger_tensors(case, dtype, monkeypatch):
    """mergekit's L1 norms are torch's float sums; ours are exact sums rounded once (the same for
    any split). On bigger tensors the two scales can differ in their last bit, which moves the
    affected model's kept entries by one rounding (and, through the sign vote, a few more)."""
    import test_methods_parity as here

    monkeypatch.setattr(here, "_models", lambda d, rows=128, cols=96, seed=0: _models_of(d, 512, 512, seed))
    _, ours, theirs = _run_both(case, EXACT_CASES, dtype, ())
    same = (_bits(ours) == _bits(theirs)).float().mean().item()
    assert same >= 0.9, f"{case}: {same:.4%} bit-identical"
    assert torch.allclose(ours.double(), theirs.double(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", [c for c in NEAR_CASES if not c.startswith("sce")])
def test_near_methods_stay_within_the_rounding_of_a_statistic_on_larger_tensors(case, dtype, monkeypatch):
    """torch's 16-bit CPU norms round partial results, so on bigger tensors one of mergekit's
    norms or cosines can sit one rounding away from the exact one; a method that scales every
    entry by it (multislerp, nuslerp) then moves many entries, each by a few roundings of the
    tensor's scale (more where nearly parallel inputs make the angle ill-conditioned)."""
    import test_methods_parity as here

    monkeypatch.setattr(here, "_models", lambda d, rows=128, cols=96, seed=0: _models_of(d, 1024, 768, seed))
    _, ours, theirs = _run_both(case, NEAR_CASES, dtype, ())
    scale = theirs.double().abs().max().item()
    assert (ours.double() - theirs.double()).abs().max().item() <= 4 * torch.finfo(dtype).eps * scale


def _profile(base, merged):
    """(fraction of entries changed, quantiles 10/50/90/99% of |merged - base| where changed, norm)."""
    change = (merged.double() - base.double()).abs().reshape(-1)
    quantiles = torch.quantile(change[change > 0].float(), torch.tensor([0.1, 0.5, 0.9, 0.99])).double()
    return torch.cat([torch.tensor([(change > 0).double().mean().item()]), quantiles,
                      torch.tensor([change.norm().item()])])


DRAWS = 8


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", RANDOM_CASES)
def test_random_methods_match_mergekit_statistics(case, dtype):
    """Over 8 draws each (our seeds 0..7; mergekit under torch seeds 0..7), the mean fraction
    changed, |merged - base| quantiles and norm agree within 4 standard errors (or 1.5%)."""
    ours, theirs = [], []
    for draw in range(DRAWS):
        torch.manual_seed(draw)
        base, mine, mergekit = _run_both(case, RANDOM_CASES, dtype, (), seed=draw)
        ours.append(_profile(base, mine))
        theirs.append(_profile(base, mergekit))
    ours, theirs = torch.stack(ours), torch.stack(theirs)
    error = ((ours.var(dim=0) + theirs.var(dim=0)) / DRAWS).sqrt()
    gap = (ours.mean(dim=0) - theirs.mean(dim=0)).abs()
    allowed = torch.maximum(4 * error, 0.015 * theirs.mean(dim=0).abs())
    assert (gap <= allowed).all(), f"ours {ours.mean(dim=0)}, mergekit {theirs.mean(dim=0)}, allowed {allowed}"
    assert ours[:, 0].max() < 0.99  # random methods really drop entries


@pytest.mark.parametrize("method", sorted(RANDOM_CASES))
def test_random_methods_depend_on_the_seed_only(method):
    """Same seed: the same bits for any cut; another seed: other bits."""
    shared, per_model = RANDOM_CASES[method]
    base, models = _models(torch.bfloat16)
    params = _params(method, [p["weight"] for p in per_model], [p["density"] for p in per_model], **shared)
    params = type(params)(params.shared, tuple({**p, **given} for p, given in zip(params.per_model, per_model)))
    name = "model.layers.1.self_attn.o_proj.weight"
    first = _merge(method, name, base, models, params, seed=7)
    for cuts in CUTS[1:]:
        assert torch.equal(_bits(first), _bits(_merge(method, name, base, models, params, cuts, seed=7)))
    other = _merge(method, name, base, models, params, seed=8)
    assert (_bits(first) != _bits(other)).float().mean().item() > 0.1
    other_tensor = _merge(method, "model.layers.2.self_attn.o_proj.weight", base, models, params, seed=7)
    assert (_bits(first) != _bits(other_tensor)).float().mean().item() > 0.1


def test_della_keeps_more_of_the_larger_entries_within_each_row():
    """MAGPRUNE: keep probability rises with the magnitude rank inside the row."""
    base = torch.zeros(64, 2000)
    g = torch.Generator().manual_seed(2)
    model = base + torch.randn(64, 2000, generator=g)
    params = _params("della_linear", [1.0], [0.5], rescale=False)
    params = type(params)(params.shared, ({**params.per_model[0], "epsilon": 0.4},))
    kept = _merge("della_linear", "t", base, [model], params, seed=3).reshape(64, 2000) != 0
    ranks = model.abs().argsort(dim=1).argsort(dim=1)
    low = kept[ranks < 400].float().mean().item()  # expected 0.1 + 0.8 * ~0.1 = ~0.18
    high = kept[ranks >= 1600].float().mean().item()  # expected ~0.82
    assert 0.13 < low < 0.23 and 0.77 < high < 0.87, (low, high)
