"""`slices:` layer layouts: a passthrough "frankenmerge" stacking layers of two models, and a
sliced SLERP, against mergekit 0.1.5; the stacked config.json loads in transformers and runs."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import distmerge
from distmerge.errors import ConfigError, InputError
from helpers import assert_bit_identical, load_checkpoint, run_mergekit, write_yaml

BUDGET = 64 * 1024  # splits the matrices into row ranges


def _frankenmerge(paths):
    return {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
        {"sources": [{"model": paths[1], "layer_range": [0, 2]}]},
        {"sources": [{"model": paths[2], "layer_range": [1, 3]}]},
        {"sources": [{"model": paths[3], "layer_range": [2, 3], "parameters": {"scale": 0.5}}]},
    ]}


@pytest.fixture
def layered(model_factory, tmp_path):
    """Copies of the test models whose config.json has a per-layer list, different per model."""
    out = []
    for i, path in enumerate(model_factory(torch.bfloat16)):
        copy = tmp_path / "models" / os.path.basename(path)
        shutil.copytree(path, copy)
        config = json.loads((copy / "config.json").read_text())
        config["layer_notes"] = [f"model{i}-layer{j}" for j in range(config["num_hidden_layers"])]
        (copy / "config.json").write_text(json.dumps(config))
        out.append(str(copy))
    return out


def test_passthrough_frankenmerge_matches_mergekit_and_runs(ray_local, layered, tmp_path):
    cfg = _frankenmerge(layered)
    path = write_yaml(str(tmp_path / "franken.yml"), cfg)
    theirs = run_mergekit(path, str(tmp_path / "mergekit"))
    distmerge.merge(path, str(tmp_path / "ours"), num_workers=2, memory_per_worker=BUDGET)
    ours = load_checkpoint(str(tmp_path / "ours"))
    assert_bit_identical(ours, theirs)
    assert sorted(n for n in ours if ".layers." in n and n.endswith("q_proj.weight")) == [
        f"model.layers.{i}.self_attn.q_proj.weight" for i in range(5)]
    # layer 3 of the output is layer 2 of ft2; layer 4 is ft3's layer 2, scaled
    ft2, ft3 = load_checkpoint(layered[2]), load_checkpoint(layered[3])
    assert torch.equal(ours["model.layers.3.mlp.up_proj.weight"], ft2["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(ours["model.layers.4.mlp.up_proj.weight"], ft3["model.layers.2.mlp.up_proj.weight"] * 0.5)
    # embeddings from the first slice's model, final norm and lm_head from the last slice's
    assert torch.equal(ours["model.embed_tokens.weight"], load_checkpoint(layered[1])["model.embed_tokens.weight"])
    assert torch.equal(ours["lm_head.weight"], ft3["lm_head.weight"] * 0.5)

    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    assert config["layer_notes"] == ["model1-layer0", "model1-layer1", "model2-layer1", "model2-layer2",
                                     "model3-layer2"]
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.bfloat16)
    assert model.config.num_hidden_layers == 5
    logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape == (1, 4, config["vocab_size"]) and torch.isfinite(logits).all()


def test_sliced_slerp_with_a_gradient_per_slice_matches_mergekit(ray_local, model_factory, tmp_path):
    paths = model_factory(torch.bfloat16)
    cfg = {"merge_method": "slerp", "base_model": paths[0], "dtype": "bfloat16",
           "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.4}]},
           "slices": [
               {"sources": [{"model": paths[0], "layer_range": [0, 2]}, {"model": paths[1], "layer_range": [0, 2]}]},
               {"sources": [{"model": paths[0], "layer_range": [1, 3]}, {"model": paths[2], "layer_range": [1, 3]}],
                "parameters": {"t": 0.8}},
           ]}
    path = write_yaml(str(tmp_path / "slerp.yml"), cfg)
    theirs = run_mergekit(path, str(tmp_path / "mergekit"))
    distmerge.merge(path, str(tmp_path / "ours"), num_workers=2, memory_per_worker=BUDGET)
    ours = load_checkpoint(str(tmp_path / "ours"))
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        same = (ours[name].view(torch.int16) == theirs[name].view(torch.int16)).float().mean().item()
        assert same >= 0.99, (name, same)


@pytest.mark.parametrize("change, error, fragments", [
    ({"layer_range": [2, 1]}, ConfigError, ("slices[0].sources[0].layer_range", "0 <= FIRST < END")),
    ({"layer_range": [0, 9]}, InputError, ("has no layer 3", "layer_range [0, 9]")),
    ({"residual_weight": 0.5}, ConfigError, ("slices[0].residual_weight", "not supported yet")),
])
def test_bad_slices_are_refused_naming_the_key(model_factory, tmp_path, change, error, fragments):
    paths = model_factory(torch.bfloat16)
    cfg = _frankenmerge(paths)
    if "residual_weight" in change:
        cfg["slices"][0]["residual_weight"] = change["residual_weight"]
    else:
        cfg["slices"][0]["sources"][0]["layer_range"] = change["layer_range"]
    with pytest.raises(error) as info:
        distmerge.plan(write_yaml(str(tmp_path / "bad.yml"), cfg))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_slice_rules(model_factory, tmp_path):
    paths = model_factory(torch.bfloat16)
    uneven = {"merge_method": "slerp", "base_model": paths[0], "parameters": {"t": 0.5}, "slices": [
        {"sources": [{"model": paths[0], "layer_range": [0, 2]}, {"model": paths[1], "layer_range": [0, 3]}]}]}
    with pytest.raises(ConfigError, match=r"slices\[0\].sources: every source of a slice needs the same number"):
        distmerge.plan(write_yaml(str(tmp_path / "a.yml"), uneven))
    no_base = {"merge_method": "slerp", "base_model": paths[0], "parameters": {"t": 0.5}, "slices": [
        {"sources": [{"model": paths[1], "layer_range": [0, 3]}, {"model": paths[2], "layer_range": [0, 3]}]}]}
    with pytest.raises(ConfigError, match="not among this slice's sources; add it with its layer_range"):
        distmerge.plan(write_yaml(str(tmp_path / "b.yml"), no_base))
    twice = _frankenmerge(paths)
    twice["slices"][0]["sources"].append({"model": paths[1], "layer_range": [1, 3]})
    with pytest.raises(ConfigError, match=r"slices\[0\].sources\[1\].model: .* is a source of this slice twice"):
        distmerge.plan(write_yaml(str(tmp_path / "d.yml"), twice))
    two = _frankenmerge(paths)
    two["slices"][0]["sources"].append({"model": paths[2], "layer_range": [0, 2]})
    with pytest.raises(ConfigError, match=r"slices\[0\]: merge_method passthrough needs exactly 1 model"):
        distmerge.plan(write_yaml(str(tmp_path / "c.yml"), two))
