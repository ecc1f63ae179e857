"""Merge methods: pure tensor functions behind one protocol (see base.py)."""

from typing import Dict

from distmerge.methods.arcee_fusion import ARCEE_FUSION
from distmerge.methods.base import MergeMethod
from distmerge.methods.elementwise import NEARSWAP, PASSTHROUGH
from distmerge.methods.karcher import KARCHER
from distmerge.methods.linear import LINEAR
from distmerge.methods.model_stock import MODEL_STOCK
from distmerge.methods.ram import RAM, RAMPLUS_TL
from distmerge.methods.sce import SCE
from distmerge.methods.spherical import MULTISLERP, NUSLERP, SLERP
from distmerge.methods.task_vectors import TASK_VECTOR_METHODS

METHODS: Dict[str, MergeMethod] = {m.name: m for m in (
    *TASK_VECTOR_METHODS, SCE, RAM, RAMPLUS_TL, LINEAR, NEARSWAP, PASSTHROUGH, SLERP, NUSLERP, MULTISLERP, MODEL_STOCK,
    ARCEE_FUSION, KARCHER)}


def get_method(name: str) -> MergeMethod:
    return METHODS[name]
