"""Weight sync against scripted fake servers: the call order, and no /resume after a failure.

A server whose reload (disk) or transfer (NCCL, after /start_weight_update) failed may
hold half-updated weights; resuming it would serve them. These tests inject the
failures with `fake_vllm.CannedServer` (a real HTTP server that records every call) and
check that the push raises `WeightSyncError` naming the server and never calls /resume
on it, while servers that are intact are resumed. The NCCL engine is a fake too (no GPU
here): it drives the real `_ServersClient` over HTTP in the order vLLM's
`NCCLTrainerWeightTransferEngine.send_weights` does, and can fail or block its
broadcast (a failed /resume and `sync.timeout_s` over the whole NCCL sync are errors too).
"""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import pytest
import torch
from fake_vllm import OK_JSON, CannedServer

from grpo_stream.config import Config, SyncConfig
from grpo_stream.core.errors import UserError
from grpo_stream.sync import NoSync, WeightSync, WeightSyncError, make_weight_sync
from grpo_stream.sync.disk import DiskSync
from grpo_stream.sync.nccl import NCCLSync, _ServersClient

DISK_ROUTES = ["/pause", "/collective_rpc", "/update_weight_version", "/reset_prefix_cache"]
NCCL_ROUTES = ["/start_weight_update", "/update_weights", "/finish_weight_update"]


def ok_script(routes: list[str]) -> dict:
    return {r: [OK_JSON] for r in [*routes, "/resume", "/shutdown_weight_transfer_engine"]}


async def disk_push(tmp: Path, model, servers: list[CannedServer], version: int = 1):
    sync = DiskSync(SyncConfig(timeout_s=10), [s.url for s in servers], tmp / "w", rank=0)
    return await asyncio.to_thread(sync.push, model, version)


def test_disk_push_calls_every_route_in_order(tmp_path: Path, tiny_lm) -> None:
    async def main():
        async with CannedServer(ok_script(DISK_ROUTES)) as srv:
            m = await disk_push(tmp_path, tiny_lm, [srv], version=3)
            return m, srv.paths(), srv.calls

    m, paths, calls = asyncio.run(main())
    assert paths == [*DISK_ROUTES, "/resume"]
    assert calls[0].query == {"mode": "wait"}
    folder = tmp_path / "w" / "v3"
    assert calls[1].body == {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}}
    assert calls[2].body == {"new_version": "3"}
    assert (folder / "model.safetensors").is_file()
    assert m["sync_s"] >= m["sync_pause_s"] > 0 and m["sync_save_s"] > 0


@pytest.mark.parametrize("failing", ["/collective_rpc", "/update_weight_version"])
def test_disk_failure_leaves_the_server_paused(tmp_path: Path, tiny_lm, failing: str) -> None:
    async def main():
        script = ok_script(DISK_ROUTES) | {failing: [(500, "Call to reload_weights failed")]}
        async with CannedServer(script) as srv:
            with pytest.raises(WeightSyncError) as info:
                await disk_push(tmp_path, tiny_lm, [srv])
            return str(info.value), srv.paths(), srv.url

    message, paths, url = asyncio.run(main())
    assert "/resume" not in paths
    assert paths[-1] == failing  # nothing after the failed step
    assert message.startswith(f"{url}: ") and "left paused" in message
    assert "Call to reload_weights failed" in message


def test_disk_failure_on_one_server_resumes_only_the_others(tmp_path: Path, tiny_lm) -> None:
    async def main():
        bad_script = ok_script(DISK_ROUTES) | {"/collective_rpc": [(500, "torn file")]}
        async with CannedServer(ok_script(DISK_ROUTES)) as good, CannedServer(bad_script) as bad:
            with pytest.raises(WeightSyncError) as info:
                await disk_push(tmp_path, tiny_lm, [good, bad])
            return str(info.value), good.paths(), bad.paths(), good.url, bad.url

    message, good_paths, bad_paths, good_url, bad_url = asyncio.run(main())
    assert good_paths == [*DISK_ROUTES, "/resume"]  # whole new weights: serves again
    assert bad_paths == ["/pause", "/collective_rpc"]  # never resumed
    assert bad_url in message and good_url not in message


def test_disk_push_off_rank_0_sends_nothing(tmp_path: Path, tiny_lm) -> None:
    sync = DiskSync(SyncConfig(), ["http://127.0.0.1:9"], tmp_path / "w", rank=1)
    assert sync.push(tiny_lm, 1) == {} and not (tmp_path / "w").exists()
    sync.close()
    sync.close()


class FakeNCCLEngine:
    """vLLM's trainer engine's HTTP sequence (start → update ∥ broadcast → finish)
    through the real `_ServersClient`; `broadcast_error` fails the broadcast, `hang`
    (an Event) blocks it until set, as a peer that never joins the group does."""

    def __init__(self, client: _ServersClient, broadcast_error: str | None = None,
                 hang: threading.Event | None = None):  # fmt: skip
        self.client, self.broadcast_error, self.hang = client, broadcast_error, hang
        self.shutdowns = 0

    def send_weights(self) -> None:
        self.client.start_weight_update()
        self.client.update_weights({"names": ["w"], "dtype_names": ["bfloat16"], "shapes": [[2]]})
        if self.hang is not None:
            self.hang.wait()
        if self.broadcast_error:
            raise RuntimeError(self.broadcast_error)
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.shutdowns += 1


def nccl_sync(servers: list[CannedServer], broadcast_error: str | None = None,
              timeout_s: float = 10, hang: threading.Event | None = None) -> NCCLSync:  # fmt: skip
    """An NCCLSync past its rendezvous (engine and client set), on the CPU."""
    urls = [s.url for s in servers]
    sync = NCCLSync(SyncConfig(transport="nccl", timeout_s=timeout_s), urls, rank=0)
    sync.client = _ServersClient(urls, [1] * len(urls), timeout_s=10)
    sync.engine = FakeNCCLEngine(sync.client, broadcast_error, hang)
    sync._module = module = torch.nn.Linear(2, 2)
    sync.device = -1  # what `on_device` makes current: torch.cuda.device(-1) is a no-op
    return sync, module


def test_nccl_push_calls_every_route_in_order() -> None:
    async def main():
        async with CannedServer(ok_script(["/pause", *NCCL_ROUTES, "/reset_prefix_cache"])) as s:
            sync, module = nccl_sync([s])
            m = await asyncio.to_thread(sync.push, module, 7)
            await asyncio.to_thread(sync.close)
            return m, s.paths(), s.calls

    m, paths, calls = asyncio.run(main())
    assert paths == ["/pause", *NCCL_ROUTES, "/reset_prefix_cache", "/resume",
                     "/shutdown_weight_transfer_engine"]  # fmt: skip
    by_path = {c.path: c.body for c in calls}
    assert by_path["/finish_weight_update"] == {"weight_version": "7"}  # vLLM's embed name
    assert by_path["/update_weights"]["update_info"]["names"] == ["w"]
    assert m["sync_pause_s"] >= m["sync_transfer_s"] > 0


def test_failed_nccl_transfer_is_never_followed_by_resume() -> None:
    async def main():
        async with CannedServer(ok_script(["/pause", *NCCL_ROUTES, "/reset_prefix_cache"])) as s:
            sync, module = nccl_sync([s], broadcast_error="NCCL error: unhandled system error")
            with pytest.raises(WeightSyncError) as first:
                await asyncio.to_thread(sync.push, module, 1)
            n_calls = len(s.paths())
            with pytest.raises(WeightSyncError) as again:  # the group is unusable now
                await asyncio.to_thread(sync.push, module, 2)
            engine = sync.engine
            await asyncio.to_thread(sync.close)
            await asyncio.to_thread(sync.close)  # idempotent
            return first.value, again.value, s.paths(), n_calls, engine, s.url

    err, again, paths, n_calls, engine, url = asyncio.run(main())
    assert paths == ["/pause", "/start_weight_update", "/update_weights"]
    assert "/resume" not in paths and "/shutdown_weight_transfer_engine" not in paths
    assert len(paths) == n_calls  # the refused second push sent nothing
    assert url in str(err) and "left paused" in str(err) and "NCCL error" in str(err)
    assert isinstance(err, UserError) and "earlier weight transfer failed" in str(again)
    assert engine.shutdowns == 1  # the trainer side is dropped once


def nccl_push_with_one_bad_server(route: str, reply: tuple[int, str]):
    """Push to a good and a bad server (`route` answers `reply`); the error message and
    each server's calls."""

    async def main():
        script = ok_script(["/pause", *NCCL_ROUTES, "/reset_prefix_cache"])
        async with CannedServer(script) as good, CannedServer(script | {route: [reply]}) as bad:
            sync, module = nccl_sync([good, bad])
            with pytest.raises(WeightSyncError) as info:
                await asyncio.to_thread(sync.push, module, 1)
            return str(info.value), good.paths(), bad.paths(), bad.url

    return asyncio.run(main())


def test_nccl_server_error_during_update_names_that_server() -> None:
    message, good_paths, bad_paths, bad_url = nccl_push_with_one_bad_server(
        "/update_weights", (500, "worker died")
    )
    assert "/resume" not in good_paths + bad_paths  # after start: no server is resumed
    assert f"{bad_url}/update_weights: answered HTTP 500: worker died" in message


def test_failed_pause_resumes_the_paused_servers_and_sends_nothing() -> None:
    message, good_paths, bad_paths, bad_url = nccl_push_with_one_bad_server(
        "/pause", (400, "bad mode")
    )
    assert good_paths == ["/pause", "/resume"] and bad_paths == ["/pause"]
    assert bad_url in message and "no weights sent" in message


def test_a_failed_nccl_resume_is_a_weight_sync_error_naming_that_server() -> None:
    """Weights and version are whole, but one server did not resume: a WeightSyncError
    (the learner checkpoints its step on it), not the client's VLLMError."""
    message, good_paths, bad_paths, bad_url = nccl_push_with_one_bad_server(
        "/resume", (500, "engine core died")
    )
    assert good_paths[-1] == "/resume" and bad_paths[-1] == "/resume"  # both were asked
    assert "/finish_weight_update" in bad_paths  # the version reached it first
    assert message.startswith(f"{bad_url}: /resume failed after version 1 was sent")
    assert "engine core died" in message
    assert set(re.findall(r"http://[\d.]+:\d+", message)) == {bad_url}  # only that one


def test_an_nccl_sync_past_sync_timeout_s_fails_and_leaves_the_servers_paused() -> None:
    """The broadcast blocks (a worker never joins): the push fails within
    sync.timeout_s, naming it, instead of waiting for the send (released 20 s later)."""
    hang = threading.Event()
    release = threading.Timer(20, hang.set)  # before the fix the push waited for this
    release.start()

    async def main():
        async with CannedServer(ok_script(["/pause", *NCCL_ROUTES, "/reset_prefix_cache"])) as s:
            sync, module = nccl_sync([s], timeout_s=0.5, hang=hang)
            with pytest.raises(WeightSyncError) as first:
                await asyncio.to_thread(sync.push, module, 4)
            unreleased = not hang.is_set()
            with pytest.raises(WeightSyncError) as again:
                await asyncio.to_thread(sync.push, module, 5)
            await asyncio.to_thread(sync.close)
            return str(first.value), str(again.value), s.paths(), s.url, unreleased

    try:
        message, again, paths, url, unreleased = asyncio.run(main())
    finally:
        hang.set()
        release.cancel()
    assert unreleased  # it returned while the send was still blocked
    assert "did not finish within sync.timeout_s=0.5s" in message and url in message
    assert "left paused" in message and "earlier weight transfer failed" in again
    assert paths == ["/pause", "/start_weight_update", "/update_weights"]  # no /resume


def test_factory_picks_by_table_and_every_transport_is_a_weight_sync(tmp_path: Path) -> None:
    made = {t: make_weight_sync(Config(sync=SyncConfig(transport=t)), str(tmp_path))
            for t in ("disk", "nccl", "none")}  # fmt: skip
    assert [type(s).__name__ for s in made.values()] == ["DiskSync", "NCCLSync", "NoSync"]
    assert all(isinstance(s, WeightSync) for s in made.values())
    assert [s.needs_state_dict for s in made.values()] == [True, False, False]
    # only a transport that pushes makes a sample newer than the learner's "ahead"
    assert [s.versions_servers for s in made.values()] == [True, True, False]
    assert NoSync().push(None, 5) == {}
    for s in made.values():
        s.close()
        s.close()  # close() twice is fine (the learner's finally may follow an error path)


@pytest.mark.slow  # imports vLLM (~30 s here)
def test_servers_client_sends_what_vllms_own_client_sends() -> None:
    """API drift guard: `_ServersClient` (through the project's client) sends the routes
    and bodies of vLLM's own `HTTPVLLMWeightSyncClient`, which it replaces."""
    clients = pytest.importorskip("vllm.distributed.weight_transfer.clients")
    pytest.importorskip("requests")
    init = {"master_address": "127.0.0.1", "master_port": 1234, "rank_offset": 1, "world_size": 2}
    update = {"names": ["w"], "dtype_names": ["bfloat16"], "shapes": [[2]]}

    def drive(client) -> None:
        client.init_weight_transfer_engine(init)
        client.start_weight_update()
        client.update_weights(update)
        client.finish_weight_update("3")
        client.shutdown_weight_transfer_engine()

    async def main():
        routes = ["/init_weight_transfer_engine", *NCCL_ROUTES]
        async with CannedServer(ok_script(routes)) as ours, CannedServer(ok_script(routes)) as ref:
            await asyncio.to_thread(drive, _ServersClient([ours.url], [1], timeout_s=10))
            await asyncio.to_thread(drive, clients.HTTPVLLMWeightSyncClient(ref.url, timeout=10))
            return [(c.path, c.body) for c in ours.calls], [(c.path, c.body) for c in ref.calls]

    ours, ref = asyncio.run(main())
    assert len(ours) == 5 and ours == ref
