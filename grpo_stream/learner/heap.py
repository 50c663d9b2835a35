"""The learner's heap: whether freed tensor memory goes back to the OS.

    set_mmap_threshold(cfg.learner.malloc_mmap_threshold_kib)   # at start, before loading

A CPU learner's tensors are malloc blocks. glibc serves a block above its mmap threshold
with a mapping of its own, which free() unmaps; a smaller one comes from the heap, whose
freed holes stay in the process's resident memory until the blocks around them go. glibc
raises the threshold to the size of each mapped block it frees (up to 32 MiB), so after
the first step the activations, a few MiB each on small models, come from the heap, and
the learner's peak RSS is its live tensors plus the holes between them. Setting the
threshold (mallopt M_MMAP_THRESHOLD) fixes it, which also stops the raising: every block
above it is mapped and unmapped, so RSS follows the live tensors. The cost is fresh zeroed
pages for every such block (page faults: a slower step). `bench/lora.py` measures both
for LoRA and full fine-tuning side by side.
"""

from __future__ import annotations

import ctypes

from grpo_stream.core.errors import ConfigError

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
FIELD = "learner.malloc_mmap_threshold_kib"


def set_mmap_threshold(kib: int | None) -> None:
    """Fix glibc's mmap threshold at `kib` KiB for this process (None: leave glibc's
    adaptive one). ConfigError naming the field where the C library has no mallopt (not
    glibc) or refuses the value."""
    if kib is None:
        return
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        raise ConfigError(f"{FIELD} = {kib}: this C library has no mallopt (glibc only)")
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, kib * 1024) != 1:
        raise ConfigError(f"{FIELD} = {kib}: mallopt(M_MMAP_THRESHOLD) refused it")
