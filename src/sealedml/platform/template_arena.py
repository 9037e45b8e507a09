"""Imported first by the instance template (``template.PRELOAD``): one malloc arena for it and its forks.

The forkserver preloads modules by importing them, so this setting is an import's effect:
it must run before any preloaded library starts a thread (NumPy's BLAS does), or those
threads get arenas of their own that every forked instance inherits. Instances share one
arena so that heap faulted in by one thread serves another's model load
(:func:`sealedml._internal.malloc.single_arena`, ``runtime/heap_reserve.py``).
"""

from __future__ import annotations

from sealedml._internal.malloc import single_arena

__all__: list[str] = []

single_arena()
