"""Where a restarted generator picks up: the prompts already started, and the rest.

A killed generator leaves prompts in flight; on restart it must neither repeat a prompt
that reached the buffer (or failed for good) nor skip one that did not.

    started, oldest = started_prompts(buffer_path, run_dir)
    prompts = continue_prompts(make_prompt_source(...), started, oldest)  # gaps first
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from grpo_stream.core import jsonl
from grpo_stream.core.run_records import FILE_FAILURES


def started_prompts(buffer_path: str, run_dir: str) -> tuple[set[str], str | None]:
    """(prompt ids already started: a readable group or a failure record, the prompt id
    of the oldest group kept when retention deleted older ones, else None)."""
    from grpo_stream.buffer.store import open_reader

    ids = {r["prompt_id"] for r in jsonl.read(os.path.join(run_dir, FILE_FAILURES))}
    try:
        reader = open_reader(buffer_path)
    except FileNotFoundError:
        return ids, None
    try:
        first, end = reader.first_group(), reader.num_groups()
        table = reader.read_table(first, end, ["prompt_id"])
        column = table.column("prompt_id").to_pylist()
        ids.update(column)
        return ids, (column[0] if first > 0 and column else None)
    finally:
        reader.close()


def continue_prompts(source: Iterator, started: set[str], oldest_kept: str | None = None):
    """The prompts of `source` not yet started, in stream order: the gaps a killed
    generator left (prompts in flight when it died) come first, once each, then the
    rest. With retention (`oldest_kept`), prompts before the oldest kept one are done."""
    remaining = set(started)
    skipping = oldest_kept is not None
    for p in source:
        if skipping:
            remaining.discard(p.prompt_id)
            skipping = p.prompt_id != oldest_kept
            continue
        if p.prompt_id in remaining:
            remaining.discard(p.prompt_id)
            continue
        yield p
