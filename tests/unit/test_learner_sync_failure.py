"""Defect 2 (issue 12): a vLLM server that dies between two syncs killed the learner
with a raw ClientConnectorError at its next sync, losing the step it had just trained.

Now the learner (the real `grpo-stream learn` entry point, in-process, tiny model, real
Arrow buffer) checkpoints that step, keeps its metrics row, leaves RUN/sync_failure.json
naming the server for `run`'s supervisor, and exits with EXIT_SYNC_FAILED and one line.
The server is a scripted HTTP server (fault injection) that accepts the first push and
then cuts the connection, as a killed server does. Under NCCL sync (issue 20 defect 8)
a server whose /resume fails after the transfer is handled the same way.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from aiohttp import web
from fake_vllm import OK_JSON, CannedServer
from test_learner_loop import append, groups_with, read_jsonl, tiny  # noqa: F401 (fixture)
from test_sync_failures import NCCL_ROUTES, FakeNCCLEngine

from grpo_stream.cli import main
from grpo_stream.sync.failure import EXIT_SYNC_FAILED
from grpo_stream.sync.nccl import NCCLSync, _ServersClient


class ServerThread:
    """A CannedServer on its own event loop in a thread (the learner blocks this one)."""

    def __init__(self, script: dict) -> None:
        self.srv = CannedServer(script)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.srv.__aenter__())
        self._ready.set()
        self.loop.run_forever()

    def __enter__(self) -> CannedServer:
        self._thread.start()
        self._ready.wait(10)
        return self.srv

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.srv.__aexit__(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


async def cut(request: web.Request) -> web.StreamResponse:
    """The server dies mid-call: the connection is dropped, no answer."""
    request.transport.close()
    return web.Response(text="{}")


def learn_overrides(run: Path, model: Path, url: str, transport: str,
                    background: bool = False) -> list[str]:  # fmt: skip
    """`grpo-stream learn` for 2 steps of 2 groups against the scripted server at `url`
    (the synchronous push unless `background`: test_learner_background.py has that)."""
    return [f"run.run_dir={run}", f"model.path={model}", f'server.urls=["{url}"]',
            f"sync.transport={transport}", "sync.timeout_s=10", "learner.device=cpu",
            f"sync.background={str(background).lower()}",
            "learner.num_threads=1", "learner.max_steps=2", "learner.batch_groups=2",
            "learner.micro_batch_size=4", "learner.checkpoint_every=100",
            "learner.wait_timeout_s=60"]  # fmt: skip


def test_a_dead_server_at_sync_keeps_the_trained_step(tiny, tmp_path: Path, capsys) -> None:  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    append(run, groups_with(set(), [0, 0, 0, 0]))
    routes = ["/collective_rpc", "/update_weight_version", "/reset_prefix_cache", "/resume"]
    script = {"/pause": [OK_JSON, cut]} | {r: [OK_JSON] for r in routes}
    with ServerThread(script) as srv:
        code = main(["learn", *learn_overrides(run, tiny, srv.url, "disk")])
        paths = srv.paths()
    err = capsys.readouterr().err
    assert code == EXIT_SYNC_FAILED, err[-2000:]
    assert paths[:5] == ["/pause", *routes]  # the fresh learner's push of version 0
    assert set(paths[5:]) == {"/pause"}  # then only the cut /pause (and its retries)
    state = json.loads((run / "checkpoints" / "step-1" / "state.json").read_text())
    assert (state["step"], state["version"]) == (1, 1)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    assert [r["step"] for r in read_jsonl(run / "trained_batches.jsonl")] == [1]
    failure = json.loads((run / "sync_failure.json").read_text())
    assert failure["step"] == 1 and failure["error"].startswith(f"{srv.url}: /pause failed")
    assert "[learn] weight sync failed after step 1 (checkpoint step-1; " in err
    assert "Traceback" not in err


def test_a_failed_nccl_resume_keeps_the_trained_step(
    tiny,  # noqa: F811
    tmp_path: Path,
    capsys,
    monkeypatch,
) -> None:
    """NCCL sync: the weights reached the server but its /resume failed. The learner
    keeps the step as for any failed sync (checkpoint, sync_failure.json, exit code).
    No GPU here: the rendezvous is replaced by the fake engine, which drives the real
    `_ServersClient` over HTTP; pause, version, cache reset and resume are the product's."""

    def connect(self: NCCLSync, module) -> None:
        self.client = _ServersClient(self.urls, [1] * len(self.urls), self.cfg.timeout_s)
        self.engine, self.device, self._module = FakeNCCLEngine(self.client), -1, module

    monkeypatch.setattr(NCCLSync, "_connect", connect)
    run = tmp_path / "run"
    run.mkdir()
    append(run, groups_with(set(), [0, 0, 0, 0]))
    routes = ["/pause", *NCCL_ROUTES, "/reset_prefix_cache"]
    script = {r: [OK_JSON] for r in routes} | {"/resume": [OK_JSON, (500, "engine core died")]}
    with ServerThread(script) as srv:
        code = main(["learn", *learn_overrides(run, tiny, srv.url, "nccl")])
        paths = srv.paths()
    err = capsys.readouterr().err
    assert code == EXIT_SYNC_FAILED, err[-2000:]
    assert paths[:6] == [*routes, "/resume"]  # the fresh learner's push of version 0
    assert paths[6:11] == routes and set(paths[11:]) == {"/resume"}  # version 1: not resumed
    state = json.loads((run / "checkpoints" / "step-1" / "state.json").read_text())
    assert (state["step"], state["version"]) == (1, 1)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    failure = json.loads((run / "sync_failure.json").read_text())
    assert failure["step"] == 1
    assert failure["error"].startswith(f"{srv.url}: /resume failed after version 1 was sent")
    assert "Traceback" not in err


def test_the_first_push_waits_for_a_starting_server(tiny, tmp_path: Path, capsys) -> None:  # noqa: F811
    """`run` starts its servers and the learner together: the learner's first push waits
    until /health answers 200, then pushes version 0 (no failed sync, no restart)."""
    run = tmp_path / "run"
    run.mkdir()
    append(run, groups_with(set(), [0, 0, 0, 0]))
    routes = ["/pause", "/collective_rpc", "/update_weight_version", "/reset_prefix_cache",
              "/resume"]  # fmt: skip
    script = {"/health": [(503, "loading"), (503, "loading"), (200, "")]}
    with ServerThread(script | {r: [OK_JSON] for r in routes}) as srv:
        code = main(["learn", *learn_overrides(run, tiny, srv.url, "disk")])
        calls = srv.paths(skip=())
    assert code == 0, capsys.readouterr().err[-2000:]
    assert calls[:4] == ["/health"] * 3 + ["/pause"]
    assert calls[3:8] == routes  # version 0, then each step's push
