"""The rollout record: one row per sampled completion, typed on every boundary.

`Sample` is the Python record the generator builds and the learner reads; the Arrow
schema is generated from its fields (`ARROW_SCHEMA`) so the two never drift (columns.py
converts between them). Samples travel in groups (`list[Sample]`, the G completions of
one prompt): the buffer only ever publishes and serves whole groups. `SCHEMA_VERSION` is stored with the data;
readers refuse versions they do not know.

Versions (the rows are the same in both; the version is the store format's):
  1  Arrow segments carry a CRC-32 (zlib) per column
  2  Arrow segments carry a CRC-32C per column (hardware-accelerated, so a reader's
     first-use check costs less: `bench.choices`, bench/RESULTS.md)
A writer appending to an existing store keeps that store's version.

`policy_mask` (multi-turn episodes, `grpo_stream.generator.episodes`) is optional: a
store written without it reads back with empty masks (every token the policy's), and
a writer appending to such a store refuses rows with a mask rather than drop it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pyarrow as pa

from grpo_stream.core.errors import UserError

SCHEMA_VERSION = 2  # what new stores are written as
KNOWN_SCHEMA_VERSIONS = (1, 2)  # what this code reads (and appends to)

Group = list["Sample"]


@dataclass
class Sample:
    run_id: str
    prompt_id: str
    sample_index: int  # 0..G-1 within the group
    policy_version: int  # weight version at request start (server's /weight_info)
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: list[float]  # per completion token, from vLLM (processed log-probs)
    reward: float
    policy_version_end: int = -1  # version at request end; differs if a sync crossed it
    group_id: int = -1  # assigned by the writer: sequential over the store
    row_id: int = -1  # assigned by the writer: sequential over the store
    prompt_text: str = ""
    completion_text: str = ""
    answer: str = ""
    reward_components: dict[str, float] = field(default_factory=dict)
    reward_error: str = ""  # non-empty: a reward function raised or timed out (reason)
    finish_reason: str = ""
    gen_latency_s: float = 0.0
    server_url: str = ""
    created_at: float = 0.0
    # per completion token: 1 the policy sampled it, 0 an environment turn's token (a
    # tool result, a reply) with no behaviour log-prob (stored 0.0); empty: all policy
    # (single-turn rows, and every row of a store written before the column existed)
    policy_mask: list[int] = field(default_factory=list)


_ARROW_TYPES: dict[str, pa.DataType] = {
    "run_id": pa.string(),
    "prompt_id": pa.string(),
    "sample_index": pa.int32(),
    "policy_version": pa.int64(),
    "prompt_ids": pa.large_list(pa.int32()),
    "completion_ids": pa.large_list(pa.int32()),
    "behaviour_logprobs": pa.large_list(pa.float32()),
    "reward": pa.float32(),
    "policy_version_end": pa.int64(),
    "group_id": pa.int64(),
    "row_id": pa.int64(),
    "prompt_text": pa.string(),
    "completion_text": pa.string(),
    "answer": pa.string(),
    "reward_components": pa.string(),  # JSON object {name: value}
    "reward_error": pa.string(),
    "finish_reason": pa.string(),
    "gen_latency_s": pa.float32(),
    "server_url": pa.string(),
    "created_at": pa.float64(),
    "policy_mask": pa.large_list(pa.int8()),  # optional: OPTIONAL_COLUMNS
}

# columns a store may lack (written before they existed): readers fill in their default
OPTIONAL_COLUMNS = ("policy_mask",)

assert list(_ARROW_TYPES) == [f.name for f in dataclasses.fields(Sample)], "schema drift"

ARROW_SCHEMA = pa.schema(
    [pa.field(name, typ, nullable=False) for name, typ in _ARROW_TYPES.items()],
    metadata={b"grpo_stream_schema_version": str(SCHEMA_VERSION).encode()},
)


class SchemaVersionError(UserError, ValueError):
    """Data written by an unknown (newer) schema version; the message names the file."""


def check_schema_version(version: int | str | bytes | None, where: str) -> int:
    """The recorded version as an int; SchemaVersionError if missing or unknown."""
    if version is None:
        raise SchemaVersionError(f"{where}: no grpo-stream schema version recorded")
    v = int(version.decode() if isinstance(version, bytes) else version)
    if v not in KNOWN_SCHEMA_VERSIONS:
        known = ", ".join(map(str, KNOWN_SCHEMA_VERSIONS))
        raise SchemaVersionError(
            f"{where}: schema version {v} is not supported by this grpo-stream "
            f"(knows {known}); upgrade grpo-stream to read it"
        )
    return v
