"""An evaluation's row from hand-made results, RUN/eval.jsonl, the table and summary."""

from __future__ import annotations

import json
import math

import pytest

from grpo_stream.eval.evaluate import PromptResult, Scored, correct_key, summarize
from grpo_stream.eval.record import (
    EvalLog,
    format_table,
    read_eval_rows,
    run_summary,
    summary_line,
)


def s(correct: bool, reward: float, tokens: int = 10, truncated: bool = False) -> Scored:
    return Scored(correct, reward, {"math_verify": float(correct), "fmt": 0.5}, tokens, truncated)


def results() -> list[PromptResult]:
    a = PromptResult([s(True, 1.0)], [s(True, 1.0), s(False, 0.0), s(False, 0.0), s(False, 0.0)])
    b = PromptResult([s(False, 0.0)], [s(False, 0.0, 30, True)] * 4)
    c = PromptResult(failed=True)  # its requests failed for good: left out
    a.versions, b.versions = {3}, {3}
    return [a, b, c]


def test_summarize_by_hand():
    row = summarize(results(), k=4, greedy=True, eval_s=2.5, step=3, model="")
    assert row.policy_version == 3 and not row.version_mismatch
    assert row.prompts == 2 and row.failed_prompts == 1
    assert row.greedy_pass_at_1 == 0.5
    assert row.mean_at_k == pytest.approx((1 / 4 + 0) / 2)
    assert row.pass_at_k == pytest.approx((1.0 + 0.0) / 2)  # n = k: any correct sample
    assert row.reward_mean == pytest.approx(1 / 8)
    assert row.reward_components == {"fmt": 0.5, "math_verify": pytest.approx(1 / 8)}
    assert row.length_mean == pytest.approx((4 * 10 + 4 * 30) / 8)
    assert row.truncated_frac == 0.5
    assert row.greedy_reward_mean == 0.5


def test_mixed_versions_are_marked_and_failed_rewards_counted():
    rs = results()
    rs[1].versions = {3, 4}
    rs[1].samples[0] = Scored(False, math.nan, {"math_verify": math.nan, "fmt": 0.5}, 5, False)
    row = summarize(rs, k=4, greedy=True, eval_s=1.0, step=None, model="")
    assert row.version_mismatch and row.versions_seen == [3, 4] and row.policy_version == 3
    assert row.reward_failed == 1
    assert row.reward_mean == pytest.approx(1 / 7)  # the failed one is left out of the mean


def test_greedy_only():
    row = summarize(results(), k=0, greedy=True, eval_s=1.0, step=None, model="m")
    assert row.mean_at_k is None and row.pass_at_k is None and row.greedy_pass_at_1 == 0.5


def test_correct_key():
    assert correct_key(["numeric_answer", "concise_answer"], None) == "numeric_answer"
    assert correct_key(["a", "b"], "b") == "b"
    with pytest.raises(ValueError, match="eval.correct_reward"):
        correct_key(["a"], "c")


def test_eval_log_table_and_summary(tmp_path):
    log = EvalLog(str(tmp_path), tensorboard=False)
    for version, greedy in ((0, 0.25), (4, 0.5)):
        row = summarize(results(), k=4, greedy=True, eval_s=2.0, step=version, model="")
        row.policy_version, row.greedy_pass_at_1 = version, greedy
        log.write(row)
    log.close()
    rows = read_eval_rows(str(tmp_path))
    assert [r["policy_version"] for r in rows] == [0, 4]
    assert json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[0])["k"] == 4
    table = format_table(rows).splitlines()
    assert table[0].split()[:3] == ["version", "prompts", "k"] and len(table) == 3
    assert summary_line(rows) == (
        "held-out pass@1 (greedy) on 2 prompts: 0.250 at v0 -> 0.500 at v4 (2 evals, 4 s)"
    )


def test_run_summary_reports_the_cost(tmp_path):
    log = EvalLog(str(tmp_path), tensorboard=False)
    for version, end in ((0, 110.0), (4, 200.0), (8, 300.0)):
        row = summarize(results(), k=4, greedy=True, eval_s=10.0, step=version, model="")
        row.policy_version, row.time = version, end
        log.write(row)
    metrics = [{"step": 1, "eval_wait_s": 0.5}, {"step": 2}, {"step": 5, "eval_wait_s": 2.0}]
    line = run_summary(str(tmp_path), metrics)
    assert line.endswith(
        "(3 evals, 30 s, busy 15% of the 200 s they spanned); the learner waited 2 s for it"
    )


def test_the_printed_line_leaves_out_what_was_not_measured():
    from grpo_stream.eval.follow import eval_line

    both = summarize(results(), k=4, greedy=True, eval_s=2.5, step=3, model="")
    assert eval_line(both) == (
        "pass@1 (greedy) 0.500 | mean@4 0.125 | pass@4 0.500 | reward 0.125 | 2.5s"
    )
    greedy_only = [PromptResult(r.greedy, [], r.failed) for r in results()]
    for r in greedy_only:
        r.versions = {3}
    row = summarize(greedy_only, k=0, greedy=True, eval_s=1.0, step=3, model="")
    assert eval_line(row) == "pass@1 (greedy) 0.500 | reward 0.500 | 1.0s"
