"""Shared test helpers: run mergekit (the oracle), load checkpoints, compare bit for bit."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import psutil

import torch
import yaml
from safetensors import safe_open

from distmerge.io.layout import INDEX_NAME
from distmerge.methods import topk
from distmerge.output.resume import INDEX_FINGERPRINTS, REQUEST_FINGERPRINTS

BITS_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def write_yaml(path: str, data: dict) -> str:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path


def load_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    out = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def shard_bytes(path: str) -> Dict[str, bytes]:
    """Every output file that defines the checkpoint, as raw bytes. The index's record of
    where the merge came from (fingerprints of the config and of the inputs' paths and
    versions) is left out: merges of the same models from elsewhere differ only there."""
    names = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    files = {os.path.basename(n): open(n, "rb").read() for n in names}
    with open(os.path.join(path, INDEX_NAME), "rb") as f:
        index = json.loads(f.read())
    assert set(index["metadata"].pop(INDEX_FINGERPRINTS)) == set(REQUEST_FINGERPRINTS)
    files[INDEX_NAME] = json.dumps(index, sort_keys=True).encode()
    return files


def run_mergekit(config_path: str, out_path: str, stable: bool = True) -> Dict[str, torch.Tensor]:
    """Run the real mergekit on a config (in process, as mergekit-yaml does), by default
    with its sorts made stable (mergekit_oracle.stable_sorts)."""
    import contextlib

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_oracle import stable_sorts

    with open(config_path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    raw.pop("random_seed", None)  # distmerge's own key
    config = MergeConfiguration.model_validate(raw)
    with stable_sorts() if stable else contextlib.nullcontext():
        run_merge(config, out_path, MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                                 num_threads=1))
    return load_checkpoint(out_path)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(BITS_VIEW[t.element_size()])


def assert_bit_identical(ours: Dict[str, torch.Tensor], theirs: Dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        a, b = ours[name], theirs[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        differ = (bits(a) != bits(b)).sum().item()
        assert differ == 0, f"{name}: {differ} of {a.numel()} entries differ"


def threshold_ties(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Positions whose |delta| equals the k-th largest magnitude (k = int(density * numel))."""
    k = int(density * delta.numel())
    keys = topk.magnitude_keys(delta).reshape(-1)
    threshold = torch.sort(keys.to(torch.int64), descending=True).values[k - 1]
    return (topk.magnitude_keys(delta) == threshold)


def assert_ties_parity(ours: Dict[str, torch.Tensor], theirs: Dict[str, torch.Tensor],
                       inputs: List[Dict[str, torch.Tensor]], densities: Iterable[float],
                       dtype: Optional[torch.dtype]) -> int:
    """Outputs agree everywhere except where some model's |delta| sits exactly at its threshold.

    Returns how many entries differed (all of them at thresholds).
    """
    assert sorted(ours) == sorted(theirs)
    densities = list(densities)
    total_diff = 0
    for name in ours:
        a, b = ours[name], theirs[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        differ = bits(a) != bits(b)
        if not differ.any():
            continue
        base = inputs[0][name].to(dtype or inputs[0][name].dtype)
        allowed = torch.zeros_like(differ)
        for model, density in zip(inputs[1:], densities):
            if density < 1:
                allowed |= threshold_ties(model[name].to(base.dtype) - base, density)
        outside = (differ & ~allowed).sum().item()
        assert outside == 0, f"{name}: {outside} entries differ away from the top-k threshold"
        total_diff += differ.sum().item()
    return total_diff


def read_index(path: str) -> dict:
    with open(os.path.join(path, "model.safetensors.index.json"), encoding="utf-8") as f:
        return json.load(f)


def cli_command(*args: str) -> Tuple[List[str], Dict[str, str]]:
    """The `distmerge` CLI as a subprocess command line, and its environment (Ray on loopback)."""
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    return [sys.executable, "-m", "distmerge.cli", *args], env


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    """The `distmerge` CLI run in this process: on the tests' own Ray when one is up (a
    re-run after a killed merge need not start a Ray of its own), output captured."""
    import signal

    from distmerge.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        signal.signal(signal.SIGTERM, handler)
    return CliResult(code, out.getvalue(), err.getvalue())


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process and every descendant (Ray's too), by pid."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    for p in [psutil.Process(proc.pid)] + family:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


def kill_actor_when(class_name: str, ready: Callable[[], bool], killed: list) -> threading.Thread:
    """A thread that SIGKILLs the Ray actor process of `class_name` (found among this
    process's descendants, by pid) once `ready()` is true; the pids go into `killed`."""

    def run():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if ready():
                for proc in psutil.Process().children(recursive=True):
                    try:
                        if class_name in " ".join(proc.cmdline()):
                            proc.kill()
                            killed.append(proc.pid)
                    except psutil.Error:
                        continue
                return
            time.sleep(0.01)

    thread = threading.Thread(target=run)
    thread.start()
    return thread
