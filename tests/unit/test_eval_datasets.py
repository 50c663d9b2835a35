"""Math datasets as users hold them (GSM8K-style JSONL, MATH-style Parquet), with column
mapping and a prompt template; the fixtures are this project's own problems."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grpo_stream.config import TaskConfig, load_config
from grpo_stream.tasks import make_prompt_source
from grpo_stream.tasks.heldout import eval_task
from grpo_stream.tasks.math_verify import verify_answer
from grpo_stream.tasks.prompt import apply_instruction, strip_instruction

DATA = Path(__file__).parent / "data"
BOXED = "Put your final answer within \\boxed{}."


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_template_with_a_question_placeholder():
    template = "Solve: {question}\n" + BOXED
    text = apply_instruction("What is 2+2?", template)
    assert text == "Solve: What is 2+2?\n" + BOXED  # LaTeX braces survive (no str.format)
    assert strip_instruction(text, template) == "What is 2+2?"
    assert apply_instruction("What is 2+2?", BOXED) == "What is 2+2? " + BOXED
    assert strip_instruction("What is 2+2? " + BOXED, BOXED) == "What is 2+2?"


def test_gsm8k_style_jsonl():
    cfg = TaskConfig(
        name="jsonl",
        path=str(DATA / "gsm8k_style.jsonl"),
        prompt_column="question",
        answer_column="answer",
        instruction="{question}\nPlease reason step by step. " + BOXED,
    )
    prompts = list(make_prompt_source(cfg))
    assert len(prompts) == 8
    assert prompts[0].text.startswith("Lena bakes 4 trays")
    assert prompts[0].text.endswith(BOXED)
    assert prompts[0].answer.endswith("#### 25")
    # the reference solution's "#### N" is what math_verify compares with
    assert verify_answer("So she has \\boxed{25} muffins.", prompts[0].answer) == 1.0
    assert verify_answer("\\boxed{1080}", prompts[6].answer) == 1.0  # "#### 1,080"
    assert verify_answer("\\boxed{24}", prompts[0].answer) == 0.0


def test_math_style_parquet(tmp_path):
    rows = [json.loads(line) for line in (DATA / "math_style.jsonl").read_text().splitlines()]
    path = tmp_path / "math_style.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = TaskConfig(
        name="parquet",
        path=str(path),
        prompt_column="problem",
        answer_column="solution",
        instruction=BOXED,
    )
    prompts = list(make_prompt_source(cfg))
    assert len(prompts) == 6
    assert prompts[0].meta["fields"]["answer"] == "\\frac{5}{6}"
    for p in prompts:  # each solution's \boxed{} matches its own answer column
        assert verify_answer(f"\\boxed{{{p.meta['fields']['answer']}}}", p.answer) == 1.0, p
    assert verify_answer("The sum is $\\boxed{0.8333}$", prompts[0].answer) == 0.0
    assert verify_answer("\\boxed{\\frac{10}{12}}", prompts[0].answer) == 1.0


@pytest.mark.parametrize("name", ["gsm8k", "math"])
def test_shipped_math_configs_parse(name):
    cfg = load_config(f"configs/{name}.toml", [])
    assert cfg.task.name in ("jsonl", "parquet")
    assert [f.name for f in cfg.reward.functions][:1] == ["math_verify"]
    held = eval_task(cfg)  # the test file, read like the training file
    assert held.path != cfg.task.path and held.passes == 1
    assert (held.prompt_column, held.answer_column) == (
        cfg.task.prompt_column,
        cfg.task.answer_column,
    )
    assert held.instruction == cfg.task.instruction and "\\boxed{}" in held.instruction
    assert cfg.eval.correct_reward == "math_verify"
