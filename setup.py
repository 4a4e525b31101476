"""Build the optional C extensions; the package works (slower fallbacks) without them.

Metadata lives in pyproject.toml. Each extension is built only if its source exists and it
compiles: a machine without a compiler still installs a working package, and
``get_stats()`` of each profiler reports which implementation runs.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE = os.path.join("otlp_middleware", "profiling", "_native")

EXTENSIONS = [
    # (module name, source file)
    ("otlp_middleware.profiling._cpu_native", "cpu_sampler.c"),
    ("otlp_middleware.profiling._memalloc", "memalloc.c"),
    ("otlp_middleware.profiling._handoff", "gil_handoff.c"),
    ("otlp_middleware.profiling._private_heap", "private_heap.c"),
]


class OptionalBuildExt(build_ext):
    """Build each extension, warn instead of failing when one cannot be compiled."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # compiler missing, unsupported platform, ...
            sys.stderr.write(f"warning: optional extension {ext.name} not built: {exc}\n")


def _extensions() -> list[Extension]:
    if not sys.platform.startswith("linux") or sys.implementation.name != "cpython":
        return []
    exts = []
    for name, source in EXTENSIONS:
        path = os.path.join(NATIVE, source)
        if os.path.exists(os.path.join(HERE, path)):
            exts.append(
                Extension(
                    name,
                    sources=[path],
                    extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
                    libraries=["rt"],
                )
            )
    return exts


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
