"""Retention for the Zarr backend: which groups to keep, and which chunks nothing kept needs.

Group ids never change. `ZarrWriter.retain` moves the root attribute `first_group`
forward first (readers stop there), then deletes every chunk that lies wholly before
what the groups from `first_group` on need; the chunk holding each boundary stays, so
the disk holds at most one chunk per array beyond the limit. A writer killed between the
two steps leaves chunks the next `retain` deletes.

    keep = first_kept_group(read, n, first, max_groups, max_age_s, now)
    deleted = ChunkSweeper(sfs, arrays).delete_before(needed_from(read, keep))

`read(name, lo, hi)` returns rows [lo, hi) of array `name` (the writer's reader).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import numpy as np

from grpo_stream.buffer.zarr_io import chunk_key
from grpo_stream.buffer.zarr_layout import FLOAT_COLUMNS, OPTIONAL_LISTS, PACKED_LISTS

Read = Callable[[str, int, int], np.ndarray]
_CREATED_AT = FLOAT_COLUMNS.index("created_at")


def _start_row(read: Read, g: int) -> int:
    return int(read("group_rows", g - 1, g)[0]) if g > 0 else 0


def first_kept_group(
    read: Read,
    num_groups: int,
    first_group: int,
    max_groups: int | None,
    max_age_s: float | None,
    now: float | None = None,
) -> int:
    """The oldest group to keep under the limits; the newest group always stays."""
    keep = first_group
    if max_groups is not None:
        keep = max(keep, num_groups - max_groups)
    if max_age_s is not None and num_groups > keep:
        cutoff = (time.time() if now is None else now) - max_age_s
        keep = _first_created_after(read, keep, num_groups, cutoff)
    return min(keep, num_groups - 1) if num_groups else 0


def _first_created_after(read: Read, lo: int, hi: int, cutoff: float) -> int:
    """The oldest group in [lo, hi) created at or after `cutoff` (groups are appended in
    time order), by bisection over each group's first row."""
    while lo < hi:
        mid = (lo + hi) // 2
        r = _start_row(read, mid)
        if read("floats", r, r + 1)[0, _CREATED_AT] < cutoff:
            lo = mid + 1
        else:
            hi = mid
    return lo


def needed_from(read: Read, g: int) -> dict[str, int]:
    """The first index of every array that reading groups >= g touches."""
    r0 = _start_row(read, g)
    need = {"group_rows": max(g - 1, 0), "ints": r0, "floats": r0}
    need["list_ends"] = need["text_ends"] = max(r0 - 1, 0)
    ends = read("list_ends", r0 - 1, r0)[0] if r0 > 0 else None
    for j, name in enumerate(PACKED_LISTS):
        need[name] = int(ends[j]) if ends is not None else 0
    for name in OPTIONAL_LISTS:  # the writer's store has them (it adds missing ones)
        need[f"{name}_ends"] = max(r0 - 1, 0)
        need[name] = int(read(f"{name}_ends", r0 - 1, r0)[0]) if r0 > 0 else 0
    need["text"] = int(read("text_ends", r0 - 1, r0)[0, -1]) if r0 > 0 else 0
    return need


class ChunkSweeper:
    """Deletes chunks before a boundary, remembering per array how far it got, so each
    call only looks at chunks it has not deleted yet (not every chunk from 0)."""

    def __init__(self, sfs, arrays: dict) -> None:
        self.sfs, self.arrays = sfs, arrays
        self.swept: dict[str, int] = {}  # array -> chunks [0, k) already gone

    def delete_before(self, need: dict[str, int]) -> list[str]:
        deleted = []
        for name, first in need.items():
            arr = self.arrays[name]
            stop = first // arr.chunks[0]  # chunks wholly before `first`
            for k in range(self.swept.get(name, 0), stop):
                key = chunk_key(name, k, arr.ndim)
                if self.sfs.exists(key):
                    self.sfs.remove(key)
                    deleted.append(key)
                    if arr.ndim > 1 and self.sfs.local:  # NAME/c/K/0: drop the empty NAME/c/K
                        with contextlib.suppress(OSError):
                            os.rmdir(os.path.dirname(self.sfs.join(key)))
            self.swept[name] = max(self.swept.get(name, 0), stop)
        return deleted
