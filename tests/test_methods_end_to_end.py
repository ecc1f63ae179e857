"""The task-vector family end to end: real Ray, real safetensors files, real mergekit 0.1.5.

Each method merges generated models with a config that uses mergekit's parameter forms
(per-model values, a layer gradient, a filter list), split to a tiny memory budget on 2
workers and whole on 1, and is compared with mergekit's output in its parity class.
Random methods: the same seed gives the same bytes for any budget, worker count and
after a resume; a merge without a seed records the one it drew.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

import distmerge
from helpers import (assert_bit_identical, bits, cli_command, kill_tree, load_checkpoint, read_index, run_cli,
                     run_mergekit, shard_bytes, write_yaml)

TINY_BUDGET = 64 * 1024  # splits every matrix of the test models into row ranges

METHOD_PARAMETERS = {
    "breadcrumbs": ({"density": [0.3, 0.7], "gamma": 0.05}, {"rescale": False}),
    "breadcrumbs_ties": ({"density": 0.4, "gamma": [{"filter": "mlp", "value": 0.1}, {"value": 0.02}]},
                         {"normalize": True}),
    "ram": ({}, {"epsilon": 0.002}),
    "ramplus_tl": ({}, {"epsilon": 0.002, "r": 0.4, "alpha": 0.5}),
    "sce": ({}, {"select_topk": [0.2, 0.6]}),
    "task_arithmetic": ({}, {"lambda": [{"filter": "self_attn", "value": 0.7}, {"value": 1.1}]}),
    "ties": ({"density": [0.2, 0.8]}, {"rescale": True, "lambda": 0.9}),
    "dare_ties": ({"density": 0.4}, {}),
    "dare_linear": ({"density": [0.3, 0.6]}, {"normalize": True}),
    "della": ({"density": 0.5, "epsilon": 0.1}, {}),
    "della_linear": ({"density": 0.4, "epsilon": [0.05, 0.2]}, {"lambda": 1.2}),
}
WEIGHTED = {"breadcrumbs", "breadcrumbs_ties", "task_arithmetic", "ties", "dare_ties", "dare_linear", "della",
            "della_linear"}
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}


def _config(method, paths, **extra):
    per_model, shared = METHOD_PARAMETERS[method]
    models = []
    for i, path in enumerate(paths[1:]):
        params = dict(per_model)
        if method in WEIGHTED:
            params["weight"] = [0.5, 0.3, 0.8][i]
        models.append({"model": path, "parameters": params} if params else {"model": path})
    cfg = {"merge_method": method, "base_model": paths[0], "models": models}
    if shared:
        cfg["parameters"] = shared
    cfg.update(extra)
    return cfg


def _merge(tmp_path, cfg, name, **options):
    path = write_yaml(str(tmp_path / f"{name}.yml"), cfg)
    summary = distmerge.merge(path, str(tmp_path / name), **options)
    return load_checkpoint(str(tmp_path / name)), summary


DETERMINISTIC = sorted(set(METHOD_PARAMETERS) - RANDOM)


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_deterministic_methods_match_mergekit_split_and_whole(ray_local, model_factory, tmp_path, method):
    """bf16 split to a tiny budget on 2 workers, fp16 whole on 1: each against mergekit."""
    for dtype, budget, workers in ((torch.bfloat16, TINY_BUDGET, 2), (torch.float16, None, 1)):
        paths = model_factory(dtype)
        cfg = _config(method, paths)
        config_path = write_yaml(str(tmp_path / f"{method}-{workers}.yml"), cfg)
        theirs = run_mergekit(config_path, str(tmp_path / f"mergekit-{workers}"))
        ours, _ = _merge(tmp_path, cfg, f"ours-{workers}", num_workers=workers, memory_per_worker=budget)
        if budget:
            plan = distmerge.plan(config_path, memory_per_worker=budget)
            assert sum(1 for u in plan.units for p in u.pieces if p.meta.row_end - p.meta.row_start
                       < p.meta.shape[0]) > 60
        if method == "ramplus_tl":
            # mergekit writes float32 here (its float32 scale promotes the result); we write the
            # compute dtype: the same values, cast once
            theirs = {k: v.to(dtype) for k, v in theirs.items()}
        if method == "sce":
            for name in ours:
                same = (bits(ours[name]) == bits(theirs[name])).float().mean().item()
                assert same >= 0.99, f"{name}: {same:.4%} bit-identical"
        else:
            assert_bit_identical(ours, theirs)


def test_ramplus_tl_with_out_dtype_float32_is_mergekits_file_exactly(ray_local, model_factory, tmp_path):
    paths = model_factory(torch.bfloat16)
    cfg = _config("ramplus_tl", paths, out_dtype="float32")
    theirs = run_mergekit(write_yaml(str(tmp_path / "m.yml"), cfg), str(tmp_path / "mergekit"))
    ours, _ = _merge(tmp_path, cfg, "ours", num_workers=2, memory_per_worker=TINY_BUDGET)
    assert_bit_identical(ours, theirs)


def _change_profile(base, merged):
    changed = total = 0
    norm2 = 0.0
    for name in base:
        delta = merged[name].double() - base[name].double()
        changed += (delta != 0).sum().item()
        total += delta.numel()
        norm2 += delta.square().sum().item()
    return changed / total, norm2 ** 0.5


@pytest.mark.parametrize("method", sorted(RANDOM))
def test_random_methods_match_mergekit_statistics_and_ignore_the_split(ray_local, model_factory, tmp_path, method):
    paths = model_factory(torch.bfloat16)
    cfg = _config(method, paths, random_seed=11)
    theirs = run_mergekit(write_yaml(str(tmp_path / "m.yml"), cfg), str(tmp_path / "mergekit"))
    whole, summary = _merge(tmp_path, cfg, "whole", num_workers=1)
    assert summary.random_seed == 11
    _merge(tmp_path, cfg, "split", num_workers=2, memory_per_worker=TINY_BUDGET)
    assert shard_bytes(str(tmp_path / "whole")) == shard_bytes(str(tmp_path / "split"))
    base = load_checkpoint(paths[0])
    ours_fraction, ours_norm = _change_profile(base, whole)
    their_fraction, their_norm = _change_profile(base, theirs)
    assert abs(ours_fraction - their_fraction) < 0.01, (ours_fraction, their_fraction)
    assert abs(ours_norm - their_norm) / their_norm < 0.03, (ours_norm, their_norm)

    other, _ = _merge(tmp_path, cfg, "other-seed", num_workers=2, random_seed=12)
    differ = sum((bits(other[n]) != bits(whole[n])).sum().item() for n in whole)
    assert differ > 0.1 * sum(t.numel() for t in whole.values())


def test_drawn_seed_is_reported_recorded_and_reproduces(ray_local, model_factory, tmp_path):
    paths = model_factory(torch.float16)
    cfg = _config("dare_ties", paths)
    _, summary = _merge(tmp_path, cfg, "drawn", num_workers=2)
    seed = summary.random_seed
    assert seed is not None and f"random seed: {seed}" in summary.format()
    card = (tmp_path / "drawn" / "README.md").read_text()
    assert f"Random seed: `{seed}`" in card
    _merge(tmp_path, cfg, "again", num_workers=1, memory_per_worker=TINY_BUDGET, random_seed=seed)
    assert shard_bytes(str(tmp_path / "drawn")) == shard_bytes(str(tmp_path / "again"))
    # methods without randomness report no seed
    _, plain = _merge(tmp_path, _config("ties", paths), "plain", num_workers=1)
    assert plain.random_seed is None and "random seed" not in plain.format()


def test_killed_random_merge_resumes_with_its_recorded_seed_bit_identical(ray_local, model_factory, tmp_path):
    """No seed given: the first run draws one and records it in the manifest; the re-run
    (also without a seed) resumes with it and ends byte-identical to a clean run."""
    paths = model_factory(torch.bfloat16)
    cfg = _config("dare_linear", paths)
    config_path = write_yaml(str(tmp_path / "dare.yml"), cfg)
    out = tmp_path / "out"
    command, env = cli_command("merge", config_path, str(out), "--num-workers", "1", "--memory-per-worker", "64KiB",
                               "--no-progress")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        progress = out / ".distmerge-progress"
        import time

        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if progress.exists() and len(progress.read_text().split()) >= 4:
                break
            time.sleep(0.02)
    finally:
        kill_tree(proc)
    manifest = json.loads((out / ".distmerge-manifest.json").read_text())
    seed = manifest["options"]["random_seed"]
    assert not (out / "model.safetensors.index.json").exists(), "the merge finished before it could be killed"
    resumed = run_cli(*command[3:], "--num-workers", "2")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed" in resumed.stdout and f"random seed: {seed}" in resumed.stdout
    _merge(tmp_path, cfg, "clean", num_workers=2, memory_per_worker=TINY_BUDGET, random_seed=seed)
    assert shard_bytes(str(out)) == shard_bytes(str(tmp_path / "clean"))
    assert read_index(str(out))["weight_map"] == read_index(str(tmp_path / "clean"))["weight_map"]
    assert not os.path.exists(out / ".distmerge-manifest.json")


INTERPOLATION = {
    # method: (config changes, parity: "exact" or "near")
    "slerp": ({"models": 1, "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
                                                {"value": 0.3}]}}, "near"),
    "nuslerp": ({"models": 2, "per_model": [{"weight": 0.3}, {"weight": 0.8}]}, "near"),
    "multislerp": ({"models": 3, "per_model": [{"weight": 0.5}, {"weight": 0.2}, {"weight": 0.9}]}, "near"),
    "karcher": ({"models": 3, "parameters": {"max_iter": 4}}, "close"),
    "model_stock": ({"models": 3}, "near"),
    "nearswap": ({"models": 1, "parameters": {"t": 0.001}}, "exact"),
    "arcee_fusion": ({"models": 1}, "exact"),
    "passthrough": ({"models": 1, "no_base": True, "per_model": [{"scale": 0.5}]}, "exact"),
}


def _interpolation_config(method, paths):
    changes, _ = INTERPOLATION[method]
    per_model = changes.get("per_model") or [{}] * changes["models"]
    cfg = {"merge_method": method,
           "models": [{"model": p, "parameters": params} if params else {"model": p}
                      for p, params in zip(paths[1:1 + changes["models"]], per_model)]}
    if not changes.get("no_base"):
        cfg["base_model"] = paths[0]
    if "parameters" in changes:
        cfg["parameters"] = changes["parameters"]
    return cfg


@pytest.mark.parametrize("method", sorted(INTERPOLATION))
def test_interpolation_methods_match_mergekit_split_on_two_workers(ray_local, model_factory, tmp_path, method):
    paths = model_factory(torch.bfloat16)
    cfg = _interpolation_config(method, paths)
    theirs = run_mergekit(write_yaml(str(tmp_path / "m.yml"), cfg), str(tmp_path / "mergekit"))
    ours, _ = _merge(tmp_path, cfg, "ours", num_workers=2, memory_per_worker=TINY_BUDGET)
    # mergekit writes float32 for arcee_fusion (its float mask promotes the result); we write
    # the compute dtype: the same values, cast once
    theirs = {k: v.to(ours[k].dtype) for k, v in theirs.items()}
    parity = INTERPOLATION[method][1]
    if parity == "exact":
        assert_bit_identical(ours, theirs)
        return
    if parity == "close":
        # karcher's bf16 steps amplify the last bits of mergekit's float32 norms (a few ulps
        # off the exact ones): entries agree within a few roundings of the tensor's scale
        for name in ours:
            scale = theirs[name].double().abs().max().item()
            gap = (ours[name].double() - theirs[name].double()).abs().max().item()
            assert gap <= 4 * torch.finfo(torch.bfloat16).eps * scale, (name, gap, scale)
        return
    for name in ours:
        same = (bits(ours[name]) == bits(theirs[name])).float().mean().item()
        assert same >= 0.99, f"{name}: {same:.4%} bit-identical"


@pytest.mark.parametrize("method", ["karcher", "multislerp", "arcee_fusion", "model_stock"])
def test_whole_tensor_statistics_give_the_same_bytes_for_any_budget(ray_local, model_factory, tmp_path, method):
    """Reduced norms, dot products, quartiles and data-dependent steps: whole on 1 worker and
    split to a tiny budget on 2 give the same files."""
    paths = model_factory(torch.float16)
    cfg = _interpolation_config(method, paths)
    _merge(tmp_path, cfg, "whole", num_workers=1)
    _merge(tmp_path, cfg, "split", num_workers=2, memory_per_worker=TINY_BUDGET)
    assert shard_bytes(str(tmp_path / "whole")) == shard_bytes(str(tmp_path / "split"))


def test_plan_shows_each_methods_phases(model_factory, tmp_path):
    from distmerge.planner import format_plan

    paths = model_factory(torch.bfloat16)
    expected = {
        "ties": "select digits -> rescale L1 -> apply",
        "breadcrumbs_ties": "select digits -> apply",
        "dare_linear": "rescale L1 -> apply",
        "sce": "select_topk digits -> weights sum of squares -> apply",
        "ramplus_tl": "overlap counts -> apply",
        "ram": "apply",
    }
    interpolation = {
        "slerp": "norms -> dot product -> apply",
        "multislerp": "norms -> mean norm -> tangent dots -> tangent norm -> apply",
        "karcher": "norms -> mean norm -> step (dots, tangent norm, unit norm) (up to 12x) -> apply",
        "arcee_fusion": "quartile digits -> apply",
        "nearswap": "apply",
    }
    for method, phases in expected.items():
        text = format_plan(distmerge.plan(write_yaml(str(tmp_path / f"{method}.yml"), _config(method, paths)),
                                          memory_per_worker=TINY_BUDGET))
        assert phases in text, text
    for method, phases in interpolation.items():
        text = format_plan(distmerge.plan(write_yaml(str(tmp_path / f"{method}.yml"),
                                                     _interpolation_config(method, paths)),
                                          memory_per_worker=TINY_BUDGET))
        assert phases in text, text
    della = format_plan(distmerge.plan(write_yaml(str(tmp_path / "della.yml"), _config("della", paths)),
                                       random_seed=5))
    assert "random seed: 5" in della
