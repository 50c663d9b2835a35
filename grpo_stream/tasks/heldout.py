"""The held-out eval prompts, and keeping them out of training.

    task = eval_task(cfg)                 # [eval.task] over [task]; default: seed + 1
    prompts = heldout_prompts(cfg)        # eval.num_prompts distinct prompts, deterministic
    source = make_prompt_source(cfg.task, exclude=training_exclusion(cfg))  # the generator

Prompts are compared by their question (`question_key`: the text without the task's
instruction). Disjointness is made, then checked:
- a generated training task (arithmetic, countdown) draws from a finite space of
  questions that it would revisit, so with `eval.every > 0` the generator leaves the
  held-out questions out of its stream (`training_exclusion`);
- a training file is finite: eval prompts whose question is in it are dropped from the
  eval set (`heldout_prompts` reads it).
`check_disjoint` verifies either case on the first prompts of the real training stream.
"""

from __future__ import annotations

import itertools
import logging

from grpo_stream.config import Config, TaskConfig
from grpo_stream.tasks.prompt import Prompt, TaskError
from grpo_stream.tasks.sources import make_prompt_source, question_key

log = logging.getLogger(__name__)

GENERATED_TASKS = ("arithmetic", "countdown")
MAX_DRAWS_PER_PROMPT = 200  # a generated eval task gives up after this many draws per prompt


def eval_task(cfg: Config) -> TaskConfig:
    """The eval prompt source: the fields given in [eval.task] over the training task's
    (a different task keeps its own default instruction); the seed is task.seed + 1
    unless [eval.task] sets one."""
    base = cfg.task.model_dump()
    base["seed"] = cfg.task.seed + 1
    base["num_prompts"] = None
    given = cfg.eval.task
    if given is None:
        if cfg.task.name not in GENERATED_TASKS:
            raise TaskError(
                f"eval.task: task.name = {cfg.task.name!r} is a file; set a held-out file "
                "(eval.task.path, with eval.task.name) for the evaluation"
            )
        return TaskConfig(**base)
    overrides = dict(given)  # only the fields [eval.task] gives (kept so in RUN/config.toml)
    if overrides.get("name", cfg.task.name) != cfg.task.name and "instruction" not in overrides:
        base.pop("instruction")  # the other task's default instruction
    base.update(overrides)
    if base["name"] not in GENERATED_TASKS:
        base["passes"] = overrides.get("passes", 1)
    return TaskConfig(**base)


def _file_questions(task: TaskConfig) -> frozenset[str]:
    one_pass = task.model_copy(update={"passes": 1, "shuffle": False, "num_prompts": None})
    return frozenset(question_key(p, task) for p in make_prompt_source(one_pass))


def heldout_prompts(cfg: Config) -> list[Prompt]:
    """`eval.num_prompts` prompts with distinct questions, none of them a training one."""
    task, n = eval_task(cfg), cfg.eval.num_prompts
    banned = frozenset() if cfg.task.name in GENERATED_TASKS else _file_questions(cfg.task)
    out: list[Prompt] = []
    seen: set[str] = set()
    dropped = 0
    limit = MAX_DRAWS_PER_PROMPT * n if task.name in GENERATED_TASKS else None
    for prompt in itertools.islice(make_prompt_source(task), limit):
        key = question_key(prompt, task)
        if key in banned:
            dropped += 1
        elif key not in seen:
            seen.add(key)
            out.append(prompt)
            if len(out) == n:
                break
    if dropped:
        log.warning("eval: %d held-out prompts dropped: their question is in task.path", dropped)
    if len(out) < n:
        raise TaskError(
            f"eval.num_prompts = {n}: the eval task ({task.name}) has only {len(out)} distinct "
            f"questions that are not training ones; lower eval.num_prompts or widen eval.task"
        )
    return out


def training_exclusion(cfg: Config) -> frozenset[str]:
    """The questions a generated training task must skip while `eval.every > 0` (the
    held-out ones); empty otherwise (a training file is handled on the eval side)."""
    if cfg.eval.every <= 0 or cfg.task.name not in GENERATED_TASKS:
        return frozenset()
    task = eval_task(cfg)
    return frozenset(question_key(p, task) for p in heldout_prompts(cfg))


def check_disjoint(cfg: Config, prompts: list[Prompt], draws: int = 10_000) -> None:
    """TaskError if any of the first `draws` training prompts (as the generator makes
    them, with `training_exclusion`) asks a question of `prompts`."""
    task = eval_task(cfg)
    held = {question_key(p, task) for p in prompts}
    train = make_prompt_source(cfg.task, exclude=training_exclusion(cfg))
    for prompt in itertools.islice(train, draws):
        if question_key(prompt, cfg.task) in held:
            raise TaskError(
                f"eval: the held-out question {question_key(prompt, cfg.task)!r} is also a "
                f"training prompt ({prompt.prompt_id}); set eval.every > 0 during training "
                "or choose a disjoint eval.task"
            )
