"""Preference pairs for reward-model training: mined from a run's groups, or read from JSONL.

    pairs = load_pairs_jsonl("prefs.jsonl")            # TRL's format, text or messages
    pairs = pairs_from_run("runs/demo-...")             # within each group, higher vs lower
    train, held = split_by_prompt(pairs, 0.2, seed=0)   # no prompt on both sides

A `Pair` holds messages: the prompt's turns and, for each side, the completion's turns
(one assistant turn when the completion is text), so training renders exactly what the
`reward_model` reward renders (`grpo_stream.tasks.reward_model.rm_input_ids`).
A JSONL line is `{"prompt": ..., "chosen": ..., "rejected": ...}`, each a string or a
list of `{"role", "content"}` messages, as TRL's reward trainer reads them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo_stream.core.errors import UserError

Messages = list[dict[str, str]]


class PairsError(UserError, ValueError):
    """A bad preference file or run: the message names the file, line and field."""


@dataclass(frozen=True)
class Pair:
    prompt_key: str  # what the train/held-out split groups by (prompt id or prompt text)
    prompt: Messages
    chosen: Messages
    rejected: Messages


def mine_group_pairs(
    rewards: list[float], min_margin: float = 0.0, max_pairs: int | None = None
) -> list[tuple[int, int]]:
    """(better, worse) index pairs within one group: every i, j with finite rewards and
    r_i > r_j + min_margin, the widest gaps first (ties by index); at most `max_pairs`."""
    ok = [i for i, r in enumerate(rewards) if math.isfinite(r)]
    found = [(i, j) for i in ok for j in ok if rewards[i] > rewards[j] + min_margin]
    found.sort(key=lambda p: (-(rewards[p[0]] - rewards[p[1]]), p))
    return found if max_pairs is None else found[:max_pairs]


def _messages(value: Any, role: str, where: str) -> Messages:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in value
        )
    ):
        return [{"role": m["role"], "content": str(m["content"])} for m in value]
    raise PairsError(f"{where}: expected a string or a list of {{role, content}} messages")


def parse_pair(row: Any, where: str) -> Pair:
    if not isinstance(row, dict):
        raise PairsError(f"{where}: expected a JSON object with prompt, chosen, rejected")
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise PairsError(f"{where}: missing field '{key}'")
    prompt = _messages(row["prompt"], "user", f"{where}: prompt")
    chosen = _messages(row["chosen"], "assistant", f"{where}: chosen")
    rejected = _messages(row["rejected"], "assistant", f"{where}: rejected")
    key = json.dumps(prompt, sort_keys=True)
    return Pair(key, prompt, chosen, rejected)


def load_pairs_jsonl(path: str | Path) -> list[Pair]:
    path = Path(path)
    if not path.is_file():
        raise PairsError(f"{path}: pairs file not found")
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PairsError(f"{path}:{n}: not JSON ({e})") from None
        pairs.append(parse_pair(row, f"{path}:{n}"))
    if not pairs:
        raise PairsError(f"{path}: no pairs")
    return pairs


def _rank(key: str, seed: int) -> float:
    digest = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_prompt(
    pairs: list[Pair], heldout_fraction: float, seed: int = 0
) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) with every prompt on one side only: a prompt is held out when
    its seeded hash falls below `heldout_fraction`; with two or more prompts and a
    fraction above 0, each side keeps at least one."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction {heldout_fraction} is not in [0, 1)")
    keys = sorted({p.prompt_key for p in pairs}, key=lambda k: _rank(k, seed))
    held = {k for k in keys if _rank(k, seed) < heldout_fraction}
    if heldout_fraction > 0 and len(keys) >= 2:
        if not held:
            held = {keys[0]}
        if len(held) == len(keys):
            held.discard(keys[-1])
    return [p for p in pairs if p.prompt_key not in held], [
        p for p in pairs if p.prompt_key in held
    ]
