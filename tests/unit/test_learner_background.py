"""`sync.background` (issue 25): the push and the checkpoint of step N run on one worker
thread while step N+1 trains.

- `StepWriter` alone: progress asked for while a push is in flight is written only when
  that push ends, at its version, never going back; a failed push still checkpoints its
  step, and its error is raised at the next join;
- the real `grpo-stream learn` (in-process, tiny model, real Arrow buffer) against a
  scripted HTTP server (fault injection): every version is pushed in order, and the
  progress the generator reads names version N only after the server took version N;
  the rows carry the learner's waits and the worker's own seconds;
- a push that fails in the background surfaces at the next join: the step it belonged
  to is checkpointed, and so is the newest step, `sync_failure.json` names it;
- a learner killed (SIGKILL) during a background push resumes and trains every group
  exactly once (the ledger agrees).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web
from fake_vllm import OK_JSON
from test_learner_loop import append, groups_with, read_jsonl, tiny  # noqa: F401 (fixture)
from test_learner_sync_failure import ServerThread, cut, learn_overrides

from grpo_stream.cli import main
from grpo_stream.core import metric_names as M
from grpo_stream.core.progress import read_progress
from grpo_stream.learner.background import StepJob, StepWriter
from grpo_stream.run.ledger import compute_ledger
from grpo_stream.sync.base import WeightSyncError
from grpo_stream.sync.failure import EXIT_SYNC_FAILED

ROOT = Path(__file__).parents[2]
ROUTES = ["/pause", "/collective_rpc", "/update_weight_version", "/reset_prefix_cache",
          "/resume"]  # fmt: skip


def test_progress_waits_for_the_push_and_a_failed_push_is_raised_at_the_join() -> None:
    written: list[tuple] = []
    writer = StepWriter(lambda pos, version, step, finished: written.append((pos, version, step)))
    release = threading.Event()
    writer.publish(4, 0, 0)  # nothing in flight: at once
    writer.submit(StepJob(1, 1, 8, push=lambda: release.wait(10) and {}))
    writer.publish(12, 1, 1)  # a refill read meanwhile: held back
    assert written == [(4, 0, 0)]
    with pytest.raises(RuntimeError, match="not joined"):
        writer.submit(StepJob(2, 2, 16))
    release.set()
    waits, metrics = writer.join()
    assert written == [(4, 0, 0), (12, 1, 1)]  # at the push's version, the newest position
    assert set(waits) == {M.EVAL_WAIT_S, M.SYNC_S, M.CHECKPOINT_S}
    assert metrics[M.SYNC_BG_S] > 0

    order: list[str] = []

    def fail() -> dict:
        order.append("push 2")
        raise WeightSyncError("http://h:1: /pause failed")

    job = StepJob(2, 2, 16, push=fail, checkpoint=lambda: order.append("checkpoint 2"))
    writer.submit(job)
    job.pushed.wait(10)
    writer.publish(20, 2, 2)  # after the failed push: written at once
    with pytest.raises(WeightSyncError, match="/pause failed"):
        writer.join()
    assert order == ["push 2", "checkpoint 2"]
    assert written[2:] == [(16, 2, 2), (20, 2, 2)]  # the failed push's step published too
    assert writer.join() == ({}, {})  # raised once
    writer.close()


def progress_at_version_update(run: Path, seen: list):
    """A /update_weight_version handler that notes (new version, the learner's published
    version at that moment)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append((int(body["new_version"]), read_progress(str(run / "buffer")).version))
        return web.Response(text="{}", content_type="application/json")

    return handler


def test_versions_are_pushed_and_published_in_order(tiny, tmp_path: Path, capsys) -> None:  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    append(run, groups_with(set(), [0] * 6))
    seen: list = []
    script = {r: [OK_JSON] for r in ROUTES}
    script["/update_weight_version"] = [progress_at_version_update(run, seen)]
    with ServerThread(script) as srv:
        args = learn_overrides(run, tiny, srv.url, "disk", background=True)
        code = main(["learn", *args, "learner.max_steps=3", "learner.max_staleness=10",
                     "learner.checkpoint_every=1", "learner.keep_checkpoints=3"])  # fmt: skip
        paths = srv.paths()
    assert code == 0, capsys.readouterr().err[-2000:]
    assert paths == ROUTES * 4  # versions 0..3, one whole sync each, never interleaved
    # the generator's gate saw version N only once the server had it
    assert seen == [(0, 0), (1, 0), (2, 1), (3, 2)]
    assert read_progress(str(run / "buffer")).version == 3
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r[M.STEP] for r in rows] == [1, 2, 3]
    # step 1's row joins nothing (version 0 was pushed before training); step 2's joins
    # step 1's push, the last one step 2's and its own
    assert [len(r.get(M.SYNC_PAUSES, [])) for r in rows] == [0, 1, 2]
    assert all(r[M.SYNC_BG_S] > 0 and r[M.CHECKPOINT_BG_S] > 0 for r in rows[1:])
    for step in (1, 2, 3):
        state = json.loads((run / "checkpoints" / f"step-{step}" / "state.json").read_text())
        assert (state["step"], state["version"], state["cursor"]["position"]) == (
            step, step, 2 * step)  # fmt: skip
    model = run / "checkpoints" / "step-3" / "model" / "model.safetensors"
    assert model.stat().st_ino == (run / "weights" / "v3" / "model.safetensors").stat().st_ino


def test_a_background_push_failure_surfaces_at_the_next_join(tiny, tmp_path: Path, capsys) -> None:  # noqa: F811
    """Version 1's push (in the background) hits a dead server while step 2 trains: step
    1 is checkpointed by the worker, step 2 by the learner at its join, and the learner
    exits as a synchronous failure does, without pushing version 2."""
    run = tmp_path / "run"
    run.mkdir()
    append(run, groups_with(set(), [0, 0, 0, 0]))
    script = {"/pause": [OK_JSON, cut]} | {r: [OK_JSON] for r in ROUTES[1:]}
    with ServerThread(script) as srv:
        args = learn_overrides(run, tiny, srv.url, "disk", background=True)
        code = main(["learn", *args, "learner.checkpoint_every=1", "learner.keep_checkpoints=2"])
        paths = srv.paths()
    err = capsys.readouterr().err
    assert code == EXIT_SYNC_FAILED, err[-2000:]
    assert paths[:5] == ROUTES and set(paths[5:]) == {"/pause"}  # only the cut /pause
    for step in (1, 2):
        state = json.loads((run / "checkpoints" / f"step-{step}" / "state.json").read_text())
        assert (state["step"], state["version"]) == (step, step)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in read_jsonl(run / "trained_batches.jsonl")] == [1, 2]
    failure = json.loads((run / "sync_failure.json").read_text())
    assert failure["step"] == 2 and failure["error"].startswith(f"{srv.url}: /pause failed")
    assert "syncing version 1" in failure["error"]
    assert "[learn] weight sync failed after step 2 (checkpoint step-2; " in err
    assert "Traceback" not in err


def test_a_kill_during_a_background_push_resumes_exactly_once(tiny, tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    append(run, groups_with(set(), [0] * 8))
    hung, release = threading.Event(), threading.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        hung.set()
        await asyncio.to_thread(release.wait, 120)  # until the learner is killed
        return web.Response(text="{}")

    more = ["learner.max_steps=4", "learner.max_staleness=10", "learner.checkpoint_every=1",
            "sync.timeout_s=120"]  # fmt: skip
    script = {r: [OK_JSON] for r in ROUTES} | {"/collective_rpc": [OK_JSON, OK_JSON, hang]}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with ServerThread(script) as srv:
        args = learn_overrides(run, tiny, srv.url, "disk", background=True) + more
        proc = subprocess.Popen([sys.executable, "-m", "grpo_stream.cli", "learn", *args],
                                env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert hung.wait(180), "version 2's push never started"
            batches = run / "trained_batches.jsonl"
            deadline = time.monotonic() + 120
            while [r["step"] for r in read_jsonl(batches)] != [1, 2, 3]:
                assert time.monotonic() < deadline and proc.poll() is None, "step 3 not trained"
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            release.set()
    # step 3 trained during version 2's push; step 2's checkpoint waits behind that push
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if "tmp" not in p.name) == [
        "step-1"]  # fmt: skip
    script = {r: [OK_JSON] for r in ROUTES}
    with ServerThread(script) as srv:
        args = learn_overrides(run, tiny, srv.url, "disk", background=True) + more
        assert main(["learn", *args, "--resume"]) == 0
        versions = [c.body["new_version"] for c in srv.calls if c.path == "/update_weight_version"]
    assert versions == ["1", "2", "3", "4"]  # the checkpoint's own first, then each step
    batches = read_jsonl(run / "trained_batches.jsonl")
    assert [(b["step"], b["group_ids"]) for b in batches] == [
        (1, [0, 1]), (2, [2, 3]), (3, [4, 5]), (4, [6, 7])]  # fmt: skip
    led = compute_ledger(str(run), str(run / "buffer"))
    assert led.ok and led.counts["trained"] == 8, led
