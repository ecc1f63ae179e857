"""distmerge: out-of-core, distributed merging of large language models.

    import distmerge
    distmerge.merge("merge.yml", "./out")          # mergekit YAML in, sharded safetensors out
    print(distmerge.plan("merge.yml"))             # what would run, from headers only
"""

from distmerge.errors import ConfigError, DistmergeError, InputError, MergeFailed, OutputError
from distmerge.merge import MergeSummary, merge, plan

__all__ = ["merge", "plan", "MergeSummary", "DistmergeError", "ConfigError", "InputError", "OutputError",
           "MergeFailed"]
__version__ = "0.1.0"
