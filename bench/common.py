"""Shared pieces of the benchmarks: memory sampling of a whole process tree, timed runs,
synthetic inputs that survive between runs, page-cache warm-up, and output comparison.

Memory is measured from outside: a thread samples the command's process and all of its
descendants with psutil. `distmerge merge` without `--address` starts its local Ray
(gcs_server, raylet, the workers) as descendants of the CLI process, so the sum covers
the whole merge, Ray included. Two sums are kept:

- RSS: what `ps` shows. Pages shared between processes (Ray's plasma store, mmapped input
  files in the page cache, the same shared libraries in every worker) count once per
  process, so the sum overstates a multi-process tool.
- PSS: each shared page divided among the processes that map it, so the sum is what the
  tree really holds. Where PSS cannot be read (AccessDenied) RSS stands in for it.

Both include file-backed pages of memory-mapped inputs: a tool that mmaps its inputs is
charged for the input pages it has touched and that are still mapped.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import psutil
import torch
from safetensors import safe_open

from distmerge.sizes import format_bytes
from distmerge.synthetic import LlamaShape

__all__ = [
    "Comparison", "ProcessTreeSampler", "Result", "compare_outputs", "console_script", "drop_page_cache",
    "format_bytes", "input_files", "make_or_reuse_models", "read_files", "run_measured", "write_bytes",
]

MARKER = "models.json"
MARKER_VERSION = 1
CHUNK = 16 * 2**20
BITS_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _short_name(proc: psutil.Process) -> str:
    """A readable name: `raylet`, `gcs_server`, `ray::ShardWriter`, `python distmerge`."""
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        cmdline = []
    if not cmdline:
        with contextlib.suppress(psutil.Error):
            return proc.name()
        return "?"
    first = cmdline[0].split()[0] if cmdline[0].strip() else cmdline[0]
    if first.startswith("ray::"):
        return first
    exe = os.path.basename(first)
    if exe.startswith("python"):
        rest = iter(cmdline[1:])
        for arg in rest:
            if arg == "-m":
                return f"python -m {next(rest, '?')}"
            if not arg.startswith("-"):
                return f"python {os.path.basename(arg)}"
    return exe


@dataclass
class ProcessPeak:
    """One process's largest RSS and PSS seen, and its name when its RSS peaked."""

    name: str
    rss: int = 0
    pss: int = 0


class ProcessTreeSampler:
    """Samples the memory of process `pid` and all its descendants every `interval` seconds.

    Records the peak of the summed RSS and of the summed PSS over the tree, and each
    process's own peaks (by pid, with a short name) to tell which processes were largest.
    Peaks shorter than the interval can be missed.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_rss_sum = 0
        self.peak_pss_sum = 0
        self.samples = 0
        self.pss_denied = False
        self.per_process: Dict[int, ProcessPeak] = {}
        self._procs: Dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"sampler-{pid}", daemon=True)

    def start(self) -> "ProcessTreeSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "ProcessTreeSampler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _tree(self) -> List[psutil.Process]:
        """The root and its descendants, reusing Process objects so pid reuse is detected."""
        try:
            root = self._procs.get(self.pid) or psutil.Process(self.pid)
            found = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        procs = []
        for proc in found:
            known = self._procs.get(proc.pid)
            if known is None or not known.is_running():
                self._procs[proc.pid] = known = proc
            procs.append(known)
        return procs

    def sample(self) -> None:
        rss_sum = pss_sum = 0
        for proc in self._tree():
            try:
                try:
                    info = proc.memory_full_info()
                    rss, pss = info.rss, getattr(info, "pss", info.rss)
                except psutil.AccessDenied:
                    self.pss_denied = True
                    rss = pss = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            rss_sum += rss
            pss_sum += pss
            peak = self.per_process.get(proc.pid)
            if peak is None:
                peak = self.per_process[proc.pid] = ProcessPeak(_short_name(proc))
            if rss > peak.rss:
                peak.rss = rss
                peak.name = _short_name(proc)
            peak.pss = max(peak.pss, pss)
        self.peak_rss_sum = max(self.peak_rss_sum, rss_sum)
        self.peak_pss_sum = max(self.peak_pss_sum, pss_sum)
        self.samples += 1

    def _loop(self) -> None:
        while True:
            started = time.monotonic()
            self.sample()
            if self._stop.wait(max(0.0, self.interval - (time.monotonic() - started))):
                return

    def largest(self, n: int = 5) -> List[Tuple[str, int, int]]:
        """The `n` processes with the largest peak RSS: (name [pid], peak RSS, peak PSS)."""
        ranked = sorted(self.per_process.items(), key=lambda item: item[1].rss, reverse=True)[:n]
        return [(f"{p.name} [{pid}]", p.rss, p.pss) for pid, p in ranked]


@dataclass
class Result:
    """One measured command. `per_process_peaks` maps "name [pid]" to (peak RSS, peak PSS)."""

    cmd: List[str]
    wall_s: float
    peak_rss_sum: int
    peak_pss_sum: int
    returncode: int
    stdout_tail: str
    per_process_peaks: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    processes_seen: int = 0
    samples: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def run_with_sampler(cmd: Sequence[str], sampler_class: type = None, env: Optional[Mapping[str, str]] = None, *,
                     interval: float = 0.2, tail_chars: int = 4000):
    """Run `cmd` (stdout and stderr together, into a temporary file) under a sampler.

    Returns (wall seconds, exit status, output tail, the stopped sampler, the child's pid).
    """
    full_env = dict(os.environ, **(env or {}))
    with tempfile.TemporaryFile(mode="w+b") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=full_env)
        sampler = (sampler_class or ProcessTreeSampler)(proc.pid, interval).start()
        try:
            returncode = proc.wait()
        finally:
            wall = time.perf_counter() - started
            sampler.stop()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.seek(0, os.SEEK_END)
        log.seek(max(0, log.tell() - tail_chars))
        tail = log.read().decode("utf-8", errors="replace")
    return wall, returncode, tail, sampler, proc.pid


def run_measured(cmd: Sequence[str], env: Optional[Mapping[str, str]] = None, *,
                 interval: float = 0.2, tail_chars: int = 4000) -> Result:
    """Run `cmd` under a ProcessTreeSampler and summarise it as a Result."""
    wall, returncode, tail, sampler, _ = run_with_sampler(cmd, env=env, interval=interval, tail_chars=tail_chars)
    return Result(
        cmd=list(cmd), wall_s=wall, peak_rss_sum=sampler.peak_rss_sum, peak_pss_sum=sampler.peak_pss_sum,
        returncode=returncode, stdout_tail=tail,
        per_process_peaks={name: (rss, pss) for name, rss, pss in sampler.largest(len(sampler.per_process))},
        processes_seen=len(sampler.per_process), samples=sampler.samples,
    )


def console_script(name: str, module: str) -> List[str]:
    """The command for an installed console script of this interpreter's environment.

    Looks next to the interpreter first (not on PATH, where a pyenv shim could stand in for
    it); falls back to `python -m module`.
    """
    for directory in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return [path]
    return [sys.executable, "-m", module]


def _checkpoint_complete(path: str) -> bool:
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = set(json.load(f)["weight_map"].values())
        return all(os.path.isfile(os.path.join(path, name)) for name in files)
    return os.path.isfile(os.path.join(path, "model.safetensors"))


_MAKE_MODELS = """
import json, sys, torch
from distmerge.synthetic import LlamaShape, make_models
a = json.loads(sys.argv[1])
make_models(a["root"], shape=LlamaShape(**a["shape"]), fine_tunes=a["fine_tunes"],
            dtype=getattr(torch, a["dtype"].rsplit(".", 1)[-1]), seed=a["seed"], max_shard_bytes=a["max_shard_bytes"])
"""


def make_or_reuse_models(root: str, shape: LlamaShape, fine_tunes: int = 3, dtype: torch.dtype = torch.bfloat16,
                         *, seed: int = 0, max_shard_bytes: int = 2 * 10**9) -> Tuple[List[str], bool]:
    """Synthetic base + fine-tunes under `root`, written only if not already there.

    Returns (model directories, base first; whether they were reused). A marker file records
    the arguments; the models are reused only when it matches and every file is present.
    Generation is seeded, so reused models are the same bytes a fresh write would give.

    The models are written by `distmerge.synthetic.make_models` in a child process: it holds a
    whole model in memory, and the benchmark process should stay small while it measures.
    (Linux also carries a process's peak RSS over into the children it starts, so a big
    parent would inflate the peak memory the tools report about themselves.)
    """
    args = {"version": MARKER_VERSION, "shape": asdict(shape), "fine_tunes": fine_tunes, "dtype": str(dtype),
            "seed": seed, "max_shard_bytes": max_shard_bytes}
    paths = [os.path.join(root, "base")] + [os.path.join(root, f"ft{i}") for i in range(1, fine_tunes + 1)]
    marker = os.path.join(root, MARKER)
    with contextlib.suppress(FileNotFoundError, ValueError):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == args and all(_checkpoint_complete(p) for p in paths):
                return paths, True
    with contextlib.suppress(FileNotFoundError):
        os.remove(marker)
    # Old models of another shape may have other shard names; never leave them mixed in.
    for path in glob.glob(os.path.join(root, "base")) + glob.glob(os.path.join(root, "ft[0-9]*")):
        shutil.rmtree(path)
    subprocess.run([sys.executable, "-c", _MAKE_MODELS, json.dumps(dict(args, root=root))], check=True)
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(args, f, indent=2)
    return paths, False


def input_files(model_dirs: Iterable[str]) -> List[str]:
    """Every regular file of the given checkpoints (weights, index, configs)."""
    files = []
    for directory in model_dirs:
        files += sorted(p for p in glob.glob(os.path.join(directory, "*")) if os.path.isfile(p))
    return files


def drop_page_cache() -> bool:
    """Try to sync and drop the page cache (needs root and a writable /proc/sys); True if it worked."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_files(paths: Iterable[str]) -> Tuple[int, float]:
    """Read every file once, start to end, discarding the data. Returns (bytes, seconds)."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    total = 0
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total, time.perf_counter() - started


def write_bytes(path: str, size: int) -> Tuple[float, float]:
    """Write `size` bytes to `path`, then fsync. Returns (write seconds, fsync seconds); removes the file."""
    chunk = os.urandom(CHUNK)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left:
            left -= os.write(fd, chunk[:min(left, CHUNK)])
        written = time.perf_counter()
        os.fsync(fd)
        synced = time.perf_counter()
    finally:
        os.close(fd)
        os.remove(path)
    return written - started, synced - written


def _tensor_files(directory: str) -> Dict[str, str]:
    """Tensor name -> safetensors file, from the index if there is one, else from every file's header."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return {name: os.path.join(directory, file) for name, file in json.load(f)["weight_map"].items()}
    out = {}
    for file in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        with safe_open(file, "pt") as f:
            out.update({name: file for name in f.keys()})
    return out


class _Checkpoint:
    """Lazy, one-tensor-at-a-time access to a checkpoint's tensors."""

    def __init__(self, directory: str, stack: contextlib.ExitStack) -> None:
        self.directory = directory
        self.files = _tensor_files(directory)
        self._stack = stack
        self._open: Dict[str, object] = {}

    def names(self) -> List[str]:
        return sorted(self.files)

    def get(self, name: str) -> torch.Tensor:
        file = self.files[name]
        if file not in self._open:
            self._open[file] = self._stack.enter_context(safe_open(file, "pt"))
        return self._open[file].get_tensor(name)


@dataclass
class Comparison:
    """How two merge outputs differ. `outside_thresholds` and `problems` must be empty/0."""

    tensors: int = 0
    entries: int = 0
    tensors_differing: int = 0
    entries_differing: int = 0
    outside_thresholds: int = 0
    worst: List[Tuple[str, int]] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outside_thresholds == 0 and not self.problems

    def format(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        share = self.entries_differing / self.entries if self.entries else 0.0
        lines = [f"{verdict}: {self.tensors} tensors, {self.entries:,} entries; "
                 f"{self.entries_differing:,} entries differ ({share:.4%}) in {self.tensors_differing} tensors, "
                 f"{self.outside_thresholds} of them away from a top-k threshold"]
        lines += [f"  {name}: {n} entries differ away from the thresholds" for name, n in self.worst]
        lines += [f"  {problem}" for problem in self.problems]
        return "\n".join(lines)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(BITS_VIEW[t.element_size()])


def _at_threshold(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Positions whose |delta| equals the k-th largest magnitude, k = int(density * numel)."""
    magnitude = delta.abs().to(torch.float64 if delta.dtype == torch.float64 else torch.float32).reshape(-1)
    k = int(density * magnitude.numel())
    if k <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool)
    threshold = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
    return (magnitude == threshold).reshape(delta.shape)


def compare_outputs(ours_dir: str, mergekit_dir: str, model_dirs: Sequence[str],
                    densities: Sequence[Optional[float]], dtype: Optional[torch.dtype]) -> Comparison:
    """Check a distmerge output against mergekit's, the way the parity tests do, tensor by tensor.

    `model_dirs` is base first, then the models in config order; `densities` has one entry per
    model (None, or >= 1, for no sparsification: those entries must then be bit-identical, as
    for linear and task_arithmetic). Each differing entry must sit where some sparsified model's
    |delta| (computed in `dtype`, the config's merge dtype; None: the base's dtype) equals that
    model's top-k threshold for the tensor: mergekit breaks those ties arbitrarily.
    Only one tensor of each checkpoint is in memory at a time.
    """
    if len(densities) != len(model_dirs) - 1:
        raise ValueError(f"{len(model_dirs) - 1} models but {len(densities)} densities")
    result = Comparison()
    with contextlib.ExitStack() as stack:
        ours = _Checkpoint(ours_dir, stack)
        theirs = _Checkpoint(mergekit_dir, stack)
        inputs = [_Checkpoint(d, stack) for d in model_dirs]
        for name in sorted(set(ours.names()) ^ set(theirs.names())):
            where = "distmerge" if name in ours.files else "mergekit"
            result.problems.append(f"{name}: only in the {where} output")
        outside_by_tensor = {}
        for name in sorted(set(ours.names()) & set(theirs.names())):
            a, b = ours.get(name), theirs.get(name)
            if a.dtype != b.dtype or a.shape != b.shape:
                result.problems.append(f"{name}: distmerge {a.dtype} {tuple(a.shape)}, "
                                       f"mergekit {b.dtype} {tuple(b.shape)}")
                continue
            result.tensors += 1
            result.entries += a.numel()
            differ = _bits(a) != _bits(b)
            del a, b
            n_differ = int(differ.sum())
            if not n_differ:
                continue
            result.tensors_differing += 1
            result.entries_differing += n_differ
            base = inputs[0].get(name)
            base = base.to(dtype or base.dtype)
            allowed = torch.zeros_like(differ)
            for model, density in zip(inputs[1:], densities):
                if density is not None and density < 1:
                    allowed |= _at_threshold(model.get(name).to(base.dtype) - base, density)
            outside = int((differ & ~allowed).sum())
            if outside:
                result.outside_thresholds += outside
                outside_by_tensor[name] = outside
        result.worst = sorted(outside_by_tensor.items(), key=lambda item: item[1], reverse=True)[:10]
    return result
