"""The destination (a local directory or an fsspec prefix such as s3://bucket/out):
refuse to clobber a checkpoint, and commit the finished one.

A finished checkpoint is recognised by its index. It is written last, after the shards
are complete under their final names and the companion files (config, tokenizer,
model card) are in place; a destination without it is visibly incomplete.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional, Set, Tuple

import yaml

from distmerge.errors import OutputError
from distmerge.io import progress
from distmerge.io.checkpoint import ModelFiles
from distmerge.io.dtypes import TORCH_DTYPE_NAMES
from distmerge.io.layout import INDEX_NAME, PARTIAL_SUFFIX, SHARD_FILE
from distmerge.io.storage import Storage, is_remote, join, split_url
from distmerge.planner import MergePlan

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
COMPANION_FILES = TOKENIZER_FILES + ("generation_config.json", "preprocessor_config.json", "mergekit_config.yml")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


SHARD_NAME = re.compile(SHARD_FILE.pattern + "(" + re.escape(PARTIAL_SUFFIX) + ")?")


@dataclass
class ResumePoint:
    """What an interrupted merge left that a new writer can carry on from."""

    finished: Set[int] = field(default_factory=set)  # units whose bytes are durable
    writer_state: Any = None  # the writer's `resume` argument (None: start fresh)


class Destination:
    """File operations on the output location, local or remote."""

    def __init__(self, url: str, storage: Storage) -> None:
        self.url = url.rstrip("/") if is_remote(url) else os.path.abspath(url)
        self.remote = is_remote(url)
        self.s3 = self.remote and split_url(self.url)[0] == "s3"
        self.storage = storage
        self.fs = storage.filesystem(self.url) if self.remote else None

    def path(self, name: str) -> str:
        return join(self.url, name)

    def names(self) -> List[str]:
        if not self.remote:
            return sorted(os.listdir(self.url)) if os.path.isdir(self.url) else []
        try:
            return sorted(posixpath.basename(p) for p in self.fs.ls(self.url, detail=False, refresh=True))
        except FileNotFoundError:
            return []

    def existing_checkpoint(self, names: Optional[List[str]] = None) -> List[str]:
        """Names that make the destination look like a checkpoint (index first), among
        `names` (default: listed now)."""
        names = self.names() if names is None else names
        return ([INDEX_NAME] if INDEX_NAME in names else []) + [n for n in names if n.endswith(".safetensors")]

    def remove(self, name: str) -> None:
        try:
            if self.remote:
                self.fs.rm_file(self.path(name))
            else:
                os.remove(self.path(name))
        except FileNotFoundError:
            pass

    def read(self, name: str) -> Optional[bytes]:
        try:
            if self.remote:
                return self.fs.cat_file(self.path(name))
            with open(self.path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        if self.remote:
            self.fs.pipe_file(self.path(name), data)
            return
        tmp = self.path(name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(name))

    def recorded_options(self) -> dict:
        """The options of an interrupted merge here (empty if none), so a resume plans alike."""
        return progress.recorded_options(self) if INDEX_NAME not in self.names() else {}

    def check(self, overwrite: bool, plan: MergePlan, restart: bool = False, part_size: int = 0) -> bool:
        """Raise the refusals `prepare` would, changing nothing; return whether an
        interrupted merge is here (a manifest or partial shards, no index)."""
        if not self.remote and os.path.exists(self.url) and not os.path.isdir(self.url):
            raise OutputError(f"output {self.url} exists and is not a directory")
        if self.s3:
            from distmerge.io.multipart import check_part_size

            check_part_size(plan.layout, part_size)
        names = self.names()
        ours = [n for n in names if SHARD_NAME.fullmatch(n)]
        # Locally a manifest with no shard files next to it (killed while starting) leaves
        # nothing to resume: start afresh. On S3 the uploads are not in the listing.
        interrupted = INDEX_NAME not in names and (
            any(n.endswith(PARTIAL_SUFFIX) for n in ours)
            or (progress.MANIFEST in names and (self.remote or bool(ours))))
        if interrupted and not restart:
            changes = progress.changed_since(self, plan, part_size)
            if changes:
                raise self._not_resumable("; ".join(changes))
            if not self.remote and not self._shards_fit(plan, ours):
                raise self._not_resumable("its partial shards do not match the plan")
        existing = self.existing_checkpoint(names)
        if not interrupted and existing and not overwrite:
            raise OutputError(f"output {self.url} already holds a checkpoint ({existing[0]}); "
                              "pass --overwrite (overwrite=True) to replace it")
        return interrupted

    def _shards_fit(self, plan: MergePlan, ours: List[str]) -> bool:
        """Every shard of the plan is here once, partial or already renamed, at its size."""
        for shard in plan.layout.shards:
            here = [n for n in (shard.file_name, shard.file_name + PARTIAL_SUFFIX) if n in ours]
            if len(here) != 1 or os.path.getsize(self.path(here[0])) != shard.size:
                return False
        return len(ours) == len(plan.layout.shards)

    def _not_resumable(self, reason: str) -> OutputError:
        return OutputError(f"output {self.url} holds an interrupted merge that cannot be resumed: {reason}. "
                           "Pass --restart (restart=True) to discard it and start over")

    def prepare(self, overwrite: bool, plan: MergePlan, restart: bool = False, part_size: int = 0) -> ResumePoint:
        """Make the destination ready; return what an interrupted run of this plan left.

        A finished checkpoint (one with an index) is refused unless `overwrite`. An
        interrupted merge (a manifest or partial shards, no index) of the same plan is
        resumed; one of a different plan is refused, saying what changed, unless
        `restart` discards it.
        """
        interrupted = self.check(overwrite, plan, restart, part_size)
        if interrupted and not restart:
            point = self.resume_point(plan, part_size)
            if point is None:
                raise self._not_resumable("its partial shards do not match the plan")
            return point
        if interrupted:
            self.discard()  # the interrupted merge's shards (any shard count), not others' files
        else:
            existing = self.existing_checkpoint()
            # The index goes first, so a half-removed checkpoint never looks finished; then
            # the old checkpoint's companion files, which could belong to another base model.
            for name in existing + [n for n in (*COMPANION_FILES, "config.json", "README.md") if existing]:
                self.remove(name)
            self._drop_resume_state()
        if not self.remote:
            os.makedirs(self.url, exist_ok=True)
        progress.write_manifest(self, plan, part_size)
        return ResumePoint()

    def resume_point(self, plan: MergePlan, part_size: int = 0) -> Optional[ResumePoint]:
        """What is durable here of `plan`'s output; None if it does not fit the plan.

        Also how a dead writer's replacement learns where to carry on. No writer may be
        running: local shards that an interrupted commit already renamed go back to their
        partial names.
        """
        if self.s3:
            from distmerge.io.multipart import done_ranges, recover_uploads

            states = recover_uploads(self.fs, self.url, plan.layout, part_size)
            return ResumePoint(units_within(plan, done_ranges(states, plan.layout, part_size)), states)
        if self.remote:
            return None
        if not self._shards_fit(plan, [n for n in self.names() if SHARD_NAME.fullmatch(n)]):
            return None
        for shard in plan.layout.shards:
            if os.path.exists(self.path(shard.file_name)):
                os.replace(self.path(shard.file_name), self.path(shard.file_name + PARTIAL_SUFFIX))
        finished = progress.finished_units(self.url, len(plan.units))
        written = [0] * len(plan.layout.shards)
        for unit in plan.units:
            if unit.index in finished:
                for piece in unit.pieces:
                    written[piece.shard] += piece.out_nbytes
        return ResumePoint(finished, written)

    def _drop_resume_state(self) -> None:
        if self.s3:
            from distmerge.io.multipart import abort_shard_uploads, remove_resume_state

            abort_shard_uploads(self.fs, self.url)
            remove_resume_state(self.fs, self.url)
        elif not self.remote:
            progress.remove_local(self.url)

    def discard(self) -> None:
        """Delete what a failed merge left, its shards and the resume state, so the next run
        starts over. The writer must be stopped; a finished checkpoint is never touched."""
        names = self.names()
        if INDEX_NAME in names:
            return
        for name in names:
            if SHARD_NAME.fullmatch(name):
                self.remove(name)
        self._drop_resume_state()

    def finish(self) -> None:
        """Drop the resume state once the checkpoint is committed (and any stray upload of
        one of its shards, such as a duplicate from a retried create request)."""
        self._drop_resume_state()


def units_within(plan: MergePlan, ranges: List[List[Tuple[int, int]]]) -> Set[int]:
    """Units whose every output byte lies in the given (sorted) byte ranges of their shards."""
    merged: List[List[Tuple[int, int]]] = []
    for shard_ranges in ranges:
        spans: List[Tuple[int, int]] = []
        for start, end in shard_ranges:
            if spans and start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], end))
            else:
                spans.append((start, end))
        merged.append(spans)
    starts = [[a for a, _ in spans] for spans in merged]

    def covered(shard: int, start: int, end: int) -> bool:
        i = bisect.bisect_right(starts[shard], start) - 1
        return i >= 0 and merged[shard][i][1] >= end

    return {u.index for u in plan.units
            if all(covered(p.shard, p.out_offset, p.out_offset + p.out_nbytes) for p in u.pieces)}


def existing_checkpoint(out: str, storage: Storage) -> List[str]:
    return Destination(out, storage).existing_checkpoint()


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
            url = files.url("config.json")
            configs[index] = json.loads(files.read(url)) if files.exists(url) else {}
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
        jinja = files.url("chat_template.jinja")
        if files.exists(jinja):
            template = files.read(jinja).decode()
        else:
            config_url = files.url("tokenizer_config.json")
            if files.exists(config_url):
                template = json.loads(files.read(config_url)).get("chat_template")
        if isinstance(template, str) and template.strip():
            found.append(template.strip())
    return Counter(found).most_common(1)[0][0] if found else None


def _write_chat_template(plan: MergePlan, dest: Destination, donor: ModelFiles) -> None:
    """Set the chat template: chat_template.jinja, and the field in tokenizer_config.json."""
    template = _chat_template_text(plan)
    if template is None:
        return
    dest.write("chat_template.jinja", template.encode())
    config_url = donor.url("tokenizer_config.json")
    tokenizer_config = json.loads(donor.read(config_url)) if donor.exists(config_url) else {}
    tokenizer_config["chat_template"] = template
    dest.write("tokenizer_config.json", (json.dumps(tokenizer_config, indent=2) + "\n").encode())


def commit_checkpoint(plan: MergePlan, dest: Destination, checksums: Optional[dict] = None,
                      checksum_algorithm: str = "") -> None:
    """Write config.json, tokenizer files and the model card, then the index (last).

    The shards' checksums go into the index metadata, for `distmerge verify`.
    """
    source = _metadata_donor(plan)
    config_url = source.url("config.json")
    if source.exists(config_url):
        model_config = json.loads(source.read(config_url))
        if plan.layer_sources:
            model_config = stacked_config(plan, model_config)
        dtype_name = _output_dtype_name(plan)
        if dtype_name:
            model_config["torch_dtype"] = dtype_name
            if "dtype" in model_config:
                model_config["dtype"] = dtype_name
        dest.write("config.json", (json.dumps(model_config, indent=2) + "\n").encode())
    tokenizer_donor = _tokenizer_donor(plan)
    for name in COMPANION_FILES:
        donor = tokenizer_donor if name in TOKENIZER_FILES else source
        url = donor.url(name)
        if donor.exists(url) and name != "mergekit_config.yml":
            dest.write(name, donor.read(url))
    if plan.config.chat_template:
        _write_chat_template(plan, dest, tokenizer_donor)
    dest.write("mergekit_config.yml", (card_config_text(plan) + "\n").encode())
    dest.write("README.md", model_card(plan).encode())
    extra = {"distmerge_checksums": checksums, "distmerge_checksum_algorithm": checksum_algorithm} if checksums else {}
    dest.write(INDEX_NAME, plan.layout.index_json(extra).encode())
