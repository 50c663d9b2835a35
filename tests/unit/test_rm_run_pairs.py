"""`rm train --run`: pairs mined within each group of a real run folder (config + buffer)."""

from __future__ import annotations

import itertools
import json

import pytest

from grpo_stream.buffer.schema import Sample
from grpo_stream.buffer.store import open_writer
from grpo_stream.config import Config, write_run_config
from grpo_stream.rm.pairs import PairsError
from grpo_stream.rm.run_pairs import pairs_from_run
from grpo_stream.tasks import make_prompt_source
from grpo_stream.tasks.prompt import chat_messages


def _sample(prompt, i: int, text: str, reward: float, error: str = "") -> Sample:
    return Sample(run_id="r", prompt_id=prompt.prompt_id, sample_index=i, policy_version=0,
                  prompt_ids=[1, 2], completion_ids=[3], behaviour_logprobs=[-0.5],
                  reward=reward, completion_text=text, reward_error=error,
                  reward_components={"numeric_answer": reward})  # fmt: skip


def _run(tmp_path, groups_of) -> tuple[str, list]:
    cfg = Config.model_validate({"task": {"seed": 3, "system_prompt": "Be brief."}})
    run_dir = str(tmp_path / "run")
    write_run_config(cfg, run_dir, "generate")
    prompts = list(itertools.islice(make_prompt_source(cfg.task), 3))
    w = open_writer(cfg.buffer_path(run_dir), run_id="r")
    w.append_groups([groups_of(p) for p in prompts[1:]])  # prompt 0 was never sampled
    w.close()
    return run_dir, prompts


def test_pairs_are_higher_vs_lower_reward_within_each_group(tmp_path) -> None:
    def group(p):
        return [_sample(p, 0, "low", 0.0), _sample(p, 1, "high", 1.0),
                _sample(p, 2, "broken", float("nan"), "numeric_answer: ValueError: x"),
                _sample(p, 3, "mid", 0.5)]  # fmt: skip

    run_dir, prompts = _run(tmp_path, group)
    pairs = pairs_from_run(run_dir, max_pairs_per_group=None)
    assert len(pairs) == 6  # 3 pairs per group, the failed sample never in one
    first = [p for p in pairs if p.prompt_key == prompts[1].prompt_id]
    shown = [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in first]
    assert shown == [("high", "low"), ("high", "mid"), ("mid", "low")]  # widest gap first
    cfg = Config.model_validate({"task": {"seed": 3, "system_prompt": "Be brief."}})
    assert first[0].prompt == chat_messages(prompts[1], cfg.task)  # rebuilt from the config
    assert first[0].prompt[0] == {"role": "system", "content": "Be brief."}
    assert len(pairs_from_run(run_dir, min_margin=0.6)) == 2  # only high vs low
    assert len(pairs_from_run(run_dir, max_pairs_per_group=1)) == 2


def test_a_run_without_preferences_is_refused(tmp_path) -> None:
    run_dir, _ = _run(tmp_path, lambda p: [_sample(p, i, "same", 1.0) for i in range(2)])
    with pytest.raises(PairsError, match="no group has two completions with different rewards"):
        pairs_from_run(run_dir)
    with pytest.raises(PairsError, match="'nope' is not a reward component"):
        pairs_from_run(run_dir, reward_key="nope")


def test_pairs_from_two_runs_split_by_question_not_by_prompt_id(tmp_path) -> None:
    """Two runs of one task: every pair of both, and a question both runs sampled is
    keyed by its rendered prompt, so the split never puts it on both sides."""
    from grpo_stream.rm.pairs import split_by_prompt
    from grpo_stream.rm.run_pairs import pairs_from_runs

    def group(p):
        return [_sample(p, 0, "low", 0.0), _sample(p, 1, "high", 1.0)]

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    run_a, prompts = _run(tmp_path / "a", group)
    run_b, _ = _run(tmp_path / "b", group)
    assert len(pairs_from_runs([run_a])) == 2 and pairs_from_runs([run_a])[0].prompt_key == (
        prompts[1].prompt_id
    )  # one run: keys unchanged
    pairs = pairs_from_runs([run_a, run_b])
    assert len(pairs) == 4 and len({p.prompt_key for p in pairs}) == 2  # 2 questions
    # keyed by the question itself: runs with other seeds name it by another prompt id
    assert {p.prompt_key for p in pairs} == {json.dumps(p.prompt, sort_keys=True) for p in pairs}
    train, held = split_by_prompt(pairs, 0.5)
    assert len(train) == len(held) == 2
    assert not {p.prompt_key for p in train} & {p.prompt_key for p in held}
