"""The output side of a merge: the destination (fresh, resumed or refused), the resume
record, the shard writers (local positional writes, S3 multipart uploads), the lock
that keeps two merges out of one output, and the commit of the finished checkpoint.

It sits above the planner (it writes what a plan lays out) and below the engine, which
runs a shard writer as a Ray actor.
"""
