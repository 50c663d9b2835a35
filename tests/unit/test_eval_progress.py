"""The learner's wait for the evaluator: only due versions, until the row is published."""

from __future__ import annotations

import threading
import time

from grpo_stream.config.evaluation import EvalConfig
from grpo_stream.core.eval_progress import (
    eval_due,
    read_eval_progress,
    wait_for_eval,
    write_eval_progress,
)
from grpo_stream.core.metric_names import EVAL_WAIT_S


def test_due_versions():
    assert [v for v in range(10) if eval_due(4, v)] == [0, 4, 8]
    assert [v for v in range(3) if eval_due(1, v)] == [0, 1, 2]
    assert not any(eval_due(0, v) for v in range(5))  # eval.every = 0: never waits


def test_waits_until_the_evaluator_publishes_the_version(tmp_path):
    buf = str(tmp_path / "buffer")
    assert read_eval_progress(buf) == -1
    cfg = EvalConfig(every=2, wait_timeout_s=30)
    assert wait_for_eval(buf, cfg, 1) == {}  # not due: no wait, no metric
    timer = threading.Timer(0.6, write_eval_progress, (buf, 2))
    timer.start()
    t0 = time.monotonic()
    waited = wait_for_eval(buf, cfg, 2)[EVAL_WAIT_S]
    assert 0.5 < waited < 5 and time.monotonic() - t0 < 5
    assert read_eval_progress(buf) == 2
    assert wait_for_eval(buf, cfg, 0)[EVAL_WAIT_S] < 0.5  # already past it


def test_gives_up_after_the_timeout(tmp_path, capsys):
    cfg = EvalConfig(every=1, wait_timeout_s=0.5)
    waited = wait_for_eval(str(tmp_path), cfg, 3)[EVAL_WAIT_S]
    assert 0.5 <= waited < 3
    assert "no evaluation of version 3" in capsys.readouterr().err
