"""Reading safetensors checkpoints by header and byte range, from local files or fsspec URLs,
and the byte layout of the output the planner lays out (written by `distmerge.output`)."""
