"""The `[eval]` config section: held-out evaluation over policy versions.

`grpo_stream.config` adds it to `Config` as `cfg.eval` (import it from there). With
`every > 0`, `grpo-stream run` starts an evaluator beside the generator and the learner
(`grpo_stream/eval/follow.py`) that scores the held-out prompts at policy version 0,
every `every` versions and the final one, on the same vLLM servers, into RUN/eval.jsonl.
`grpo-stream eval` (standalone) reads the same section.

    [eval]
    every = 4          # versions 0, 4, 8, ... and the last
    num_prompts = 32
    k = 4              # mean@4 and pass@4 at `temperature`, beside greedy pass@1
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, field_validator

from grpo_stream.config.sections import RewardConfig, TaskConfig, _Section


class EvalConfig(_Section):
    every: int = Field(
        0,
        ge=0,
        description="evaluate every N policy versions during `run`, plus version 0 and the "
        "final one (count); 0: no evaluation during training",
    )
    task: dict[str, Any] | None = Field(
        None,
        description="held-out prompt source: [task] fields that differ from the training "
        "task's (e.g. name = 'jsonl', path = the test file); unset: the training task with "
        "seed task.seed + 1 (generated tasks only). Questions the training task can ask are "
        "kept out of training (generated tasks) or out of the eval set (files)",
    )
    num_prompts: int = Field(32, ge=1, description="held-out prompts evaluated per version")
    k: int = Field(4, ge=0, description="samples per prompt for mean@k and pass@k (0: greedy only)")
    greedy: bool = Field(True, description="also one greedy (temperature 0) sample: pass@1")
    temperature: float | None = Field(
        None, ge=0, description="temperature of the k samples; unset: generator.temperature"
    )
    max_tokens: int | None = Field(
        None, ge=1, description="most tokens per eval completion; unset: generator.max_tokens"
    )
    max_concurrency: int = Field(
        4, ge=1, description="eval requests in flight at once (bounds the load on the servers)"
    )
    reward: RewardConfig | None = Field(
        None, description="reward functions scored on eval completions; unset: [reward]"
    )
    correct_reward: str | None = Field(
        None,
        description="reward component (label or name) that decides a correct answer; "
        "unset: the first reward function",
    )
    correct_threshold: float = Field(
        1.0, description="a completion is correct when that component is >= this"
    )

    @field_validator("task")
    @classmethod
    def _check_task(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            try:
                TaskConfig.model_validate(v)  # field names and types, checked now
            except ValidationError as e:
                why = "; ".join(
                    f"eval.task.{'.'.join(map(str, err['loc']))}: {err['msg']}"
                    for err in e.errors()
                )
                raise ValueError(why) from None
        return v

    wait_timeout_s: float = Field(
        900.0,
        gt=0,
        description="during `run`, the longest the learner waits for the evaluation of a "
        "due version before syncing past it (seconds); then that row is marked or missing",
    )
