"""The generator's staleness gate (issue 12, defect 3): a learner's finish stops a waiting
generator; a finish left from before the generator started does not; a dead learner on
this host is named once. Real progress files, written the way the learner writes them."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

from grpo_stream.core.progress import LearnerProgress, read_progress, write_progress
from grpo_stream.generator.gate import StalenessGate, pid_alive


def _later(seconds: float, fn, *args) -> threading.Timer:
    t = threading.Timer(seconds, fn, args)
    t.start()
    return t


def test_room_is_granted_at_once_below_the_allowance(tmp_path) -> None:
    write_progress(str(tmp_path), LearnerProgress(consumed_groups=4, step=1))
    gate = StalenessGate(str(tmp_path), allowance=2)

    async def main() -> bool:
        return await gate.wait_for_room(5, asyncio.Event())  # 5 < 4 + 2

    assert asyncio.run(main()) is True
    assert gate.gated is False


def test_a_learner_finishing_while_the_generator_waits_stops_it(tmp_path, capsys) -> None:
    buf = str(tmp_path)
    write_progress(buf, LearnerProgress(consumed_groups=2, step=1))
    gate = StalenessGate(buf, allowance=2, poll_s=0.05)

    async def main() -> tuple[bool, float]:
        await gate.start()
        t0 = time.monotonic()
        timer = _later(0.3, write_progress, buf, LearnerProgress(4, 2, 2, finished=True))
        try:
            # reserved 6 needs consumed > 4: the learner finished at 4, so it never comes
            ok = await asyncio.wait_for(gate.wait_for_room(6, asyncio.Event()), 10)
        finally:
            timer.join()
        return ok, time.monotonic() - t0

    ok, waited = asyncio.run(main())
    assert ok is False
    assert gate.finished_step == 2
    assert 0.25 < waited < 3.0
    assert "the learner finished (step 2, 4 groups consumed); stopping" in capsys.readouterr().err


def test_a_finish_from_before_the_generator_started_does_not_stop_it(tmp_path) -> None:
    buf = str(tmp_path)
    write_progress(buf, LearnerProgress(consumed_groups=4, step=2, finished=True))
    gate = StalenessGate(buf, allowance=2, poll_s=0.05)

    async def main() -> bool:
        await gate.start()  # e.g. `run --resume` of a finished run, learner not yet up
        # a resumed learner publishes finished=False, then consumes two more groups
        _later(0.3, write_progress, buf, LearnerProgress(6, 3, 3)).join()
        return await asyncio.wait_for(gate.wait_for_room(7, asyncio.Event()), 10)

    assert asyncio.run(main()) is True
    assert gate.finished_step is None


def test_stop_request_ends_the_wait(tmp_path) -> None:
    gate = StalenessGate(str(tmp_path), allowance=1, poll_s=0.05)

    async def main() -> bool:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.2, stop.set)
        return await asyncio.wait_for(gate.wait_for_room(5, stop), 10)

    assert asyncio.run(main()) is False
    assert gate.finished_step is None and gate.gated is False


def test_a_dead_learner_on_this_host_is_named_once(tmp_path, capsys) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not pid_alive(dead.pid)
    path = tmp_path / "consumers" / "learner.json"
    path.parent.mkdir()
    row = {"consumed_groups": 2, "version": 1, "step": 1, "time": time.time(),
           "finished": False, "pid": dead.pid, "host": socket.gethostname()}  # fmt: skip
    path.write_text(json.dumps(row))
    gate = StalenessGate(str(tmp_path), allowance=1, poll_s=0.05)

    async def main() -> bool:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, stop.set)  # ~10 polls
        return await gate.wait_for_room(5, stop)

    assert asyncio.run(main()) is False
    err = capsys.readouterr().err
    assert err.count(f"the learner (pid {dead.pid} on {socket.gethostname()}, step 1) is gone") == 1


def test_progress_stamps_the_writer_and_reads_old_and_newer_files(tmp_path) -> None:
    write_progress(str(tmp_path), LearnerProgress(3, 1, 1))
    p = read_progress(str(tmp_path))
    assert (p.pid, p.host, p.finished) == (os.getpid(), socket.gethostname(), False)
    path = tmp_path / "consumers" / "learner.json"
    path.write_text(json.dumps({"consumed_groups": 5, "version": 2, "step": 2, "time": 1.0}))
    assert read_progress(str(tmp_path)) == LearnerProgress(5, 2, 2, 1.0)  # an old learner's
    path.write_text(json.dumps({"consumed_groups": 5, "version": 2, "step": 2, "time": 1.0,
                                "lineage": "abc"}))  # fmt: skip
    assert read_progress(str(tmp_path)).consumed_groups == 5  # a newer learner's field


def test_run_treats_a_generator_that_stopped_for_a_finished_learner_as_normal(tmp_path) -> None:
    """`run`'s supervisor: the generator now exits 0 by itself when the learner finishes,
    usually a moment before the learner process ends. That must not fail the run (it
    returned 1, "generator exited with 0"); a generator that fails still does."""
    from supervise_helpers import supervise

    from grpo_stream.run.orchestrate import Child

    def child(name: str, code: str) -> Child:
        return Child(name, [sys.executable, "-c", code], tmp_path / f"{name}.log", echo=False)

    learner = child("learner", "import time; time.sleep(1.5)")  # ends after the generator
    generator = child("generator", "pass")
    t0 = time.monotonic()
    assert supervise(learner, generator, []) == 0
    assert time.monotonic() - t0 >= 1.0  # it waited for the learner's own exit
    learner = child("learner2", "import time; time.sleep(30)")
    failing = child("generator2", "raise SystemExit(3)")
    try:
        assert supervise(learner, failing, []) == 1
    finally:
        learner.stop(5)
