"""Tiny (or not so tiny) synthetic Llama-shaped models, for the demo, tests and benchmarks.

A base model of random weights, and fine-tunes that add small, heavy-tailed deltas to
it, written as real Hugging Face checkpoints (config.json, safetensors shards + index).
Everything is seeded, so the same arguments always give the same bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
from safetensors.torch import save_file

from distmerge.io.dtypes import TORCH_DTYPE_NAMES


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 64
    intermediate: int = 176
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 384

    def tensor_shapes(self) -> Dict[str, tuple]:
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        shapes = {"model.embed_tokens.weight": (self.vocab, self.hidden)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "self_attn.q_proj.weight": (self.hidden, self.hidden),
                p + "self_attn.k_proj.weight": (kv, self.hidden),
                p + "self_attn.v_proj.weight": (kv, self.hidden),
                p + "self_attn.o_proj.weight": (self.hidden, self.hidden),
                p + "mlp.gate_proj.weight": (self.intermediate, self.hidden),
                p + "mlp.up_proj.weight": (self.intermediate, self.hidden),
                p + "mlp.down_proj.weight": (self.hidden, self.intermediate),
                p + "input_layernorm.weight": (self.hidden,),
                p + "post_attention_layernorm.weight": (self.hidden,),
            })
        shapes["model.norm.weight"] = (self.hidden,)
        shapes["lm_head.weight"] = (self.vocab, self.hidden)
        return shapes

    def hf_config(self, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": TORCH_DTYPE_NAMES[dtype],
            "bos_token_id": 1, "eos_token_id": 2,
        }


def _generator(seed: int, *parts: object) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(hash_seed(seed, *parts))
    return g


def hash_seed(seed: int, *parts: object) -> int:
    import hashlib

    digest = hashlib.sha256(repr((seed, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF


def base_tensor(name: str, shape: tuple, seed: int) -> torch.Tensor:
    g = _generator(seed, "base", name)
    if len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) * (1.0 / shape[-1] ** 0.5)


def delta_tensor(name: str, shape: tuple, seed: int, model: int, scale: float) -> torch.Tensor:
    """A fine-tune's change: mostly tiny, some larger (Student-t like tails)."""
    g = _generator(seed, "delta", model, name)
    noise = torch.randn(shape, generator=g)
    tails = torch.randn(shape, generator=g) / (torch.rand(shape, generator=g) + 0.05)
    return scale * (0.2 * noise + 0.02 * tails) * (1.0 / max(shape[-1], 1) ** 0.5)


def write_checkpoint(path: str, tensors: Dict[str, torch.Tensor], config: dict,
                     max_shard_bytes: Optional[int] = None) -> None:
    """Write tensors as model.safetensors, or as shards + index when max_shard_bytes is set."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    if not max_shard_bytes:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    shards: List[Dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        if shards[-1] and used + size > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += size
    weight_map = {}
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def make_models(root: str, *, shape: LlamaShape = LlamaShape(), fine_tunes: int = 3,
                dtype: torch.dtype = torch.bfloat16, seed: int = 0, delta_scale: float = 0.5,
                max_shard_bytes: Optional[int] = None, dtypes: Optional[Dict[str, torch.dtype]] = None) -> List[str]:
    """Write base + fine-tunes under `root` (base/, ft1/, ...); return their directories.

    `dtypes` overrides the dtype of individual tensors (by name), e.g. float32 norms.
    """
    dtypes = dtypes or {}
    shapes = shape.tensor_shapes()
    paths = []
    for model in range(fine_tunes + 1):
        tensors = {}
        for name, tshape in shapes.items():
            t = base_tensor(name, tshape, seed)
            if model:
                t = t + delta_tensor(name, tshape, seed, model, delta_scale)
            tensors[name] = t.to(dtypes.get(name, dtype)).contiguous()
        path = os.path.join(root, "base" if model == 0 else f"ft{model}")
        write_checkpoint(path, tensors, shape.hf_config(dtype), max_shard_bytes)
        paths.append(path)
    return paths


def ties_config(paths: List[str], *, weights=(0.5, 0.3, 0.2), densities=(0.5, 0.5, 0.5),
                dtype: str = "bfloat16", extra: Optional[dict] = None) -> dict:
    """A mergekit TIES config over make_models() output (base first)."""
    config = {
        "merge_method": "ties",
        "base_model": paths[0],
        "models": [{"model": p, "parameters": {"weight": w, "density": d}}
                   for p, w, d in zip(paths[1:], weights, densities)],
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": dtype,
    }
    config["parameters"].update(extra or {})
    return config


__all__ = ["LlamaShape", "make_models", "ties_config", "write_checkpoint", "asdict"]
