"""Bad input: each gives a clear error naming the file, tensor or key, before any data is read,
and leaves nothing at the destination that looks like a finished checkpoint."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import distmerge
from distmerge.cli import main
from distmerge.config import load_config
from distmerge.errors import ConfigError, InputError, OutputError
from helpers import shard_bytes, write_yaml


def ties(paths, **extra):
    cfg = {
        "merge_method": "ties",
        "base_model": paths[0],
        "models": [{"model": p, "parameters": {"weight": 0.5, "density": 0.5}} for p in paths[1:]],
        "dtype": "bfloat16",
    }
    cfg.update(extra)
    return cfg


@pytest.fixture
def paths(model_factory):
    return model_factory(torch.bfloat16)


def _expect(tmp_path, cfg, error, *fragments):
    path = write_yaml(str(tmp_path / "merge.yml"), cfg)
    out = tmp_path / "out"
    with pytest.raises(error) as info:
        distmerge.merge(path, str(out), num_workers=1)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("*.safetensors")) if out.exists() else True
    return str(info.value)


def test_unknown_top_level_key(tmp_path, paths):
    _expect(tmp_path, ties(paths, dtpye="bfloat16"), ConfigError, "dtpye", "unknown key", "dtype")


def test_typo_in_model_parameter(tmp_path, paths):
    cfg = ties(paths)
    cfg["models"][1]["parameters"] = {"weight": 0.5, "densty": 0.5}
    _expect(tmp_path, cfg, ConfigError, "models[1].parameters.densty", "did you mean 'density'")


def test_unknown_global_parameter(tmp_path, paths):
    _expect(tmp_path, ties(paths, parameters={"normalise": True}), ConfigError, "parameters.normalise", "normalize")


def test_unknown_merge_method_lists_valid_ones(tmp_path, paths):
    msg = _expect(tmp_path, ties(paths, merge_method="tie"), ConfigError, "merge_method", "'tie'")
    for name in ("linear", "task_arithmetic", "ties"):
        assert name in msg


def test_missing_weight(tmp_path, paths):
    cfg = ties(paths)
    del cfg["models"][2]["parameters"]["weight"]
    _expect(tmp_path, cfg, ConfigError, "models[2].parameters.weight", "required")


def test_negative_density(tmp_path, paths):
    cfg = ties(paths)
    cfg["models"][0]["parameters"]["density"] = -0.1
    _expect(tmp_path, cfg, ConfigError, "models[0].parameters.density", "must be >= 0", "0 keeps nothing")


@pytest.mark.parametrize("density", [0, 1e-5, 1.5])
def test_density_edges_plan_like_mergekit(paths, tmp_path, density):
    """mergekit 0.1.5: density <= 0 keeps nothing, a tiny one keeps max(1, int(d * numel)), >= 1 keeps all."""
    cfg = ties(paths)
    cfg["models"][0]["parameters"]["density"] = density
    plan = distmerge.plan(write_yaml(str(tmp_path / "merge.yml"), cfg))
    assert plan.tensor_count == 30


def test_della_epsilon_outside_the_density_is_refused_naming_the_tensor(tmp_path, paths):
    cfg = ties(paths, merge_method="della")
    cfg["models"][1]["parameters"] = {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.1}, {"value": 0.5}],
                                      "epsilon": 0.2}
    _expect(tmp_path, cfg, ConfigError, "della", "model.layers.0.mlp.down_proj.weight", f"model {paths[2]!r}",
            "density 0.1 +/- epsilon 0.2 must lie inside (0, 1)", "lower epsilon below 0.1")


@pytest.mark.parametrize("method, change, fragments", [
    ("ties", {"base_model": None}, ("base_model", "is required by merge_method ties")),
    ("sce", {"base_model": None}, ("base_model", "is required by merge_method sce")),
    ("dare_linear", {"models": "base-only"}, ("models", "needs at least 1 model(s) besides the base model, got 0")),
    ("slerp", {}, ("models", "slerp needs exactly 1 model(s) besides the base model, got 3")),
    ("model_stock", {"models": "one"},
     ("models", "model_stock needs at least 2 model(s) besides the base model, got 1")),
    ("nuslerp", {"base_model": None}, ("models", "nuslerp needs exactly 2 model(s), got 3")),
    ("passthrough", {}, ("models", "passthrough needs exactly 1 model(s), got 3")),
])
def test_input_rules_are_checked_at_planning(tmp_path, paths, method, change, fragments):
    cfg = ties(paths, merge_method=method)
    if change.get("base_model", 1) is None:
        del cfg["base_model"]
    if change.get("models") == "base-only":
        cfg["models"] = [{"model": paths[0]}]
    if change.get("models") == "one":
        cfg["models"] = cfg["models"][:1]
    if method in ("sce", "slerp", "model_stock", "passthrough"):
        cfg["models"] = [{"model": m["model"]} for m in cfg["models"]]
    if method == "nuslerp":
        cfg["models"] = [{"model": m["model"], "parameters": {"weight": 0.5}} for m in cfg["models"]]
    _expect(tmp_path, cfg, ConfigError, *fragments)


def test_per_model_parameters_of_a_method_without_any(tmp_path, paths):
    cfg = ties(paths, merge_method="ram")
    _expect(tmp_path, cfg, ConfigError, "models[0].parameters.weight", "ram takes no per-model parameters",
            "epsilon")


def test_yaml_scientific_notation_is_a_number_as_in_mergekit(paths):
    """PyYAML reads 1e-5 as a string; mergekit takes it as a number, and so do we."""
    cfg = load_config(write_yaml(os.path.join(os.path.dirname(paths[0]), "sci.yml"), {
        "merge_method": "ram", "base_model": paths[0], "models": [{"model": p} for p in paths[1:]],
        "parameters": {"epsilon": "1e-5"}}))
    assert cfg.parameters["epsilon"] == 1e-5
    with pytest.raises(ConfigError, match="parameters.epsilon: must be a number, got 'tiny'"):
        load_config(write_yaml(os.path.join(os.path.dirname(paths[0]), "sci.yml"), {
            "merge_method": "ram", "base_model": paths[0], "models": [{"model": p} for p in paths[1:]],
            "parameters": {"epsilon": "tiny"}}))


def test_bad_random_seed(tmp_path, paths):
    _expect(tmp_path, ties(paths, random_seed=-3), ConfigError, "random_seed", "whole number")
    _expect(tmp_path, ties(paths, random_seed="abc"), ConfigError, "random_seed", "'abc'")


def test_global_parameter_under_a_model(tmp_path, paths):
    cfg = ties(paths)
    cfg["models"][0]["parameters"]["normalize"] = False
    _expect(tmp_path, cfg, ConfigError, "models[0].parameters.normalize", "global parameter")


def test_bad_values(tmp_path, paths):
    _expect(tmp_path, ties(paths, dtype="bf17"), ConfigError, "dtype", "bf17")
    _expect(tmp_path, ties(paths, parameters={"sign_election": "majority"}), ConfigError,
            "parameters.sign_election", "weighted, unweighted")
    _expect(tmp_path, ties(paths, parameters={"normalize": "yes"}), ConfigError, "parameters.normalize",
            "true or false")
    _expect(tmp_path, ties(paths, slices=[]), ConfigError, "slices", "either 'models' or 'slices'")
    _expect(tmp_path, ties(paths, modules={}), ConfigError, "modules", "not supported")


def test_missing_model_directory(tmp_path, paths):
    cfg = ties(paths)
    cfg["models"][1]["model"] = str(tmp_path / "nope")
    _expect(tmp_path, cfg, InputError, str(tmp_path / "nope"), "does not exist")


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite(model_dir, change):
    path = os.path.join(model_dir, "model.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(tmp_path, paths):
    broken = _copy_model(paths[2], tmp_path / "broken")
    _rewrite(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    cfg = ties(paths)
    cfg["models"][1]["model"] = broken
    _expect(tmp_path, cfg, InputError, "model.layers.1.mlp.up_proj.weight", broken)


@pytest.mark.parametrize("replacement, fragments", [
    (torch.ones(65, dtype=torch.bfloat16), ("model.norm.weight", "[65]", "[64]")),
    (torch.ones(64, dtype=torch.int64), ("model.norm.weight", "I64", "floating-point")),
], ids=["shape-mismatch", "non-float"])
def test_bad_tensor_in_one_input(tmp_path, paths, replacement, fragments):
    broken = _copy_model(paths[1], tmp_path / "broken")
    _rewrite(broken, lambda t: t.update({"model.norm.weight": replacement}))
    cfg = ties(paths)
    cfg["models"][0]["model"] = broken
    _expect(tmp_path, cfg, InputError, *fragments)


def test_pickle_checkpoint_is_refused(tmp_path, paths):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    cfg = ties(paths)
    cfg["models"][0]["model"] = str(pickled)
    _expect(tmp_path, cfg, InputError, "pytorch_model.bin", "never unpickles")


def test_index_pointing_outside_the_model(tmp_path, paths):
    model = tmp_path / "escaping"
    model.mkdir()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../other.safetensors"}}))
    cfg = ties(paths)
    cfg["models"][0]["model"] = str(model)
    _expect(tmp_path, cfg, InputError, "../other.safetensors", "outside the model directory")


def test_existing_checkpoint_needs_overwrite(ray_local, tmp_path, paths):
    path = write_yaml(str(tmp_path / "merge.yml"), ties(paths))
    out = tmp_path / "out"
    distmerge.merge(path, str(out), num_workers=1)
    before = (out / "model.safetensors.index.json").read_bytes()
    with pytest.raises(OutputError, match="already holds a checkpoint.*--overwrite"):
        distmerge.merge(path, str(out), num_workers=1)
    assert (out / "model.safetensors.index.json").read_bytes() == before
    (out / "tokenizer.model").write_bytes(b"from another base model")
    (out / "notes.partial").write_bytes(b"not ours")
    distmerge.merge(path, str(out), num_workers=1, overwrite=True)
    assert (out / "model.safetensors.index.json").read_bytes() == before
    assert not (out / "tokenizer.model").exists()  # the old checkpoint's companions go with it
    assert (out / "notes.partial").exists()  # files that are not ours stay


def test_cli_reports_errors_without_traceback(tmp_path, paths, capsys):
    path = write_yaml(str(tmp_path / "merge.yml"), ties(paths, densty=0.5))
    assert main(["plan", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distmerge: error:") and "densty" in err and "Traceback" not in err


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yml"
    path.write_text("merge_method: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))


def test_gradient_and_filter_parameters_resolve_like_mergekit(paths):
    from distmerge.config import resolve_parameters

    cfg = load_config(write_yaml(os.path.join(os.path.dirname(paths[0]), "grad.yml"), {
        "merge_method": "ties", "base_model": paths[0],
        "models": [{"model": paths[1], "parameters": {
            "weight": [0.0, 1.0],
            "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}]}}],
    }))
    mlp = resolve_parameters(cfg, "model.layers.2.mlp.up_proj.weight", num_layers=3)
    attn = resolve_parameters(cfg, "model.layers.1.self_attn.q_proj.weight", num_layers=3)
    embed = resolve_parameters(cfg, "model.embed_tokens.weight", num_layers=3)
    assert mlp.per_model[0] == {"weight": 1.0, "density": 0.3}
    assert attn.per_model[0] == {"weight": 0.5, "density": 0.8}
    assert embed.per_model[0]["weight"] == 0.0


def test_global_parameters_take_gradients_filters_and_stepping_booleans(paths):
    """mergekit 0.1.5 resolves global parameters per tensor too; booleans and strings step."""
    from distmerge.config import resolve_parameters

    cfg = load_config(write_yaml(os.path.join(os.path.dirname(paths[0]), "global.yml"), {
        "merge_method": "ties", "base_model": paths[0],
        "parameters": {"lambda": [1.0, 2.0], "normalize": [True, False],
                       "int8_mask": [{"filter": "self_attn", "value": True}, {"value": False}],
                       "weight": 0.25, "density": [0.2, 0.6]},
        "models": [{"model": paths[1], "parameters": {"weight": [{"filter": "mlp", "value": 0.9}]}},
                   {"model": paths[2]}],
    }))
    first = resolve_parameters(cfg, "model.layers.0.self_attn.q_proj.weight", num_layers=3)
    middle = resolve_parameters(cfg, "model.layers.1.mlp.up_proj.weight", num_layers=3)
    last = resolve_parameters(cfg, "model.layers.2.mlp.up_proj.weight", num_layers=3)
    assert (first.shared["lambda"], middle.shared["lambda"], last.shared["lambda"]) == (1.0, 1.5, 2.0)
    assert (first.shared["normalize"], middle.shared["normalize"], last.shared["normalize"]) == (True, True, False)
    assert (first.shared["int8_mask"], middle.shared["int8_mask"]) == (True, False)
    # the model's own setting wins where its filter matches; the global one applies elsewhere
    assert [p["weight"] for p in first.per_model] == [0.25, 0.25]
    assert [p["weight"] for p in middle.per_model] == [0.9, 0.25]
    assert [p["density"] for p in middle.per_model] == [0.4, 0.4]


EXAMPLES = sorted(os.listdir(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")))


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_configs_plan(model_factory, tmp_path, name):
    """configs/ examples are valid, and plan once models sit where they point."""
    paths = model_factory(torch.bfloat16)
    os.symlink(os.path.dirname(paths[0]), tmp_path / "models")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copy(os.path.join(repo, "configs", name), tmp_path / name)
    plan = distmerge.plan(str(tmp_path / name))
    layers = 4 if name == "passthrough_frankenmerge.yml" else 3  # the frankenmerge stacks 2 + 2 layers
    assert plan.tensor_count == 9 * layers + 3


def test_nonfinite_input_is_named_unless_allowed(ray_local, tmp_path, paths):
    broken = _copy_model(paths[2], tmp_path / "nan-model")

    def poison(t):
        weight = t["model.layers.1.mlp.down_proj.weight"].clone()
        weight[3, 5] = float("nan")
        t["model.layers.1.mlp.down_proj.weight"] = weight

    _rewrite(broken, poison)
    cfg = ties(paths)
    cfg["models"][1]["model"] = broken
    path = write_yaml(str(tmp_path / "merge.yml"), cfg)
    with pytest.raises(distmerge.MergeFailed, match="model.layers.1.mlp.down_proj.weight.*NaN or Inf") as info:
        distmerge.merge(path, str(tmp_path / "out"), num_workers=1)
    assert "nan-model" in str(info.value) and "--allow-nonfinite" in str(info.value)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert not list((tmp_path / "out").glob("*.safetensors*"))
    # --check-inputs: found by a read of every input before the destination is touched,
    # so a checkpoint already there (to be overwritten) is still whole
    distmerge.merge(path, str(tmp_path / "out"), num_workers=1, allow_nonfinite=True)
    before = shard_bytes(str(tmp_path / "out"))
    with pytest.raises(distmerge.MergeFailed, match="model.layers.1.mlp.down_proj.weight.*NaN or Inf"):
        distmerge.merge(path, str(tmp_path / "out"), num_workers=1, overwrite=True, check_inputs=True)
    assert shard_bytes(str(tmp_path / "out")) == before
    distmerge.merge(path, str(tmp_path / "allowed"), num_workers=1, allow_nonfinite=True, check_inputs=True)
    assert shard_bytes(str(tmp_path / "allowed")) == before
    clean = write_yaml(str(tmp_path / "clean.yml"), ties(paths))  # clean inputs pass the scan, same bytes
    distmerge.merge(clean, str(tmp_path / "scanned"), num_workers=1, check_inputs=True)
    distmerge.merge(clean, str(tmp_path / "unscanned"), num_workers=1)
    assert shard_bytes(str(tmp_path / "scanned")) == shard_bytes(str(tmp_path / "unscanned"))
