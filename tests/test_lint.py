"""The house rules in pyproject.toml's [tool.ruff] hold for the whole tree."""

from __future__ import annotations

import os
import subprocess
import sys


def test_ruff_finds_nothing():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "distmerge", "tests", "bench"], cwd=root,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
