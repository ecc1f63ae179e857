"""Read a mergekit-style YAML merge config into typed, validated objects.

Unlike mergekit, unknown keys are errors (with the key's path), and every value is
checked before any model is opened. Parameter values follow mergekit's forms, for
global and per-model parameters alike: a scalar; a list (a gradient over the layers:
numbers interpolate, booleans and strings step); or a list of `{filter, value}`
conditions, the first whose filter is a substring of the tensor name winning. A
model's own setting takes precedence over the global one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import yaml

from distmerge.errors import ConfigError
from distmerge.io.dtypes import CONFIG_DTYPES
from distmerge.io.storage import LOCAL, Storage, is_remote
from distmerge.methods import METHODS, get_method
from distmerge.methods.base import REQUIRED as REQUIRED_VALUE
from distmerge.methods.base import MergeMethod, ParameterSpec, ResolvedParams

TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "tokenizer", "chat_template", "storage", "random_seed"}
SLICE_KEYS = {"sources", "base_model", "parameters", "residual_weight"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
UNSUPPORTED_KEYS = {
    "modules": "modules are not supported yet; list whole models under 'models' (or use 'slices')",
}
TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
CHAT_TEMPLATE_NAMES = ("chatml",)  # besides "auto" and a template of your own
MODEL_KEYS = {"model", "parameters"}
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class ModelEntry:
    ref: str  # as written in the config
    path: str  # resolved location
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class SliceSource:
    """One source of an output slice: a model (with this source's parameters) and its layers."""

    model: ModelEntry
    layer_range: Tuple[int, int]

    @property
    def layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


@dataclass(frozen=True)
class OutputSlice:
    """mergekit's `slices[i]`: layers merged from its sources, stacked after the previous slices'."""

    base: Optional[SliceSource]  # the source that is the base model, when the method takes one
    models: Tuple[SliceSource, ...]  # the other sources, in config order
    parameters: Mapping[str, Any]  # the slice's own settings (over the top-level ones)

    @property
    def layers(self) -> int:
        return (self.base or self.models[0]).layers

    @property
    def sources(self) -> Tuple[SliceSource, ...]:
        return ((self.base,) if self.base else ()) + self.models


@dataclass(frozen=True)
class MergeConfig:
    method: MergeMethod
    base: Optional[ModelEntry]
    models: Tuple[ModelEntry, ...]  # the inputs other than the base, in config order (models: configs)
    parameters: Mapping[str, Any]
    dtype: Optional[torch.dtype]
    out_dtype: Optional[torch.dtype]
    text: str  # the YAML as given, for the model card
    source: str  # file name (or "<string>") for messages
    storage: Storage = LOCAL  # fsspec options for remote URLs (the config's `storage:` section)
    random_seed: Optional[int] = None  # seed of random methods (config `random_seed`, or --random-seed)
    slices: Tuple[OutputSlice, ...] = ()  # a `slices:` layout (empty for a `models:` config)
    tokenizer_source: Optional[str] = None  # the model whose tokenizer the output gets (None: the base's)
    # base_model, also when the method does not merge it: config.json and the tokenizer come from it
    base_model: Optional[ModelEntry] = None
    chat_template: Optional[str] = None  # "auto", a template name, or a Jinja template

    @property
    def inputs(self) -> Tuple[ModelEntry, ...]:
        """Every distinct input model: the base first (if any), then in order of appearance."""
        if not self.slices:
            return ((self.base,) if self.base else ()) + self.models
        seen: Dict[str, ModelEntry] = {}
        if self.base is not None:
            seen[self.base.ref] = self.base
        for output_slice in self.slices:
            for src in output_slice.sources:
                seen.setdefault(src.model.ref, ModelEntry(src.model.ref, src.model.path, {}))
        return tuple(seen.values())


def _fail(source: str, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {problem}")


def _check_keys(source: str, where: str, mapping: Any, allowed: set) -> None:
    if not isinstance(mapping, dict):
        raise _fail(source, where or "config", f"must be a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            if not where and key in UNSUPPORTED_KEYS:
                raise _fail(source, key, UNSUPPORTED_KEYS[key])
            close = [a for a in sorted(allowed) if _similar(str(key), a)]
            hint = f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(sorted(allowed))})"
            raise _fail(source, f"{prefix}{key}", f"unknown key{hint}")


def _similar(a: str, b: str) -> bool:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.75


def _parse_dtype(source: str, key: str, value: Any) -> Optional[torch.dtype]:
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in CONFIG_DTYPES:
        raise _fail(source, key, f"unknown dtype {value!r} (valid: bfloat16, float16, float32, float64)")
    return CONFIG_DTYPES[value.lower()]


def _resolve_path(ref: str, config_dir: str) -> str:
    if is_remote(ref):
        return ref.rstrip("/")
    path = os.path.expanduser(ref)
    if ref.startswith("file://"):
        path = ref[len("file://"):]
    if not os.path.isabs(path):
        path = os.path.join(config_dir, path)
    return os.path.normpath(path)


def _check_scalar(source: str, key: str, spec: ParameterSpec, value: Any) -> Any:
    if spec.type is bool:
        if not isinstance(value, bool):
            raise _fail(source, key, f"must be true or false, got {value!r}")
    elif spec.type is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string; mergekit takes it as a number
            try:
                value = float(value)
            except ValueError:
                raise _fail(source, key, f"must be a number, got {value!r}") from None
            if value != value:
                raise _fail(source, key, "must be a number, got NaN")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(source, key, f"must be a number, got {value!r}")
        value = float(value)
    elif spec.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(source, key, f"must be a whole number, got {value!r}")
    elif spec.type is str:
        if not isinstance(value, str):
            raise _fail(source, key, f"must be a string, got {value!r}")
    if spec.choices and value not in spec.choices:
        raise _fail(source, key, f"must be one of {', '.join(map(str, spec.choices))}, got {value!r}")
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise _fail(source, key, f"{problem}, got {value!r}")
    return value


def _check_setting(source: str, key: str, spec: ParameterSpec, value: Any) -> Any:
    """Validate a parameter setting in any of mergekit's forms; return it with its values
    normalized (numbers as floats, numeric strings such as '1e-5' as numbers)."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if not value:
            raise _fail(source, key, "must not be an empty list")
        if all(isinstance(v, dict) for v in value):
            conditions = []
            for i, cond in enumerate(value):
                _check_keys(source, f"{key}[{i}]", cond, {"filter", "value"})
                if "value" not in cond:
                    raise _fail(source, f"{key}[{i}]", "a condition needs a 'value'")
                if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                    raise _fail(source, f"{key}[{i}].filter", "must be a string")
                conditions.append({**cond, "value": _check_setting(source, f"{key}[{i}].value", spec,
                                                                    cond["value"])})
            return conditions
        if any(isinstance(v, (dict, list)) for v in value):
            raise _fail(source, key, "a list must hold either values (a gradient) or {filter, value} conditions")
        return [_check_scalar(source, f"{key}[{i}]", spec, v) for i, v in enumerate(value)]
    return _check_scalar(source, key, spec, value)


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """mergekit's rule: conditions by substring filter; lists of numbers interpolate over
    t, lists of booleans or strings step (the value at int(t * (len - 1)))."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if all(isinstance(e, dict) for e in setting):
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return evaluate_setting(cond["value"], tensor_name, t)
        return None
    if len(setting) == 1:
        return setting[0]
    if any(isinstance(v, (bool, str)) for v in setting):
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


def layer_position(tensor_name: str, num_layers: int) -> float:
    """mergekit's t for gradients: layer / (layers - 1) inside the layer stack, else 0."""
    match = LAYER_INDEX.search(tensor_name)
    if not match or num_layers <= 1:
        return 0.0 if not match else 1.0
    return int(match.group(1)) / (num_layers - 1)


def load_config(path_or_text: str, *, is_text: bool = False, source: Optional[str] = None,
                base_dir: Optional[str] = None) -> MergeConfig:
    """Parse and validate a merge config from a YAML file (or text with is_text=True: then
    errors name `source`, and relative model paths are under `base_dir`, default the
    working directory)."""
    if is_text:
        source, text, config_dir = source or "<config>", path_or_text, base_dir or os.getcwd()
    else:
        source = str(path_or_text)
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except OSError as err:
            raise ConfigError(f"{source}: cannot read config ({err.strerror})") from err
        config_dir = os.path.dirname(os.path.abspath(source))
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({err})") from err
    _check_keys(source, "", raw, TOP_LEVEL_KEYS)

    name = raw.get("merge_method")
    if name is None:
        raise _fail(source, "merge_method", f"is required (one of: {', '.join(sorted(METHODS))})")
    if name not in METHODS:
        raise _fail(source, "merge_method", f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    method = get_method(name)
    specs = {p.name: p for p in method.parameters}

    global_params = raw.get("parameters") or {}
    _check_keys(source, "parameters", global_params, set(specs))
    global_params = {key: _check_setting(source, f"parameters.{key}", specs[key], value)
                     for key, value in global_params.items()}

    models_raw = raw.get("models")
    base_ref = raw.get("base_model")
    if base_ref is not None and not isinstance(base_ref, str):
        raise _fail(source, "base_model", f"must be a path, got {base_ref!r}")
    if raw.get("slices") is not None:
        if models_raw is not None:
            raise _fail(source, "slices", "a config lists either 'models' or 'slices', not both")
        slices = _load_slices(source, raw["slices"], method, specs, global_params, base_ref, config_dir)
        return _merge_config(raw, source, text, method, global_params, base_ref, config_dir, (), slices)
    if not isinstance(models_raw, list) or not models_raw:
        raise _fail(source, "models", "is required: a list of {model: PATH, parameters: {...}} "
                                      "(or 'slices', for a layer layout)")

    models: List[ModelEntry] = []
    seen = set()
    for i, entry in enumerate(models_raw):
        key = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        _check_keys(source, key, entry, MODEL_KEYS)
        ref = entry.get("model")
        if not isinstance(ref, str) or not ref:
            raise _fail(source, f"{key}.model", "is required: the model's directory")
        params = entry.get("parameters") or {}
        unknown = [k for k in params if k not in specs] if isinstance(params, dict) else []
        if unknown and not any(spec.per_model for spec in method.parameters):
            raise _fail(source, f"{key}.parameters.{unknown[0]}",
                        f"merge_method {name} takes no per-model parameters; its parameters "
                        f"({', '.join(sorted(specs))}) go under the top-level 'parameters'")
        _check_keys(source, f"{key}.parameters", params, set(specs))
        is_base = method.inputs.takes_base(base_ref is not None) and ref == base_ref
        checked = {}
        for pkey, value in params.items():
            if not specs[pkey].per_model:
                raise _fail(source, f"{key}.parameters.{pkey}",
                            f"{pkey!r} is a global parameter of {name}; set it under the top-level 'parameters'")
            if is_base:
                raise _fail(source, f"{key}.parameters.{pkey}", "the base model takes no parameters")
            checked[pkey] = _check_setting(source, f"{key}.parameters.{pkey}", specs[pkey], value)
        params = checked
        if ref in seen:
            raise _fail(source, f"{key}.model", f"{ref!r} is listed twice")
        seen.add(ref)
        if is_base:
            continue
        for spec in method.parameters:
            if spec.per_model and spec.required and spec.name not in params and spec.name not in global_params:
                raise _fail(source, f"{key}.parameters.{spec.name}",
                            f"is required by {name} (set it for this model or under the top-level 'parameters')")
        models.append(ModelEntry(ref, _resolve_path(ref, config_dir), params))
    if method.inputs.base == "input" and base_ref is not None and base_ref not in seen:
        models.append(ModelEntry(base_ref, _resolve_path(base_ref, config_dir), {}))  # mergekit appends it
    rule_problem = method.inputs.problems(name, base_ref is not None, len(models))
    if rule_problem:
        raise _fail(source, *rule_problem)

    return _merge_config(raw, source, text, method, global_params, base_ref, config_dir, tuple(models), ())


def _merge_config(raw: dict, source: str, text: str, method: MergeMethod, global_params: Dict[str, Any],
                  base_ref: Optional[str], config_dir: str, models: Tuple[ModelEntry, ...],
                  slices: Tuple[OutputSlice, ...]) -> MergeConfig:
    """The checks common to both layouts, and the config itself."""
    shared = {s.name: global_params.get(s.name, s.default) for s in method.parameters if not s.per_model}
    if not any(isinstance(v, (list, dict)) for v in shared.values()):
        problem = method.check_config(shared)  # with gradients or filters: checked per tensor at planning
        if problem:
            raise _fail(source, "parameters", problem)
    if isinstance(shared.get("density_scope"), (list, dict)):
        raise _fail(source, "parameters.density_scope", "takes one value for the whole merge, not a gradient "
                                                        "or filter list")
    if shared.get("density_scope") == "model":
        for i, m in enumerate(models):
            setting = m.parameters.get("density", global_params.get("density", 1.0))
            if isinstance(setting, (list, dict)):
                raise _fail(source, f"models[{i}].parameters.density",
                            "density_scope: model needs one density per model, not a gradient or filter list")

    tokenizer_source = _tokenizer_source(raw, source, base_ref)
    chat_template = raw.get("chat_template")
    if chat_template is not None and (not isinstance(chat_template, str) or not (
            chat_template == "auto" or chat_template in CHAT_TEMPLATE_NAMES
            or ("{" in chat_template and len(chat_template) >= 20))):
        raise _fail(source, "chat_template", f"must be 'auto' (the input models' most common template), one of "
                                             f"{', '.join(CHAT_TEMPLATE_NAMES)}, or a Jinja template, "
                                             f"got {chat_template!r}")
    storage = raw.get("storage") or {}
    if not isinstance(storage, dict):
        raise _fail(source, "storage", "must be a mapping of fsspec options (endpoint_url, profile, anon, ...)")
    seed = raw.get("random_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise _fail(source, "random_seed", f"must be a whole number from 0 to 2**63 - 1, got {seed!r}")
    base = (ModelEntry(base_ref, _resolve_path(base_ref, config_dir), {})
            if method.inputs.takes_base(base_ref is not None) else None)
    return MergeConfig(
        method=method,
        base=base,
        models=models,
        parameters=global_params,
        dtype=_parse_dtype(source, "dtype", raw.get("dtype")),
        out_dtype=_parse_dtype(source, "out_dtype", raw.get("out_dtype")),
        text=text,
        source=source,
        storage=Storage(storage),
        random_seed=seed,
        slices=slices,
        tokenizer_source=tokenizer_source,
        chat_template=chat_template,
        base_model=ModelEntry(base_ref, _resolve_path(base_ref, config_dir), {}) if base_ref is not None else None,
    )


def _tokenizer_source(raw: dict, source: str, base_ref: Optional[str]) -> Optional[str]:
    """The model whose tokenizer the output gets, from `tokenizer_source` or `tokenizer.source`:
    None for the default (the base model's, else the first model's); "base" names the base."""
    if raw.get("tokenizer_source") is not None and raw.get("tokenizer") is not None:
        raise _fail(source, "tokenizer", "set either 'tokenizer_source' or 'tokenizer', not both (as in mergekit)")
    key, value = "tokenizer_source", raw.get("tokenizer_source")
    if raw.get("tokenizer") is not None:
        _check_keys(source, "tokenizer", raw["tokenizer"], TOKENIZER_KEYS)
        for unsupported in ("tokens", "pad_to_multiple_of"):
            if raw["tokenizer"].get(unsupported):
                raise _fail(source, f"tokenizer.{unsupported}", "is not supported yet (distmerge copies one "
                                                                "model's tokenizer and never re-maps vocabularies)")
        key, value = "tokenizer.source", raw["tokenizer"].get("source", "union")  # mergekit's default
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(source, key, f"must be 'base' or a model of the merge, got {value!r}")
    if value == "union":
        raise _fail(source, key, "'union' (a tokenizer merged from every model's vocabulary) is not supported "
                                 "yet: it re-maps embedding rows; use 'base' or one model's tokenizer")
    if value == "base":
        if base_ref is None:
            raise _fail(source, key, "'base' needs a base_model")
        return base_ref
    return value

def _load_slices(source: str, slices_raw: Any, method: MergeMethod, specs: Dict[str, ParameterSpec],
                 global_params: Dict[str, Any], base_ref: Optional[str], config_dir: str) -> Tuple[OutputSlice, ...]:
    """mergekit's `slices:` layout, checked: sources with layer ranges of one length per slice,
    the base among a slice's sources when the method takes one, the input rules per slice."""
    name = method.name
    if not isinstance(slices_raw, list) or not slices_raw:
        raise _fail(source, "slices", "must be a non-empty list of {sources: [{model, layer_range}, ...]}")
    out = []
    for s_i, raw_slice in enumerate(slices_raw):
        where = f"slices[{s_i}]"
        _check_keys(source, where, raw_slice, SLICE_KEYS)
        if raw_slice.get("residual_weight") is not None:
            raise _fail(source, f"{where}.residual_weight", "is not supported yet")
        slice_params = raw_slice.get("parameters") or {}
        _check_keys(source, f"{where}.parameters", slice_params, set(specs))
        slice_params = {k: _check_setting(source, f"{where}.parameters.{k}", specs[k], v)
                        for k, v in slice_params.items()}
        slice_base = raw_slice.get("base_model", base_ref)
        if slice_base is not None and not isinstance(slice_base, str):
            raise _fail(source, f"{where}.base_model", f"must be a path, got {slice_base!r}")
        sources_raw = raw_slice.get("sources")
        if not isinstance(sources_raw, list) or not sources_raw:
            raise _fail(source, f"{where}.sources", "is required: a list of {model: PATH, layer_range: [FIRST, END]}")
        base_source, models = None, []
        for j, raw_source in enumerate(sources_raw):
            key = f"{where}.sources[{j}]"
            _check_keys(source, key, raw_source, SOURCE_KEYS)
            ref = raw_source.get("model")
            if not isinstance(ref, str) or not ref:
                raise _fail(source, f"{key}.model", "is required: the model's directory")
            layer_range = raw_source.get("layer_range")
            if (not isinstance(layer_range, list) or len(layer_range) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)
                    or not 0 <= layer_range[0] < layer_range[1]):
                raise _fail(source, f"{key}.layer_range", f"must be [FIRST, END] with 0 <= FIRST < END, "
                                                          f"got {layer_range!r}")
            params = raw_source.get("parameters") or {}
            _check_keys(source, f"{key}.parameters", params, set(specs))
            params = {k: _check_setting(source, f"{key}.parameters.{k}", specs[k], v) for k, v in params.items()}
            if any(ref == e.model.ref for e in ([base_source] if base_source else []) + models):
                raise _fail(source, f"{key}.model", f"{ref!r} is a source of this slice twice")
            entry = SliceSource(ModelEntry(ref, _resolve_path(ref, config_dir), params), tuple(layer_range))
            if method.inputs.takes_base(slice_base is not None) and ref == slice_base:
                base_source = entry
                continue
            for spec in method.parameters:
                if (spec.per_model and spec.required and spec.name not in params and spec.name not in slice_params
                        and spec.name not in global_params):
                    raise _fail(source, f"{key}.parameters.{spec.name}", f"is required by {name}")
            models.append(entry)
        lengths = {e.layers for e in ([base_source] if base_source else []) + models}
        if len(lengths) > 1:
            raise _fail(source, f"{where}.sources", f"every source of a slice needs the same number of layers, "
                                                    f"got {sorted(lengths)}")
        if method.inputs.takes_base(slice_base is not None) and base_source is None:
            raise _fail(source, f"{where}.sources", f"merge_method {name} takes the base model {slice_base!r}, "
                                                    "which is not among this slice's sources; add it with its "
                                                    "layer_range")
        problem = method.inputs.problems(name, base_source is not None or (
            slice_base is not None and method.inputs.base != "required"), len(models))
        if problem:
            raise _fail(source, where if problem[0] == "models" else f"{where}.base_model", problem[1])
        out.append(OutputSlice(base_source, tuple(models), slice_params))
    return tuple(out)


def resolve_parameters(config: MergeConfig, tensor_name: str, num_layers: int) -> ResolvedParams:
    """The parameter values that apply to one tensor of a `models:` merge (filters and
    gradients evaluated; t from the tensor's layer)."""
    t = layer_position(tensor_name, num_layers)
    return _resolve(config, tensor_name, t, (config.parameters,),
                    [(m.ref, (m.parameters, config.parameters)) for m in config.models])


def resolve_slice_parameters(config: MergeConfig, output_slice: OutputSlice, tensor_name: str,
                             t: float, input_names: List[str]) -> ResolvedParams:
    """The values for one tensor of a slice, with mergekit's precedence: the source's own
    settings, then the slice's, then the top-level ones; t runs over the slice's layers.
    Filters of global values match the output tensor's name; a model's values match the
    name of its own input tensor (`input_names`, one per model), as in mergekit."""
    shared_scopes = (output_slice.parameters, config.parameters)
    return _resolve(config, tensor_name, t, shared_scopes,
                    [(src.model.ref, (src.model.parameters,) + shared_scopes) for src in output_slice.models],
                    input_names)


def _resolve(config: MergeConfig, tensor_name: str, t: float, shared_scopes: Tuple[Mapping[str, Any], ...],
             models: List[Tuple[str, Tuple[Mapping[str, Any], ...]]],
             input_names: Optional[List[str]] = None) -> ResolvedParams:
    method = config.method
    shared: Dict[str, Any] = {}
    per_model: List[Dict[str, Any]] = [{} for _ in models]
    for spec in method.parameters:
        if not spec.per_model:
            value = _first_value(spec, shared_scopes, tensor_name, t)
            if value is None:
                value = spec.default
            if value is REQUIRED_VALUE:
                why = "no filter matched" if any(spec.name in scope for scope in shared_scopes) else "it is required"
                raise ConfigError(f"{config.source}: parameters.{spec.name}: no value applies to tensor "
                                  f"{tensor_name!r} ({why})")
            shared[spec.name] = float(value) if spec.type is float and value is not None else value
            continue
        for i, (ref, scopes) in enumerate(models):
            value = _first_value(spec, scopes, input_names[i] if input_names else tensor_name, t)
            if value is None:
                if spec.required:
                    raise ConfigError(
                        f"{config.source}: model {ref!r}: no value of {spec.name!r} "
                        f"applies to tensor {tensor_name!r} (no filter matched)")
                value = spec.default
            per_model[i][spec.name] = float(value) if spec.type is float and value is not None else value
            if spec.check is not None and spec.check(per_model[i][spec.name]):
                raise ConfigError(
                    f"{config.source}: model {ref!r}: {spec.name} for tensor {tensor_name!r} "
                    f"{spec.check(per_model[i][spec.name])}, got {value!r}")
    return ResolvedParams(shared, tuple(per_model))


def _first_value(spec: ParameterSpec, scopes: Tuple[Mapping[str, Any], ...], tensor_name: str, t: float) -> Any:
    """The first scope's value that applies to the tensor (None: none does)."""
    for scope in scopes:
        if spec.name in scope:
            value = evaluate_setting(scope[spec.name], tensor_name, t)
            if value is not None:
                return value
    return None
