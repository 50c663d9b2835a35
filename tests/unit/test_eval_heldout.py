"""Held-out eval prompts: distinct, deterministic, and disjoint from training."""

from __future__ import annotations

import json

import pytest

from grpo_stream.config import load_config
from grpo_stream.tasks import TaskError, make_prompt_source
from grpo_stream.tasks.heldout import (
    check_disjoint,
    eval_task,
    heldout_prompts,
    training_exclusion,
)
from grpo_stream.tasks.sources import question_key


def demo_cfg(*overrides: str):
    return load_config("configs/cpu.toml", ["eval.every=4", "eval.num_prompts=32", *overrides])


def test_heldout_prompts_are_distinct_and_deterministic():
    cfg = demo_cfg()
    prompts = heldout_prompts(cfg)
    assert len(prompts) == 32
    assert len({p.text for p in prompts}) == 32
    assert [p.prompt_id for p in heldout_prompts(cfg)] == [p.prompt_id for p in prompts]
    assert eval_task(cfg).seed == cfg.task.seed + 1
    assert all(p.prompt_id.startswith("arithmetic-s1-") for p in prompts)


def test_generated_training_stream_never_asks_a_heldout_question():
    cfg = demo_cfg()
    held = {question_key(p, cfg.task) for p in heldout_prompts(cfg)}
    assert training_exclusion(cfg) == held
    train = make_prompt_source(cfg.task, exclude=training_exclusion(cfg))
    asked = {question_key(next(train), cfg.task) for _ in range(5000)}
    assert not asked & held
    assert len(asked) == 100 - 32  # every other question of 0..9 + 0..9 is still trained on
    check_disjoint(cfg, heldout_prompts(cfg))


def test_check_disjoint_fails_without_the_exclusion():
    cfg = demo_cfg("eval.every=0")  # no evaluation during training: nothing is excluded
    assert training_exclusion(cfg) == frozenset()
    with pytest.raises(TaskError, match="is also a training prompt"):
        check_disjoint(cfg, heldout_prompts(cfg))


def test_too_few_questions_names_the_field():
    with pytest.raises(TaskError, match="eval.num_prompts = 101"):
        heldout_prompts(demo_cfg("eval.num_prompts=101"))


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_file_eval_drops_rows_that_are_training_rows(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"q": f"Q{i}", "a": i} for i in range(6)])
    held = write(tmp_path / "test.jsonl", [{"q": f"Q{i}", "a": i} for i in range(4, 10)])
    cfg = load_config(
        None,
        [
            "task.name=jsonl",
            f"task.path={train}",
            "task.prompt_column=q",
            "task.answer_column=a",
            "eval.every=1",
            "eval.num_prompts=4",
            "eval.task.name=jsonl",
            f"eval.task.path={held}",
        ],
    )
    task = eval_task(cfg)
    assert (task.prompt_column, task.answer_column) == ("q", "a")  # inherited from [task]
    prompts = heldout_prompts(cfg)
    assert [p.text for p in prompts] == ["Q6", "Q7", "Q8", "Q9"]  # Q4, Q5 are training rows
    check_disjoint(cfg, prompts)
    with pytest.raises(TaskError, match="eval.num_prompts = 5"):
        heldout_prompts(
            cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"num_prompts": 5})})
        )


def test_file_training_needs_an_eval_file(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"prompt": "Q", "answer": 1}])
    cfg = load_config(None, ["task.name=jsonl", f"task.path={train}", "eval.every=1"])
    with pytest.raises(TaskError, match="eval.task"):
        heldout_prompts(cfg)
