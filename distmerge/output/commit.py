"""Commit a finished checkpoint: config.json, tokenizer files, chat template and model card,
then the index, last. A destination without the index is visibly incomplete.

The companion files are read from their donors and written concurrently (each is a
round trip or two on object storage); which donor files exist comes from one listing
of each donor directory.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Optional

import yaml

from distmerge.io.checkpoint import ModelFiles
from distmerge.io.dtypes import TORCH_DTYPE_NAMES
from distmerge.io.layout import INDEX_NAME
from distmerge.output import resume
from distmerge.output.destination import COMPANION_FILES, TOKENIZER_FILES, Destination
from distmerge.planner import MergePlan

COMMIT_THREADS = 8  # companion files written at once
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _output_dtype_name(plan: MergePlan) -> Optional[str]:
    dtypes = {p.out_dtype for u in plan.units for p in u.pieces}
    return TORCH_DTYPE_NAMES[dtypes.pop()] if len(dtypes) == 1 else None


def card_config_text(plan: MergePlan) -> str:
    """The config as written, unless its storage section holds secrets: then redacted."""
    cfg = plan.config
    if cfg.storage.redacted() == dict(cfg.storage.options):
        return cfg.text.rstrip()
    raw = yaml.safe_load(cfg.text)
    raw["storage"] = cfg.storage.redacted()
    return yaml.safe_dump(raw, sort_keys=False).rstrip()


def model_card(plan: MergePlan) -> str:
    cfg = plan.config
    lines = ["---", "library_name: transformers", "tags:", "- merge", "- distmerge"]
    lines.append("base_model:")
    lines.extend(f"- {m.ref}" for m in cfg.inputs)
    lines += ["---", "", "# Merged model", "",
              f"This model was merged with [distmerge](https://pypi.org/project/distmerge/) "
              f"using the **{cfg.method.name}** method ({cfg.method.description}).", ""]
    if cfg.base is not None:
        lines += [f"Base model: `{cfg.base.ref}`", ""]
    lines += ["Models merged:", ""] + [f"- `{m.ref}`" for m in cfg.models]
    if cfg.method.uses_random:
        lines += ["", f"Random seed: `{plan.seed}` (the same config with `--random-seed {plan.seed}` "
                      "reproduces this merge bit for bit)"]
    lines += ["", "## Configuration", "", "The merge configuration:", "", "```yaml", card_config_text(plan),
              "```", ""]
    return "\n".join(lines)


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")


def stacked_config(plan: MergePlan, model_config: dict) -> dict:
    """config.json of a `slices:` merge: the layer count (under the key the model uses) is the
    number of output layers, and every per-layer list (a key naming layers, e.g. `layer_types`,
    whose length is the layer count) is rebuilt from each output layer's source model."""
    count_key = next((k for k in LAYER_COUNT_KEYS if isinstance(model_config.get(k), int)), "num_hidden_layers")
    layers = model_config.get(count_key)
    configs: dict = {}

    def source_config(index: int) -> dict:
        if index not in configs:
            files = ModelFiles(plan.checkpoints[index].path, plan.config.storage)
            configs[index] = json.loads(files.read(files.url("config.json"))) if files.has("config.json") else {}
        return configs[index]

    out = dict(model_config, **{count_key: len(plan.layer_sources)})
    for key, value in model_config.items():
        if "layer" in key and isinstance(value, list) and layers and len(value) == layers:
            rebuilt = []
            for index, layer in plan.layer_sources:
                values = source_config(index).get(key)
                rebuilt.append(values[layer] if isinstance(values, list) and layer < len(values) else value[0])
            out[key] = rebuilt
    return out


def _metadata_donor(plan: MergePlan) -> ModelFiles:
    """Where config.json and the other files come from, as in mergekit: base_model when the
    config names one (even for a method that does not merge it), else the first model."""
    cfg = plan.config
    path = cfg.base_model.path if cfg.base_model is not None else plan.checkpoints[0].path
    return ModelFiles(path, cfg.storage)


def _tokenizer_donor(plan: MergePlan) -> ModelFiles:
    """The model whose tokenizer files the output gets: tokenizer_source, else the metadata donor."""
    cfg = plan.config
    wanted = cfg.tokenizer_source
    if wanted is None or (cfg.base_model is not None and wanted == cfg.base_model.ref):
        return _metadata_donor(plan)
    return ModelFiles(next(c.path for c in plan.checkpoints if c.ref == wanted), cfg.storage)


def _chat_template_text(plan: MergePlan) -> Optional[str]:
    """The chat template to set: "auto" picks the input models' most common one (None if none has one)."""
    choice = plan.config.chat_template
    if choice == "chatml":
        return CHATML
    if choice != "auto":
        return choice
    found = []
    for ckpt in plan.checkpoints:
        files = ModelFiles(ckpt.path, plan.config.storage)
        template = None
        if files.has("chat_template.jinja"):
            template = files.read(files.url("chat_template.jinja")).decode()
        elif files.has("tokenizer_config.json"):
            template = json.loads(files.read(files.url("tokenizer_config.json"))).get("chat_template")
        if isinstance(template, str) and template.strip():
            found.append(template.strip())
    return Counter(found).most_common(1)[0][0] if found else None


def _chat_template_files(plan: MergePlan, donor: ModelFiles) -> Dict[str, Callable[[], bytes]]:
    """The chat template to set: chat_template.jinja, and the field in tokenizer_config.json."""
    template = _chat_template_text(plan)
    if template is None:
        return {}

    def tokenizer_config() -> bytes:
        name = "tokenizer_config.json"
        config = json.loads(donor.read(donor.url(name))) if donor.has(name) else {}
        config["chat_template"] = template
        return (json.dumps(config, indent=2) + "\n").encode()

    return {"chat_template.jinja": template.encode, "tokenizer_config.json": tokenizer_config}


def companion_files(plan: MergePlan) -> Dict[str, Callable[[], bytes]]:
    """Every file the checkpoint gets besides its shards and index: name -> its final bytes
    (read from a donor when called)."""
    source = _metadata_donor(plan)
    files: Dict[str, Callable[[], bytes]] = {}
    if source.has("config.json"):
        def model_config() -> bytes:
            config = json.loads(source.read(source.url("config.json")))
            if plan.layer_sources:
                config = stacked_config(plan, config)
            dtype_name = _output_dtype_name(plan)
            if dtype_name:
                config["torch_dtype"] = dtype_name
                if "dtype" in config:
                    config["dtype"] = dtype_name
            return (json.dumps(config, indent=2) + "\n").encode()

        files["config.json"] = model_config
    tokenizer_donor = _tokenizer_donor(plan)
    for name in COMPANION_FILES:
        donor = tokenizer_donor if name in TOKENIZER_FILES else source
        if donor.has(name) and name != "mergekit_config.yml":
            files[name] = lambda donor=donor, name=name: donor.read(donor.url(name))
    if plan.config.chat_template:
        files.update(_chat_template_files(plan, tokenizer_donor))
    files["mergekit_config.yml"] = lambda: (card_config_text(plan) + "\n").encode()
    files["README.md"] = lambda: model_card(plan).encode()
    return files


def commit_checkpoint(plan: MergePlan, dest: Destination, checksums: Optional[dict] = None,
                      checksum_algorithm: str = "") -> None:
    """Write config.json, tokenizer files and the model card, then the index (last).

    The shards' checksums go into the index metadata, for `distmerge verify`.
    """
    files = companion_files(plan)
    with ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="commit") as pool:
        for _ in pool.map(lambda item: dest.write(item[0], item[1]()), files.items()):
            pass
    extra = {"distmerge_checksums": checksums, "distmerge_checksum_algorithm": checksum_algorithm} if checksums else {}
    extra[resume.INDEX_FINGERPRINTS] = resume.request_fingerprints(plan)
    dest.write(INDEX_NAME, plan.layout.index_json(extra).encode())
