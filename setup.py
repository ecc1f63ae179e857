"""Builds the optional C kernels (distmerge/methods/_fused.c); everything else is in pyproject.toml.

The extension is optional: without a C compiler the package installs without it and the
task-vector methods run their (bit-identical, slower) torch path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "distmerge.methods._fused",
            ["distmerge/methods/_fused.c"],
            depends=["distmerge/methods/_fused_kernels.h"],
            extra_compile_args=["-O3", "-std=c11", "-fno-strict-aliasing"],
            optional=True,
        )
    ]
)
