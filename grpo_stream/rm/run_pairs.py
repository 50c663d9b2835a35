"""Preference pairs mined from a run's buffer: within each group, a completion with a
higher rule reward against one with a lower.

    pairs = pairs_from_run("runs/demo-...", min_margin=0.0, max_pairs_per_group=8)
    pairs = pairs_from_runs(["runs/a", "runs/b"], 0.0, 8)   # several runs, split by question

The buffer stores the rendered prompt, not the question; the prompts are rebuilt from
the run's own config (RUN/config.toml: the task and its seed give the same prompt ids),
so a pair carries the prompt's messages (`grpo_stream.tasks.prompt.chat_messages`)
exactly as the `reward_model` reward renders them. A sample whose reward failed is
never paired. `reward_key` picks one reward component instead of the weighted total.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import replace

from grpo_stream.buffer.store import open_reader
from grpo_stream.config import Config, load_run_config
from grpo_stream.rm.pairs import Pair, PairsError, mine_group_pairs
from grpo_stream.tasks import make_prompt_source
from grpo_stream.tasks.prompt import Prompt, chat_messages

MAX_PROMPT_SCAN = 1_000_000  # prompts walked looking for the run's ids before giving up


def _prompts_by_id(cfg: Config, wanted: set[str]) -> dict[str, Prompt]:
    found: dict[str, Prompt] = {}
    task = cfg.task.model_copy(update={"num_prompts": None})
    for n, p in enumerate(make_prompt_source(task)):
        if p.prompt_id in wanted:
            found[p.prompt_id] = p
            if len(found) == len(wanted):
                break
        if n >= MAX_PROMPT_SCAN:
            break
    missing = sorted(wanted - set(found))
    if missing:
        raise PairsError(
            f"{len(missing)} prompt ids of the buffer are not in the run's task "
            f"(e.g. {missing[0]!r}); was the task changed after the run?"
        )
    return found


def _score(row: dict, reward_key: str | None) -> float:
    if row["reward_error"]:
        return math.nan
    if reward_key is None:
        return float(row["reward"])
    components = json.loads(row["reward_components"] or "{}")
    if reward_key not in components:
        raise PairsError(f"--reward-key: {reward_key!r} is not a reward component "
                         f"({', '.join(sorted(components))})")  # fmt: skip
    return float(components[reward_key])


def _groups(run_dir: str, cfg: Config) -> dict[int, list[dict]]:
    reader = open_reader(cfg.buffer_path(run_dir))
    try:
        columns = ["group_id", "prompt_id", "sample_index", "completion_text", "reward",
                   "reward_error", "reward_components"]  # fmt: skip
        rows = reader.read_table(reader.first_group(), reader.num_groups(), columns).to_pylist()
    finally:
        reader.close()
    groups: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["group_id"]].append(row)
    return groups


def pairs_from_run(
    run_dir: str,
    min_margin: float = 0.0,
    max_pairs_per_group: int | None = 8,
    reward_key: str | None = None,
) -> list[Pair]:
    cfg = load_run_config(run_dir)
    groups = _groups(run_dir, cfg)
    if not groups:
        raise PairsError(f"{run_dir}: the buffer holds no groups")
    prompts = _prompts_by_id(cfg, {rows[0]["prompt_id"] for rows in groups.values()})
    pairs = []
    for rows in groups.values():
        rows.sort(key=lambda r: r["sample_index"])
        prompt = prompts[rows[0]["prompt_id"]]
        messages = chat_messages(prompt, cfg.task)
        scores = [_score(r, reward_key) for r in rows]
        for i, j in mine_group_pairs(scores, min_margin, max_pairs_per_group):
            chosen = [{"role": "assistant", "content": rows[i]["completion_text"]}]
            rejected = [{"role": "assistant", "content": rows[j]["completion_text"]}]
            pairs.append(Pair(prompt.prompt_id, messages, chosen, rejected))
    if not pairs:
        raise PairsError(f"{run_dir}: no group has two completions with different rewards")
    return pairs


def pairs_from_runs(run_dirs: list[str], *args, **kwargs) -> list[Pair]:
    """`pairs_from_run` over several runs (same arguments). Each pair's `prompt_key` is
    its rendered prompt, so a question that two runs sampled (under different prompt ids:
    their seeds differ) lands on one side of the train/held-out split."""
    pairs = [p for run_dir in run_dirs for p in pairs_from_run(run_dir, *args, **kwargs)]
    if len(run_dirs) == 1:
        return pairs
    return [replace(p, prompt_key=json.dumps(p.prompt, sort_keys=True)) for p in pairs]
