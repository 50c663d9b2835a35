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
from grpo_stream.run.supervise import Commands, CrashWindow, Supervisor, may_restart
from grpo_stream.run.supervise.servers import newest_weights
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


def _run_to_end(sup: Supervisor) -> int:
    """Start the children, supervise until the run ends (its exit code), shut down."""
    sup.start()
    try:
        return sup.run()
    finally:
        sup.shutdown()


def _rows(tmp_path: Path) -> list[dict]:
    """The supervisor's event log (`RUN_DIR/supervisor.jsonl`)."""
    return [json.loads(x) for x in (tmp_path / "supervisor.jsonl").read_text().splitlines()]


def test_a_child_crashing_again_within_the_window_stops_the_run(tmp_path, capsys) -> None:
    cfg = _cfg(tmp_path, "run.max_restarts=2", "run.restart_window_s=60")
    crash = "import sys; print('generator: out of prompts, crashing'); sys.exit(7)"
    sup = _supervisor(tmp_path, cfg, crash, "import time; time.sleep(60)")
    t0 = time.monotonic()
    assert _run_to_end(sup) == 1
    assert time.monotonic() - t0 < 30
    out = capsys.readouterr().out
    assert "[run] stopping the run: generator exited with code 7" in out
    assert "3 crashes within 60s (run.max_restarts = 2)" in out
    assert "generator: out of prompts, crashing" in out  # its log tail
    rows = _rows(tmp_path)
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
    assert _run_to_end(sup) == 0
    argvs = [json.loads(x) for x in (tmp_path / "learner_argv.jsonl").read_text().splitlines()]
    assert argvs == [[], ["--resume"]]
    rows = _rows(tmp_path)
    assert [(r["event"], r["child"], r["exit_code"]) for r in rows] == [
        ("restart", "learner", -signal.SIGKILL)
    ]


@pytest.mark.parametrize("code", [EXIT_SYNC_FAILED, 1])  # 1: torchrun's own exit code
def test_a_failed_sync_is_handed_over_and_the_learner_resumed(tmp_path, code) -> None:
    cfg = _cfg(tmp_path)
    marker = tmp_path / "synced-once"
    learn = (
        "import os, sys\nfrom grpo_stream.sync.failure import write_sync_failure\n"
        f"if not os.path.exists({str(marker)!r}):\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        f"    write_sync_failure({str(tmp_path)!r}, 4, 4, RuntimeError('http://x:1: boom'))\n"
        f"    sys.exit({code})"
    )
    sup = _supervisor(tmp_path, cfg, "import time; time.sleep(60)", learn)
    assert _run_to_end(sup) == 0
    rows = _rows(tmp_path)
    assert [(r["event"], r.get("step")) for r in rows] == [("sync_failed", 4), ("restart", None)]
    assert "http://x:1: boom" in rows[0]["error"]
    assert not (tmp_path / "sync_failure.json").exists()  # taken once


def test_sync_failure_record_round_trip(tmp_path) -> None:
    write_sync_failure(str(tmp_path), 3, 3, RuntimeError("http://h:1: down"))
    row = take_sync_failure(str(tmp_path))
    assert (row["step"], row["version"], row["error"]) == (3, 3, "http://h:1: down")
    assert take_sync_failure(str(tmp_path)) is None


def _generator_program(tmp_path: Path, reason: str | None) -> str:
    """A generator that counts its runs in RUN/gen_runs, leaves `reason` as its end
    record (none when None: an exit 0 that says nothing) and exits 0."""
    runs, buffer = str(tmp_path / "gen_runs"), str(tmp_path / "buffer")
    write = f"write_generator_end({buffer!r}, {reason!r}, groups=4)" if reason else "pass"
    return (f"from grpo_stream.core.generator_end import write_generator_end\n"
            f"open({runs!r}, 'a').write('run\\n')\n{write}")  # fmt: skip


# the learner trains for a while after the generator's exit: longer than the (lowered) grace
LEARN_AFTER_GENERATOR = (
    "import os, time\nwhile not os.path.exists({runs!r}): time.sleep(0.05)\ntime.sleep(3)"
)


def test_a_generator_that_finished_its_work_is_not_restarted(tmp_path, monkeypatch) -> None:
    from grpo_stream.run.supervise import loop

    monkeypatch.setattr(loop, "GENERATOR_DONE_GRACE_S", 0.2)  # the learner is not done
    cfg = _cfg(tmp_path, "run.max_restarts=2", "run.restart_window_s=60")
    learn = LEARN_AFTER_GENERATOR.format(runs=str(tmp_path / "gen_runs"))
    sup = _supervisor(tmp_path, cfg, _generator_program(tmp_path, "exhausted"), learn)
    assert _run_to_end(sup) == 0
    assert (tmp_path / "gen_runs").read_text() == "run\n"  # once: no restart spent
    rows = _rows(tmp_path)
    assert [(r["event"], r["child"], r["reason"], r["groups"]) for r in rows] == [
        ("generator_done", "generator", "exhausted", 4)
    ]
    assert sup.log.summary() == ""


def test_a_generator_exit_0_that_says_no_reason_is_restarted(tmp_path, monkeypatch) -> None:
    from grpo_stream.run.supervise import loop

    monkeypatch.setattr(loop, "GENERATOR_DONE_GRACE_S", 0.2)
    cfg = _cfg(tmp_path, "run.max_restarts=1", "run.restart_window_s=60")
    learn = LEARN_AFTER_GENERATOR.format(runs=str(tmp_path / "gen_runs"))
    sup = _supervisor(tmp_path, cfg, _generator_program(tmp_path, None), learn)
    assert _run_to_end(sup) == 1  # restarted once, then given up
    assert (tmp_path / "gen_runs").read_text() == "run\nrun\n"
    assert [(r["event"], r["child"]) for r in _rows(tmp_path)] == [
        ("restart", "generator"), ("gave_up", "generator")
    ]  # fmt: skip


def test_a_stalled_learner_is_reported_once(tmp_path, capsys) -> None:
    from grpo_stream.core.progress import LearnerProgress, write_progress

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
    rows = _rows(tmp_path)
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


def test_a_generator_held_at_the_gate_notices_a_dead_server(tmp_path, capsys) -> None:
    """Defect 2: a generator waiting for the learner printed "(waiting for learner)"
    forever and never noticed that its server had died."""
    import asyncio

    from grpo_stream.generator import gate as gate_mod
    from grpo_stream.generator.gate import StalenessGate
    from grpo_stream.generator.pool import ServerPool
    from grpo_stream.serving.client import VLLMClient
    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: a dead server

    async def main() -> tuple[bool, dict]:
        async with VLLMClient(5.0) as client:
            pool = ServerPool([dead], client)
            gate = StalenessGate(str(tmp_path / "buffer"), allowance=0, poll_s=0.05)
            gate.watch = pool.check
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(1.0, stop.set)
            room = await gate.wait_for_room(0, stop)  # held: the learner consumed nothing
            alive = dict(pool.alive)
            await pool.close()
            return room, alive

    old, gate_mod.WATCH_S = gate_mod.WATCH_S, 0.2
    try:
        room, alive = asyncio.run(main())
    finally:
        gate_mod.WATCH_S = old
    assert room is False and alive == {dead: False}
    err = capsys.readouterr().err
    assert err.count(f"vLLM server {dead} does not answer /health") == 1  # said once


def test_a_restarted_server_is_used_again_only_once_resynced() -> None:
    """A server back from a restart serves the initial model (version 0) until the
    supervisor re-syncs it; the pool must not route to it before (samples would be stale)."""
    import asyncio

    from fake_vllm import CannedServer

    from grpo_stream.generator.pool import ServerPool
    from grpo_stream.serving.client import VLLMClient

    async def main() -> list[bool]:
        async with CannedServer() as srv, VLLMClient(5.0) as client:
            srv.script["/health"] = [(200, "")] * 10
            srv.script["/weight_info"] = [(200, '{"weight_version": "0"}')] * 2 + [
                (200, '{"weight_version": "5"}')
            ] * 8
            pool = ServerPool([srv.url], client)
            pool.min_version = lambda: 7 - 2  # learner at version 7, max_staleness 2
            return [await pool._ready(srv.url) for _ in range(3)]

    assert asyncio.run(main()) == [False, False, True]


def test_a_sync_slower_than_sync_timeout_s_in_all_fails_naming_the_server(tmp_path) -> None:
    """Each call answers within its own deadline, but the whole sync (pause, reload,
    version, cache) takes longer than sync.timeout_s: a hang in slices is a hang too."""
    import asyncio

    import torch
    from aiohttp import web
    from fake_vllm import OK_JSON, CannedServer
    from transformers import LlamaConfig, LlamaForCausalLM

    from grpo_stream.config import SyncConfig
    from grpo_stream.sync import WeightSyncError
    from grpo_stream.sync.disk import DiskSync

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2))  # fmt: skip

    async def slow(_request):
        await asyncio.sleep(0.6)
        return web.Response(text="{}", content_type="application/json")

    async def main():
        routes = ["/pause", "/collective_rpc", "/update_weight_version", "/reset_prefix_cache"]
        async with CannedServer({r: [slow] for r in routes} | {"/resume": [OK_JSON]}) as srv:
            sync = DiskSync(SyncConfig(timeout_s=1.0), [srv.url], tmp_path / "w", rank=0)
            t0 = time.monotonic()
            with pytest.raises(WeightSyncError) as info:
                await asyncio.to_thread(sync.push, model, 1)
            return str(info.value), time.monotonic() - t0, srv.paths(), srv.url

    message, took, paths, url = asyncio.run(main())
    assert message.startswith(f"{url}: the sync of version 1 did not finish within")
    assert "sync.timeout_s=1s" in message and "/resume" not in paths
    assert took < 2.0  # not the 2.4 s the four calls take


@pytest.mark.parametrize("deaths, restarts, ok", [(1, 3, True), (2, 2, False)])
def test_a_server_dying_while_it_restarts_is_one_crash_more(
    tmp_path, monkeypatch, capsys, deaths, restarts, ok
) -> None:
    """A server killed again while the supervisor restarts it (before /health): started
    again while run.max_restarts allows (each death counts), else the run stops naming it."""
    from grpo_stream.run.supervise import servers
    from grpo_stream.serving.server import ServerStartError

    calls: list[int] = []

    class Dead:  # the server that crashed: what _restart_server reads of it
        url, log_file = "http://127.0.0.1:9", tmp_path / "vllm-0.log"

    def restart(old, cfg, run_dir, on_started=None):  # fault injection: dies `deaths` times
        calls.append(1)
        if len(calls) <= deaths:
            raise ServerStartError("vLLM server on port 9 exited with code -9 while starting")
        return Dead(), 3

    monkeypatch.setattr(servers, "restart_server", restart)
    Dead.log_file.write_text("engine core: killed\n")
    sup = Supervisor(_cfg(tmp_path, f"run.max_restarts={restarts}"), tmp_path)
    sup.servers = [Dead()]
    assert sup._restart_server(0, -9, "exited") is ok
    assert len(calls) == (deaths + 1 if ok else restarts)
    assert [r["event"] for r in _rows(tmp_path)] == ["restart"] * (len(calls) - (not ok)) + (
        [] if ok else ["gave_up"]
    )
    out = capsys.readouterr().out
    assert "exited while restarting; restarting it again (crash 2 of at most" in out
    assert ("back in" in out) is ok and ("stopping the run: vllm-0" in out) is not ok
