"""Merge methods: pure tensor functions behind one protocol (see base.py)."""

from typing import Dict

from distmerge.methods.base import MergeMethod
from distmerge.methods.linear import LINEAR
from distmerge.methods.task_arithmetic import TASK_ARITHMETIC, TIES

METHODS: Dict[str, MergeMethod] = {m.name: m for m in (TIES, TASK_ARITHMETIC, LINEAR)}


def get_method(name: str) -> MergeMethod:
    return METHODS[name]
