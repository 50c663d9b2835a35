"""`run`'s supervision without vLLM: the crash-window policy (a pure function), the
supervisor's restarts of real child processes (small Python programs that crash), the
sync-failure hand-over, the learner's stop signals and the newest complete weights."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from grpo_stream.config import Config
from grpo_stream.learner.shutdown import StopRequested, StopSignals
from grpo_stream.supervise import Commands, CrashWindow, Supervisor, may_restart
from grpo_stream.supervise.servers import newest_weights
from grpo_stream.sync.failure import (
    EXIT_SYNC_FAILED,
    failed_urls,
    take_sync_failure,
    write_sync_failure,
)


def test_may_restart_counts_only_crashes_inside_the_window() -> None:
    assert may_restart([], 100.0, 3, 60.0)
    assert may_restart([50.0, 60.0], 100.0, 3, 60.0)  # 2 earlier inside: the 3rd restart
    assert not may_restart([50.0, 60.0, 90.0], 100.0, 3, 60.0)  # a 4th within 60 s
    assert may_restart([10.0, 20.0, 90.0], 100.0, 3, 60.0)  # 10 and 20 fell out
    assert not may_restart([40.0], 100.0, 1, 60.01)  # 40 is 60 s back: still inside
    assert not may_restart([], 100.0, 0, 60.0)  # max_restarts = 0: never


def test_crash_window_keeps_each_childs_crashes_apart() -> None:
    w = CrashWindow(max_restarts=2, window_s=10.0)
    assert [w.may_restart("gen", t) for t in (0.0, 1.0, 2.0)] == [True, True, False]
    assert w.may_restart("learner", 2.0)  # another child's count is its own
    assert w.may_restart("gen", 20.0)  # the window moved on
    assert w.recent("gen", 20.0) == 1


def test_failed_urls_names_exactly_the_servers_in_the_message() -> None:
    urls = ["http://127.0.0.1:800", "http://127.0.0.1:8000", "http://127.0.0.1:8001"]
    msg = "http://127.0.0.1:8000: reload_weights failed while syncing version 3 ..."
    assert failed_urls(msg, urls) == ["http://127.0.0.1:8000"]
    assert failed_urls("weights folder x does not exist", urls) == []


def _cfg(tmp_path: Path, *overrides: str) -> Config:
    from grpo_stream.config import load_config

    return load_config(None, [f"run.run_dir={tmp_path}", *overrides])


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _supervisor(tmp_path: Path, cfg: Config, gen: str, learn: str) -> Supervisor:
    (tmp_path / "logs").mkdir(exist_ok=True)
    seen = tmp_path / "learner_argv.jsonl"
    # the learner program records its argv (does a restart resume?) and runs `learn`
    record = f"import json,sys; open({str(seen)!r},'a').write(json.dumps(sys.argv[1:])+'\\n')"
    cmds = Commands(
        generator=_py(gen),
        learner=lambda again: _py(f"{record}\n{learn}") + (["--resume"] if again else []),
    )
    return Supervisor(cfg, tmp_path, cmds)


def test_a_child_crashing_again_within_the_window_stops_the_run(tmp_path, capsys) -> None:
    cfg = _cfg(tmp_path, "run.max_restarts=2", "run.restart_window_s=60")
    crash = "import sys; print('generator: out of prompts, crashing'); sys.exit(7)"
    sup = _supervisor(tmp_path, cfg, crash, "import time; time.sleep(60)")
    sup.start()
    t0 = time.monotonic()
    try:
        assert sup.run() == 1
    finally:
        sup.shutdown()
    assert time.monotonic() - t0 < 30
    out = capsys.readouterr().out
    assert "[run] stopping the run: generator exited with code 7" in out
    assert "3 crashes within 60s (run.max_restarts = 2)" in out
    assert "generator: out of prompts, crashing" in out  # its log tail
    rows = [json.loads(x) for x in (tmp_path / "supervisor.jsonl").read_text().splitlines()]
    assert [(r["event"], r["child"], r["exit_code"]) for r in rows] == [
        ("restart", "generator", 7), ("restart", "generator", 7), ("gave_up", "generator", 7)
    ]  # fmt: skip
    assert sup.log.summary() == "restarts/generator 2"
    assert sup.learner.proc.poll() is not None  # shutdown stopped the learner too


def test_a_crashed_learner_is_resumed_and_a_finished_one_ends_the_run(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    marker = tmp_path / "crashed-once"
    learn = (
        f"import os, sys, time\nif not os.path.exists({str(marker)!r}):\n"
        f"    open({str(marker)!r}, 'w').close(); os.kill(os.getpid(), 9)\n"
        "time.sleep(1)"
    )
    sup = _supervisor(tmp_path, cfg, "import time; time.sleep(60)", learn)
    sup.start()
    try:
        assert sup.run() == 0
    finally:
        sup.shutdown()
    argvs = [json.loads(x) for x in (tmp_path / "learner_argv.jsonl").read_text().splitlines()]
    assert argvs == [[], ["--resume"]]
    rows = [json.loads(x) for x in (tmp_path / "supervisor.jsonl").read_text().splitlines()]
    assert [(r["event"], r["child"], r["exit_code"]) for r in rows] == [
        ("restart", "learner", -signal.SIGKILL)
    ]


def test_a_failed_sync_is_handed_over_and_the_learner_resumed(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    marker = tmp_path / "synced-once"
    learn = (
        "import os, sys\nfrom grpo_stream.sync.failure import write_sync_failure\n"
        f"if not os.path.exists({str(marker)!r}):\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        f"    write_sync_failure({str(tmp_path)!r}, 4, 4, RuntimeError('http://x:1: boom'))\n"
        f"    sys.exit({EXIT_SYNC_FAILED})"
    )
    sup = _supervisor(tmp_path, cfg, "import time; time.sleep(60)", learn)
    sup.start()
    try:
        assert sup.run() == 0
    finally:
        sup.shutdown()
    rows = [json.loads(x) for x in (tmp_path / "supervisor.jsonl").read_text().splitlines()]
    assert [(r["event"], r.get("step")) for r in rows] == [("sync_failed", 4), ("restart", None)]
    assert "http://x:1: boom" in rows[0]["error"]
    assert not (tmp_path / "sync_failure.json").exists()  # taken once


def test_sync_failure_record_round_trip(tmp_path) -> None:
    write_sync_failure(str(tmp_path), 3, 3, RuntimeError("http://h:1: down"))
    row = take_sync_failure(str(tmp_path))
    assert (row["step"], row["version"], row["error"]) == (3, 3, "http://h:1: down")
    assert take_sync_failure(str(tmp_path)) is None


def test_a_stalled_learner_is_reported_once(tmp_path, capsys) -> None:
    from grpo_stream.progress import LearnerProgress, write_progress

    cfg = _cfg(tmp_path, "learner.stall_timeout_s=0.5")
    sup = _supervisor(tmp_path, cfg, "import time; time.sleep(60)", "import time; time.sleep(60)")
    sup.start()
    try:
        write_progress(str(tmp_path / "buffer"), LearnerProgress(4, 2, 2))
        time.sleep(1.0)
        sup._check_stall()
        sup._next_stall_check = 0.0
        sup._check_stall()  # the same stall: not again
    finally:
        sup.shutdown()
    out = capsys.readouterr().out
    assert out.count("the learner has made no progress for") == 1
    assert "(step 2; learner.stall_timeout_s = 0.5)" in out
    rows = [json.loads(x) for x in (tmp_path / "supervisor.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in rows] == [("stall", 2)]


def test_stop_signal_cuts_a_wait_short_but_never_a_step() -> None:
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # "during a step": only noted
        assert stop.requested == signal.SIGTERM
        with pytest.raises(StopRequested):
            with stop.interruptible():  # a stop already requested: no wait at all
                pass
    with StopSignals() as stop, pytest.raises(StopRequested):
        with stop.interruptible():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # cut short
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_newest_complete_weights_skips_a_torn_folder(tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    for v in (2, 3):
        (tmp_path / f"v{v}").mkdir()
        save_file({"w": torch.ones(4)}, str(tmp_path / f"v{v}" / "model.safetensors"))
    (tmp_path / "v10.tmp").mkdir()  # unpublished
    assert newest_weights(tmp_path) == (tmp_path / "v3", 3)
    f = tmp_path / "v3" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4])  # torn
    assert newest_weights(tmp_path) == (tmp_path / "v2", 2)
    assert newest_weights(tmp_path / "none") is None
