"""The adapter sync's failures against scripted fake servers (`fake_vllm.CannedServer`):
a refused load raises `WeightSyncError` naming the server and sets no version (the server
keeps serving its older adapter), a name already held is unloaded and loaded anew with
the prefix cache reset, and the window decides what is unloaded. The call order against
a real vLLM server is tests/integration/test_lora_vllm.py's."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from fake_vllm import OK_JSON, CannedServer

from grpo_stream.config import LoraConfig, SyncConfig
from grpo_stream.learner.lora import apply_lora
from grpo_stream.sync import WeightSyncError
from grpo_stream.sync.lora import LoraSync, outside_window

MODELS = (200, json.dumps({"data": [{"id": n} for n in ("policy", "policy-v1", "policy-v3",
                                                         "policy-v9", "other-v1")]}))  # fmt: skip


@pytest.fixture
def lora_lm(tiny_lm):
    torch.manual_seed(0)
    return apply_lora(tiny_lm, LoraConfig(enabled=True, rank=2, target_modules=["q_proj"]))


def _push(tmp: Path, model, script: dict, version: int = 4):
    async def main():
        async with CannedServer(script) as srv:
            sync = LoraSync(SyncConfig(transport="lora", timeout_s=10), [srv.url],
                            tmp / "adapters", "policy", window=1, rank=0)  # fmt: skip
            try:
                return await asyncio.to_thread(sync.push, model, version), srv.calls
            except WeightSyncError as e:
                return e, srv.calls

    return asyncio.run(main())


def test_a_refused_load_names_the_server_and_sets_no_version(tmp_path, lora_lm) -> None:
    err, calls = _push(tmp_path, lora_lm, {"/v1/load_lora_adapter": [(500, "bad rank")]})
    assert isinstance(err, WeightSyncError)
    assert "loading adapter policy-v4" in str(err) and "keeps serving its older" in str(err)
    assert "127.0.0.1" in str(err) and "bad rank" in str(err)
    assert [c.path for c in calls] == ["/v1/load_lora_adapter"]
    assert calls[0].body == {"lora_name": "policy-v4",
                             "lora_path": str((tmp_path / "adapters" / "v4").resolve())}  # fmt: skip


def test_a_name_already_held_is_loaded_anew_with_the_cache_reset(tmp_path, lora_lm) -> None:
    held = (400, "The lora adapter 'policy-v4' has already been loaded.")
    script = {"/v1/load_lora_adapter": [held, (200, "Success")], "/v1/models": [MODELS],
              "/v1/unload_lora_adapter": [(200, "Success")],
              "/reset_prefix_cache": [OK_JSON], "/update_weight_version": [OK_JSON]}  # fmt: skip
    m, calls = _push(tmp_path, lora_lm, script)
    assert [c.path for c in calls] == [
        "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/load_lora_adapter",
        "/reset_prefix_cache", "/update_weight_version", "/v1/models",
        "/v1/unload_lora_adapter", "/v1/unload_lora_adapter",
    ]  # fmt: skip
    unloaded = [c.body["lora_name"] for c in calls if c.path == "/v1/unload_lora_adapter"]
    assert unloaded == ["policy-v4", "policy-v1", "policy-v9"]  # v3, v4 stay: the window
    assert m["sync_bytes"] > 0 and m["sync_pause_s"] > 0


def test_the_window_keeps_the_versions_a_sample_may_still_come_from() -> None:
    names = ["policy", "policy-v0", "policy-v5", "policy-v6", "policy-v7", "policy-v8", "x-v1"]
    assert outside_window(names, "policy", 7, 2) == ["policy-v0", "policy-v8"]
    assert outside_window(names, "policy", 7, 0) == ["policy-v0", "policy-v5", "policy-v6",
                                                     "policy-v8"]  # fmt: skip


def test_a_restarted_server_gets_the_newest_adapter(tmp_path, lora_lm) -> None:
    from grpo_stream.config import load_config
    from grpo_stream.run.supervise.servers import resync
    from grpo_stream.sync.lora import write_adapter

    for v in (2, 3):
        write_adapter(lora_lm, tmp_path / "adapters" / f"v{v}")
    (tmp_path / "adapters" / "v4").mkdir()  # a torn one (no files): skipped
    cfg = load_config(None, ["sync.transport=lora", "lora.enabled=true", "sync.timeout_s=10"])
    script = {"/v1/load_lora_adapter": [(200, "Success")], "/update_weight_version": [OK_JSON]}

    async def main():
        async with CannedServer(script) as srv:
            return await asyncio.to_thread(resync, srv.url, cfg, tmp_path), srv.calls

    version, calls = asyncio.run(main())
    assert version == 3
    assert [c.path for c in calls] == ["/v1/load_lora_adapter", "/update_weight_version"]
    assert calls[0].body["lora_name"] == "policy-v3"
    assert calls[1].body == {"new_version": "3"}
