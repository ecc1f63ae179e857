"""`density_scope: model` (TIES paper): one top-k over each model's whole task vector,
computed across all work units, checked against a direct in-memory reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import distmerge
from distmerge.methods import topk
from distmerge.planner import format_plan
from distmerge.synthetic import ties_config
from helpers import bits, load_checkpoint, write_yaml

NORMS = {f"model.layers.{i}.{n}": torch.float32 for i in range(3)
         for n in ("input_layernorm.weight", "post_attention_layernorm.weight")}


def reference_model_scope(paths, weights, densities, dtype=None):
    inputs = [load_checkpoint(p) for p in paths]
    names = sorted(inputs[0])
    compute = {n: dtype or inputs[0][n].dtype for n in names}
    key_dtype = compute[names[0]] if len(set(compute.values())) == 1 else torch.float32
    masks = []
    for model in inputs[1:]:
        deltas = {n: model[n].to(compute[n]) - inputs[0][n].to(compute[n]) for n in names}
        keys = torch.cat([topk.magnitude_keys(deltas[n].to(key_dtype)).reshape(-1).to(torch.int64) for n in names])
        k = int(densities[len(masks)] * keys.numel())
        order = np.argsort(-keys.numpy(), kind="stable")[:k]  # ties: tensor name order, then flat index
        flat = torch.zeros(keys.numel(), dtype=torch.bool)
        flat[torch.from_numpy(order.copy())] = True
        per_tensor, start = {}, 0
        for n in names:
            size = deltas[n].numel()
            per_tensor[n] = flat[start:start + size].reshape(deltas[n].shape)
            start += size
        masks.append((deltas, per_tensor, k))
    out = {}
    for n in names:
        base = inputs[0][n].to(compute[n])
        w = torch.tensor(weights, dtype=base.dtype).reshape((-1,) + (1,) * base.dim())
        trimmed = torch.stack([d[n] * m[n].to(base.dtype) for d, m, _ in masks]) * w
        elected = torch.where(trimmed.sum(0) >= 0, 1, -1)
        agree = trimmed.sign() == elected
        mixed = (trimmed * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
        out[n] = (base + mixed / divisor).to(base.dtype)
    return out, [sum(m.sum().item() for m in per.values()) == k for _, per, k in masks]


@pytest.mark.parametrize("norm_dtypes", [{}, NORMS], ids=["bf16", "mixed-fp32-norms"])
def test_model_scope_matches_in_memory_reference(ray_local, model_factory, tmp_path, norm_dtypes):
    paths = model_factory(torch.bfloat16, dtypes=norm_dtypes)
    weights, densities = [0.5, 0.3, 0.2], [0.2, 0.5, 0.35]
    cfg = ties_config(paths, weights=weights, densities=densities, dtype=None, extra={"density_scope": "model"})
    del cfg["dtype"]
    path = write_yaml(str(tmp_path / "merge.yml"), cfg)
    distmerge.merge(path, str(tmp_path / "split"), memory_per_worker=40 * 1024, num_workers=2)
    distmerge.merge(path, str(tmp_path / "whole"), num_workers=1)
    plan = distmerge.plan(path, memory_per_worker=40 * 1024)
    assert len(plan.units) > 5 and list(plan.groups) == ["<model>"]

    expected, exact_k = reference_model_scope(paths, weights, densities)
    assert all(exact_k)
    for run in ("split", "whole"):
        ours = load_checkpoint(str(tmp_path / run))
        for name, tensor in expected.items():
            assert torch.equal(bits(ours[name]), bits(tensor)), f"{run}: {name}"


def test_model_scope_differs_from_tensor_scope(ray_local, model_factory, tmp_path):
    paths = model_factory(torch.bfloat16)
    outs = {}
    for scope in ("tensor", "model"):
        path = write_yaml(str(tmp_path / f"{scope}.yml"), ties_config(paths, extra={"density_scope": scope}))
        distmerge.merge(path, str(tmp_path / scope), num_workers=2)
        outs[scope] = load_checkpoint(str(tmp_path / scope))
    differing = sum((outs["tensor"][n] != outs["model"][n]).sum().item() for n in outs["tensor"])
    assert differing > 0


def test_model_scope_rejects_per_tensor_densities(model_factory, tmp_path):
    paths = model_factory(torch.bfloat16)
    cfg = ties_config(paths, extra={"density_scope": "model"})
    cfg["models"][0]["parameters"]["density"] = [{"filter": "mlp", "value": 0.3}, {"value": 0.5}]
    with pytest.raises(distmerge.ConfigError, match=r"models\[0\].parameters.density.*one density per model"):
        distmerge.plan(write_yaml(str(tmp_path / "m.yml"), cfg))


def test_plan_counts_reads_per_input(model_factory, tmp_path):
    """Per-tensor statistics read every input byte once whatever the budget (streamed
    units); a model-wide statistic reads each piece once per phase, then to apply, and
    the plan says so."""
    paths = model_factory(torch.bfloat16)
    sizes = None
    for scope, reads in (("tensor", 1), ("model", 2)):
        cfg = ties_config(paths, extra={"density_scope": scope})
        plan = distmerge.plan(write_yaml(str(tmp_path / f"{scope}.yml"), cfg), memory_per_worker=40 * 1024)
        sizes = [sum(info.nbytes for info in ckpt.tensors.values()) for ckpt in plan.checkpoints]
        assert plan.read_bytes_by_input() == [reads * size for size in sizes]
        text = format_plan(plan)
        if scope == "tensor":
            assert any(u.streamed for u in plan.units) and "streamed units: " in text
        else:
            assert not any(u.streamed for u in plan.units) and "a model-wide statistic" in text
