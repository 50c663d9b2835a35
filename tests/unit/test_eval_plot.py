"""Eval curves in `grpo-stream plot`, and eval scalars in TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpo_stream.analysis.plot_cli import plot_cli
from grpo_stream.eval.evaluate import PromptResult, Scored, summarize
from grpo_stream.eval.plot import eval_series
from grpo_stream.eval.record import EvalLog

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    metrics = [{"step": s, "policy_version": s, "reward_mean": 0.1 * s} for s in range(1, 5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    rows = [
        {"policy_version": v, "time": 100.0 + 10 * v, "prompts": 8, "k": 4,
         "greedy_pass_at_1": g, "mean_at_k": g / 2, "pass_at_k": None}
        for v, g in ((0, 0.25), (2, 0.5), (4, 0.75))
    ]  # fmt: skip
    (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_eval_series_by_version_and_wall_time(tmp_path):
    write_run(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert eval_series(rows, "greedy_pass_at_1", "version") == ([0.0, 2.0, 4.0], [0.25, 0.5, 0.75])
    assert eval_series(rows, "mean_at_k", "wall") == ([0.0, 20.0, 40.0], [0.125, 0.25, 0.375])
    assert eval_series(rows, "pass_at_k", "version") == ([], [])


def test_plot_draws_eval_curves_when_the_run_has_them(tmp_path, capsys):
    write_run(tmp_path / "run")
    assert plot_cli([str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "eval.png").read_bytes()[:8] == PNG_MAGIC
    assert "held-out evaluation" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5}\n')
    assert plot_cli([str(tmp_path / "other")]) == 0
    assert not (tmp_path / "other" / "eval.png").exists()


def test_eval_scalars_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = EvalLog(str(tmp_path))
    result = PromptResult([Scored(True, 1.0, {"m": 1.0}, 3, False)], [], {2})
    log.write(summarize([result], k=0, greedy=True, eval_s=1.0, step=2, model=""))
    log.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    (event,) = acc.Scalars("eval/greedy_pass_at_1")
    assert (event.step, event.value) == (2, 1.0)
    assert acc.Scalars("eval/reward/m")[0].value == 1.0
