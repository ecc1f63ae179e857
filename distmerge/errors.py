"""Errors a user can act on.

Every message names the file, tensor or config key at fault, what rule it broke and,
where there is one, the fix. Raised during planning, before any tensor data is read.
"""


class DistmergeError(Exception):
    """Base class for problems with the user's config, inputs or destination."""


class ConfigError(DistmergeError):
    """The merge config (YAML) is invalid: unknown key, bad value, unknown method."""


class InputError(DistmergeError):
    """An input model is missing, unreadable, or inconsistent with the others."""


class OutputError(DistmergeError):
    """The destination cannot be written (e.g. it already holds a checkpoint)."""


class MergeFailed(DistmergeError):
    """A work unit failed while merging; the message names the unit's tensors."""


class WriterLost(MergeFailed):
    """The writer actor died and could not be replaced; what it made durable is kept, so
    re-running the merge resumes it."""


class OutputFull(OutputError):
    """The output's filesystem ran out of space mid-merge; what is durable is kept, so
    freeing space and re-running the merge resumes it."""


def out_of_space(where: str, err: OSError) -> OutputFull:
    return OutputFull(f"{where}: no space left on the output's filesystem ({err.strerror}); what is written so "
                      "far is kept: free space and re-run the same merge to resume it")


class LockLost(OutputError):
    """Another merge took this merge's output lock (it could not renew it in time); this
    merge stops without committing and keeps its work for a resume."""
