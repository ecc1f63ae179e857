"""Tokenizer, chat template and merge recipe in the output, as mergekit 0.1.5 writes them;
what distmerge does not do yet (union tokenizers, re-mapped vocabularies) is refused clearly."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import distmerge
from distmerge.errors import ConfigError, InputError
from helpers import write_yaml


@pytest.fixture
def tokenized(model_factory, tmp_path):
    """Copies of the test models, each with its own tokenizer files and chat template."""
    out = []
    templates = ["{{ 'A' }}{% for m in messages %}{{ m.content }}{% endfor %}",
                 "{{ 'B' }}{% for m in messages %}{{ m.content }}{% endfor %}",
                 "{{ 'B' }}{% for m in messages %}{{ m.content }}{% endfor %}",
                 None]
    for path, template in zip(model_factory(torch.bfloat16), templates):
        copy = tmp_path / "models" / os.path.basename(path)
        shutil.copytree(path, copy)
        name = os.path.basename(path)
        tokenizer_config = {"model_max_length": 2048, "from": name}
        if template:
            tokenizer_config["chat_template"] = template
        (copy / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        vocab = {f"t{i}": i for i in range(380)}  # with 4 added tokens: the test models' 384 rows
        added = [{"id": 380 + i, "content": f"<a{i}>"} for i in range(4)]
        (copy / "tokenizer.json").write_text(json.dumps({"name": name, "model": {"vocab": vocab},
                                                         "added_tokens": added}))
        (copy / "generation_config.json").write_text(json.dumps({"from": name}))
        out.append(str(copy))
    return out


def _ties(paths, **extra):
    cfg = {"merge_method": "ties", "base_model": paths[0], "dtype": "bfloat16",
           "models": [{"model": p, "parameters": {"weight": 0.5, "density": 0.5}} for p in paths[1:]]}
    cfg.update(extra)
    return cfg


def test_tokenizer_source_chat_template_auto_and_recipe(ray_local, tokenized, tmp_path):
    cfg = _ties(tokenized, tokenizer_source=tokenized[2], chat_template="auto")
    path = write_yaml(str(tmp_path / "m.yml"), cfg)
    distmerge.merge(path, str(tmp_path / "out"), num_workers=2)
    out = tmp_path / "out"
    assert json.loads((out / "tokenizer.json").read_text())["name"] == "ft2"
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["from"] == "ft2"
    # "auto": the most common template among the inputs (ft1 and ft2 share "B")
    assert tokenizer_config["chat_template"].startswith("{{ 'B' }}")
    assert (out / "chat_template.jinja").read_text() == tokenizer_config["chat_template"]
    # files other than the tokenizer's come from the base model
    assert json.loads((out / "generation_config.json").read_text()) == {"from": "base"}
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == cfg


def test_tokenizer_section_base_and_named_template(ray_local, tokenized, tmp_path):
    cfg = _ties(tokenized, tokenizer={"source": "base"}, chat_template="chatml")
    distmerge.merge(write_yaml(str(tmp_path / "m.yml"), cfg), str(tmp_path / "out"), num_workers=2)
    tokenizer_config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tokenizer_config["from"] == "base"
    import jinja2

    rendered = jinja2.Template(tokenizer_config["chat_template"]).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("extra, fragments", [
    ({"tokenizer_source": "union"}, ("tokenizer_source", "'union'", "not supported yet")),
    ({"tokenizer": {"source": "union"}}, ("tokenizer.source", "not supported yet")),
    ({"tokenizer": {}}, ("tokenizer.source", "'union'", "not supported yet")),
    ({"tokenizer": {"source": "base", "tokens": {"<x>": {"source": "base"}}}}, ("tokenizer.tokens", "not supported")),
    ({"tokenizer_source": "base", "tokenizer": {"source": "base"}}, ("tokenizer", "not both")),
    ({"tokenizer_source": "/elsewhere/model"}, ("tokenizer_source", "is not one of the merge's models")),
    ({"chat_template": "vicuna"}, ("chat_template", "'auto'", "chatml", "'vicuna'")),
])
def test_tokenizer_settings_refused_clearly(tokenized, tmp_path, extra, fragments):
    with pytest.raises(ConfigError) as info:
        distmerge.plan(write_yaml(str(tmp_path / "m.yml"), _ties(tokenized, **extra)))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_a_tokenizer_smaller_than_the_embeddings_is_refused(tokenized, tmp_path):
    """mergekit would shrink the embeddings to the tokenizer's tokens; distmerge says so instead."""
    data = json.loads(open(os.path.join(tokenized[1], "tokenizer.json")).read())
    data["added_tokens"] = data["added_tokens"][:2]
    with open(os.path.join(tokenized[1], "tokenizer.json"), "w") as f:
        json.dump(data, f)
    with pytest.raises(ConfigError) as info:
        distmerge.plan(write_yaml(str(tmp_path / "m.yml"), _ties(tokenized, tokenizer_source=tokenized[1])))
    message = str(info.value)
    assert "has 382 tokens but tensor 'lm_head.weight' has 384 rows" in message
    assert "Leave tokenizer_source out" in message


def test_different_vocabularies_get_mergekits_advice(tokenized, tmp_path):
    weights = os.path.join(tokenized[3], "model.safetensors")
    if not os.path.exists(weights):
        pytest.skip("the test model is sharded")
    tensors = load_file(weights)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.cat([tensors[name], tensors[name][:2]])
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(InputError) as info:
        distmerge.plan(write_yaml(str(tmp_path / "m.yml"), _ties(tokenized)))
    message = str(info.value)
    assert "'lm_head.weight'" in message and "vocabularies differ" in message and "tokenizer_source" in message
