"""distmerge: out-of-core, distributed merging of large language models.

    import distmerge
    distmerge.merge("merge.yml", "./out")          # mergekit YAML in, sharded safetensors out
    print(distmerge.plan("merge.yml"))             # what would run, from headers only

The entry points are imported lazily, so processes that only need a small part of the
package (the writer actor) do not pay for torch.
"""

from distmerge.errors import ConfigError, DistmergeError, InputError, MergeFailed, OutputError

__all__ = ["merge", "plan", "MergeSummary", "DistmergeError", "ConfigError", "InputError", "OutputError",
           "MergeFailed"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("merge", "plan", "MergeSummary"):
        import importlib

        return getattr(importlib.import_module("distmerge.api"), name)
    raise AttributeError(f"module 'distmerge' has no attribute {name!r}")
