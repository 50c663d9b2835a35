"""Disk weight sync: safetensors written atomically, reloaded in place by vLLM.

`DiskSync.push(model, version)`:
1. saves the weights (Hugging Face names) to `RUN/weights/v{N}.tmp`, fsyncs every
   file, renames to `RUN/weights/v{N}` — a server never reads half a folder;
2. validates the folder (a bad `weights_path` kills vLLM's engine, so it is checked
   before the call);
3. on every server: `POST /pause?mode=M` → `/collective_rpc reload_weights` →
   `/update_weight_version N` → `/reset_prefix_cache` → `/resume`, concurrently
   across servers, and returns the longest pause in seconds.
Old folders beyond `sync.keep_last` are deleted. Works on CPU and GPU; the folder
must be visible to the servers at the same path (same machine or a shared disk).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import time
from pathlib import Path

from grpo_stream.atomic import fresh_dir, publish_dir
from grpo_stream.config import SyncConfig
from grpo_stream.generator.client import VLLMClient


class WeightSyncError(RuntimeError):
    pass


def save_weights(model, out: Path, state_dict=None) -> Path:
    """Atomically publish `model`'s weights (+config) as a safetensors folder.

    `state_dict`: the full weights gathered from FSDP shards (None: the model's own).
    """
    tmp = fresh_dir(out.with_name(out.name + ".tmp"))
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    return publish_dir(tmp, out)


def validate_weights_dir(folder: Path) -> None:
    """Refuse a folder vLLM could not load: missing, no safetensors, or a torn header."""
    if not folder.is_dir():
        raise WeightSyncError(f"weights folder {folder} does not exist")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightSyncError(f"weights folder {folder} holds no *.safetensors file")
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise WeightSyncError(f"{f}: truncated safetensors header")
            (n,) = struct.unpack("<Q", head)
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise WeightSyncError(f"{f}: unreadable safetensors header ({e})") from None
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
        if f.stat().st_size < 8 + n + end:
            raise WeightSyncError(f"{f}: file shorter than its header says (torn write?)")


async def reload_on_server(
    client: VLLMClient, url: str, folder: Path, version: int, cfg: SyncConfig
) -> float:
    """Pause → reload → set version → clear prefix cache → resume; returns paused seconds."""
    t0 = time.perf_counter()
    await client.pause(url, cfg.pause_mode)
    try:
        await client.collective_rpc(
            url, "reload_weights", {"weights_path": str(folder)}, timeout_s=cfg.timeout_s
        )
        await client.set_weight_version(url, version)
        await client.reset_prefix_cache(url)
    finally:
        await client.resume(url)
    return time.perf_counter() - t0


class DiskSync:
    def __init__(self, cfg: SyncConfig, urls: list[str], weights_root: Path):
        self.cfg, self.urls = cfg, urls
        self.root = Path(weights_root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def push(self, model, version: int, state_dict=None) -> dict[str, float]:
        t0 = time.perf_counter()
        folder = save_weights(model, self.root / f"v{version}", state_dict)
        validate_weights_dir(folder)
        save_s = time.perf_counter() - t0
        pauses = asyncio.run(self._reload_all(folder, version))
        self._prune(version)
        return {
            "sync_save_s": save_s,
            "sync_pause_s": max(pauses),
            "sync_s": time.perf_counter() - t0,
        }

    async def _reload_all(self, folder: Path, version: int) -> list[float]:
        async with VLLMClient(self.cfg.timeout_s) as client:
            return list(
                await asyncio.gather(
                    *(reload_on_server(client, u, folder, version, self.cfg) for u in self.urls)
                )
            )

    def _prune(self, version: int) -> None:
        kept = sorted(
            (p for p in self.root.glob("v*") if p.is_dir() and p.name[1:].isdigit()),
            key=lambda p: int(p.name[1:]),
        )
        for p in kept[: -self.cfg.keep_last]:
            if int(p.name[1:]) != version:
                shutil.rmtree(p, ignore_errors=True)
