"""Parity with the real mergekit on tiny Llama-shaped models (GQA, embedding larger than the rest).

linear and task_arithmetic must be bit-identical. TIES must be identical except at entries
whose |delta| equals that tensor's top-k threshold (mergekit breaks those ties arbitrarily;
we keep the lowest flat index first).
"""

from __future__ import annotations

import pytest
import torch

import distmerge
from helpers import assert_bit_identical, assert_ties_parity, load_checkpoint, run_mergekit, write_yaml

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _config(method, paths, weights, *, densities=None, params=None, dtype=None, out_dtype=None, base=True):
    models = []
    for i, (p, w) in enumerate(zip(paths[1:], weights)):
        mp = {"weight": w}
        if densities is not None and densities[i] is not None:
            mp["density"] = densities[i]
        models.append({"model": p, "parameters": mp})
    cfg = {"merge_method": method, "models": models}
    if base:
        cfg["base_model"] = paths[0]
    if params:
        cfg["parameters"] = params
    if dtype:
        cfg["dtype"] = dtype
    if out_dtype:
        cfg["out_dtype"] = out_dtype
    return cfg


def _both(tmp_path, cfg, **options):
    path = write_yaml(str(tmp_path / "merge.yml"), cfg)
    theirs = run_mergekit(path, str(tmp_path / "mergekit"))
    distmerge.merge(path, str(tmp_path / "distmerge"), num_workers=2, **options)
    return load_checkpoint(str(tmp_path / "distmerge")), theirs


LINEAR_CASES = [
    dict(model_dtype=torch.bfloat16, weights=[0.6, 0.9, 0.25], params=None, dtype=None, out_dtype=None),
    dict(model_dtype=torch.bfloat16, weights=[1.0, 0.5, 0.3], params={"normalize": False}, dtype="float32",
         out_dtype="bfloat16"),
    dict(model_dtype=torch.float32, weights=[0.2, 0.2, 0.7], params=None, dtype="float16", out_dtype=None),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=["bf16", "fp32-compute-no-normalize", "fp16-from-fp32"])
def test_linear_bit_identical(ray_local, model_factory, tmp_path, case):
    paths = model_factory(case["model_dtype"])
    cfg = _config("linear", paths, case["weights"], params=case["params"], dtype=case["dtype"],
                  out_dtype=case["out_dtype"], base=False)
    ours, theirs = _both(tmp_path, cfg)
    assert_bit_identical(ours, theirs)


TASK_ARITHMETIC_CASES = [
    dict(model_dtype=torch.bfloat16, weights=[1.0, 0.5, -0.3], params={"lambda": 0.8}, dtype=None),
    dict(model_dtype=torch.bfloat16, weights=[0.7, 0.6, 0.5], params={"normalize": True}, dtype="float16"),
    dict(model_dtype=torch.float32, weights=[0.3, 0.3, 0.9], params={"lambda": 1.5}, dtype="float32"),
]


@pytest.mark.parametrize("case", TASK_ARITHMETIC_CASES, ids=["bf16-lambda", "fp16-normalize", "fp32"])
def test_task_arithmetic_bit_identical(ray_local, model_factory, tmp_path, case):
    paths = model_factory(case["model_dtype"])
    cfg = _config("task_arithmetic", paths, case["weights"], params=case["params"], dtype=case["dtype"])
    ours, theirs = _both(tmp_path, cfg)
    assert_bit_identical(ours, theirs)


TIES_CASES = [
    # unequal weights, per-model densities 0.1 / 0.5 / 1.0, int8 masks, bf16
    dict(model_dtype=torch.bfloat16, weights=[0.5, 0.3, 0.2], densities=[0.1, 0.5, 1.0],
         params={"int8_mask": True}, dtype="bfloat16", out_dtype=None),
    # weights not summing to 1, normalize off, lambda != 1, fp16 compute
    dict(model_dtype=torch.bfloat16, weights=[1.0, 0.7, 0.4], densities=[0.5, 0.5, 0.5],
         params={"normalize": False, "lambda": 1.3}, dtype="float16", out_dtype=None),
    # fp32 models, fp32 compute, bf16 output
    dict(model_dtype=torch.float32, weights=[0.5, 0.3, 0.2], densities=[0.3, 0.7, 0.5],
         params={"lambda": 0.9}, dtype="float32", out_dtype="bfloat16"),
    # dtype unset: the inputs' dtype; one global density
    dict(model_dtype=torch.float16, weights=[0.2, 0.45, 0.35], densities=[None, None, None],
         params={"density": 0.4, "int8_mask": False}, dtype=None, out_dtype="float32"),
]


@pytest.mark.parametrize("case", TIES_CASES, ids=["bf16-densities", "fp16-no-normalize-lambda", "fp32-out-bf16",
                                                  "fp16-global-density"])
def test_ties_bit_identical_to_mergekit_with_stable_sorts(ray_local, model_factory, tmp_path, case):
    paths = model_factory(case["model_dtype"])
    cfg = _config("ties", paths, case["weights"], densities=case["densities"], params=case["params"],
                  dtype=case["dtype"], out_dtype=case["out_dtype"])
    ours, theirs = _both(tmp_path, cfg)
    assert_bit_identical(ours, theirs)


def test_ties_matches_stock_mergekit_except_threshold_ties(ray_local, model_factory, tmp_path):
    """mergekit as shipped (unstable argsort) differs only where a |delta| equals its threshold."""
    paths = model_factory(torch.bfloat16)
    cfg = _config("ties", paths, [0.5, 0.3, 0.2], densities=[0.1, 0.5, 1.0], dtype="bfloat16")
    path = write_yaml(str(tmp_path / "merge.yml"), cfg)
    theirs = run_mergekit(path, str(tmp_path / "mergekit"), stable=False)
    distmerge.merge(path, str(tmp_path / "distmerge"), num_workers=2)
    ours = load_checkpoint(str(tmp_path / "distmerge"))
    inputs = [load_checkpoint(p) for p in paths]
    differing = assert_ties_parity(ours, theirs, inputs, [0.1, 0.5, 1.0], torch.bfloat16)
    assert differing < 0.05 * sum(t.numel() for t in ours.values())


def test_ties_split_tensors_still_match_mergekit(ray_local, model_factory, tmp_path):
    """A memory budget so small that every matrix is split into row ranges."""
    paths = model_factory(torch.bfloat16)
    cfg = _config("ties", paths, [0.5, 0.3, 0.2], densities=[0.1, 0.5, 0.9], params={"int8_mask": True},
                  dtype="bfloat16")
    ours, theirs = _both(tmp_path, cfg, memory_per_worker=24 * 1024)
    plan = distmerge.plan(str(tmp_path / "merge.yml"), memory_per_worker=24 * 1024)
    split = {p.meta.tensor for u in plan.units for p in u.pieces if p.meta.row_end - p.meta.row_start < p.meta.shape[0]}
    assert {n for n in ours if n.endswith("proj.weight") or "embed" in n or "lm_head" in n} <= split
    assert_bit_identical(ours, theirs)


def test_mergekit_yaml_cli_and_distmerge_cli_agree(ray_local, model_factory, tmp_path):
    """The documented commands themselves: `mergekit-yaml` vs `distmerge merge` (in process)."""
    import subprocess
    import sys

    from distmerge.cli import main

    paths = model_factory(torch.float32)
    cfg = _config("task_arithmetic", paths, [0.4, 0.4, 0.4], params={"lambda": 0.5}, dtype="bfloat16")
    path = write_yaml(str(tmp_path / "merge.yml"), cfg)
    subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", path, str(tmp_path / "mk"),
                    "--no-copy-tokenizer", "--quiet"], check=True, capture_output=True)
    assert main(["merge", path, str(tmp_path / "dm"), "--no-progress", "--shard-size", "100KB"]) == 0
    assert_bit_identical(load_checkpoint(str(tmp_path / "dm")), load_checkpoint(str(tmp_path / "mk")))
