"""The destination directory: refuse to clobber a checkpoint, and commit the finished one.

A finished checkpoint is recognised by its index. It is written last, after the
shards have their final names and the companion files (config, tokenizer, model card)
are in place; a directory without it is visibly incomplete.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Optional

from distmerge.errors import OutputError
from distmerge.io.dtypes import TORCH_DTYPE_NAMES
from distmerge.io.layout import INDEX_NAME
from distmerge.planner import MergePlan

COMPANION_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json",
)


def existing_checkpoint(out_dir: str) -> list:
    """Files in `out_dir` that make it look like a checkpoint (index first)."""
    index = os.path.join(out_dir, INDEX_NAME)
    return ([index] if os.path.exists(index) else []) + sorted(glob.glob(os.path.join(out_dir, "*.safetensors")))


def prepare_destination(out_dir: str, overwrite: bool) -> None:
    """Create `out_dir`, or refuse if it already holds a checkpoint (unless overwrite)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputError(f"output {out_dir} exists and is not a directory")
    existing = existing_checkpoint(out_dir)
    if existing and not overwrite:
        raise OutputError(f"output {out_dir} already holds a checkpoint ({os.path.basename(existing[0])}); "
                          "pass --overwrite (overwrite=True) to replace it")
    os.makedirs(out_dir, exist_ok=True)
    # Drop the index first, so a half-removed checkpoint never looks finished.
    for path in existing + sorted(glob.glob(os.path.join(out_dir, "*.safetensors.partial"))):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _output_dtype_name(plan: MergePlan) -> Optional[str]:
    dtypes = {p.out_dtype for u in plan.units for p in u.pieces}
    return TORCH_DTYPE_NAMES[dtypes.pop()] if len(dtypes) == 1 else None


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
    lines += ["", "## Configuration", "", "The merge configuration:", "", "```yaml", cfg.text.rstrip(), "```", ""]
    return "\n".join(lines)


def commit_checkpoint(plan: MergePlan, out_dir: str) -> None:
    """Write config.json, tokenizer files and the model card, then the index (last)."""
    source = plan.checkpoints[0].path
    config_path = os.path.join(source, "config.json")
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            model_config = json.load(f)
        dtype_name = _output_dtype_name(plan)
        if dtype_name:
            model_config["torch_dtype"] = dtype_name
            if "dtype" in model_config:
                model_config["dtype"] = dtype_name
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(model_config, f, indent=2)
            f.write("\n")
    for name in COMPANION_FILES:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(plan))
    tmp = os.path.join(out_dir, INDEX_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(plan.layout.index_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out_dir, INDEX_NAME))
