"""grpo_stream.core.timing / timing_summary: the clocks integrate what they are told, and
the summary turns a run folder's records into utilisation and idle ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpo_stream.core import metric_names as M
from grpo_stream.core.timing import BusyClock, PhaseTimer, Stopwatch, step_phase_sum
from grpo_stream.run.timing_summary import run_times, summary_lines


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_phase_timer_sums_and_resets() -> None:
    c = FakeClock()
    t = PhaseTimer(c)
    with t.phase("a"):
        c.t += 2
    with t.phase("a"):
        c.t += 1
    with t.phase("b"):
        c.t += 0.5
    assert t.take() == {"a": 3.0, "b": 0.5}
    assert t.take() == {}


def test_stopwatch_counts_only_the_on_time() -> None:
    c = FakeClock()
    w = Stopwatch(c)
    w.set(True)
    c.t += 4
    w.set(True)  # already on: no restart
    c.t += 1
    w.set(False)
    c.t += 10
    assert w.seconds() == 5.0
    w.set(True)
    c.t += 2
    assert w.seconds() == 7.0  # a running interval counts


def test_busy_clock_busy_idle_and_mean_in_flight() -> None:
    c = FakeClock()
    b = BusyClock(["s1", "s2"], clock=c)
    c.t += 1  # 1 s with nothing in flight
    b.start("s1")
    c.t += 2
    b.start("s1")  # two on s1
    b.start("s2")
    c.t += 1
    b.stop("s1")
    b.stop("s2")
    c.t += 1
    b.stop("s1")
    c.t += 5
    assert b.busy_s("s1") == pytest.approx(4.0)
    assert b.busy_s("s2") == pytest.approx(1.0)
    assert b.idle_s() == pytest.approx(6.0)
    # area: 2*1 + 3*1 + 1*1 = 6 request-seconds over 10 s
    assert b.mean_in_flight() == pytest.approx(0.6)


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_of_a_run_folder(tmp_path: Path) -> None:
    rows = [
        {M.STEP: 1, M.WAIT_S: 3.0, M.PROXIMAL_S: 1.0, M.TRAIN_S: 4.0, M.SYNC_S: 2.0,
         M.STEP_S: 10.0, M.SYNC_PAUSES: [["http://a", 1008.0, 1010.0]]},
        {M.STEP: 2, M.WAIT_S: 1.0, M.PROXIMAL_S: 1.0, M.TRAIN_S: 4.0, M.SYNC_S: 2.0,
         M.CHECKPOINT_S: 2.0, M.STEP_S: 10.0,
         M.SYNC_PAUSES: [["http://a", 1018.0, 1020.0], ["http://b", 1018.0, 1030.0]]},
    ]  # fmt: skip
    assert step_phase_sum(rows[1]) == 10.0
    _write(tmp_path / "metrics.jsonl", rows)
    gen = {"wall_start": 1000.0, "elapsed_s": 25.0, "gated_s": 6.0, "reward_s": 1.5,
           "in_flight_mean": 1.2, "no_request_s": 5.0,
           "server_busy_s": {"http://a": 15.0, "http://b": 10.0}}  # fmt: skip
    _write(tmp_path / "generator_metrics.jsonl", [{"samples": 1}, gen])
    t = run_times(str(tmp_path))
    assert t["learner"]["wall_s"] == 20.0
    assert t["learner"]["utilisation"] == pytest.approx(10 / 20)
    assert t["learner"]["idle_ratio"] == pytest.approx(4 / 20)
    g = t["generator"]
    assert g["idle_ratio"] == pytest.approx(5 / 25)
    assert g["servers"]["http://a"]["paused_s"] == pytest.approx(4.0)
    assert g["servers"]["http://b"]["paused_s"] == pytest.approx(7.0)  # clipped at 1025
    assert g["servers"]["http://a"]["idle_s"] == pytest.approx(6.0)
    assert g["servers"]["http://b"]["utilisation"] == pytest.approx(0.4)
    lines = summary_lines(str(tmp_path))
    assert lines[0].startswith("learner: utilisation 50%, idle_ratio 0.20")
    assert lines[1].startswith("generator: idle_ratio 0.20")
    assert "paused 7.0s" in lines[3]


def test_timing_plot_draws(tmp_path: Path) -> None:
    from grpo_stream.analysis.timing_plot import plot_timing

    assert plot_timing(tmp_path) is None
    _write(tmp_path / "metrics.jsonl", [{M.STEP: 1, M.WAIT_S: 1.0, M.TRAIN_S: 2.0, M.STEP_S: 3.0}])
    out = plot_timing(tmp_path)
    assert out is not None and out.stat().st_size > 1000
