"""Adapter-only weight sync: the LoRA adapter written atomically, loaded as `policy-vN`.

`LoraSync.push(model, version, state_dict)` (rank 0 does the work; other ranks return
`{}`; under FSDP `state_dict` is the adapter gathered from the shards):
1. writes the adapter (peft's format: adapter_config.json + adapter_model.safetensors,
   megabytes) to `RUN/adapters/v{N}.tmp`, fsyncs and renames it to `RUN/adapters/v{N}`
   (`write_adapter`, `grpo_stream.core.atomic`);
2. on every server at once (`sync.mode = "all"`) or one after the other (`"rolling"`):
   `POST /v1/load_lora_adapter {lora_name: policy-vN, lora_path}` →
   `/update_weight_version N` → unloads every `policy-vK` the server holds outside the
   staleness window (K < N - learner.max_staleness, or K > N: a killed run's);
3. deletes the adapter folders outside the window.

No server pauses: the base weights never change, the server keeps serving the older
versions' adapters by their names while the new one loads, and the generator asks for
the name of the version a server reports (`grpo_stream.serving.adapters`), so once the
version is set new requests use the new adapter. `sync_pause_s` is the time from the
load's start to the version's update: the window in which a server is between versions.

Each version has its own name because vLLM keys its prefix cache by adapter name and
path: a version pushed again (a resumed learner redoing a step a killed one had pushed)
is unloaded and loaded anew, and that server's prefix cache reset. The servers must start
with LoRA enabled (`server.max_lora_rank`, `server.max_loras`, derived from [lora] when
`sync.transport = "lora"`: `serving.server`). A failed load raises `WeightSyncError`
naming the server, which keeps serving its older version. A restarted server starts on
the base model alone: `resync_adapter` loads the newest published adapter into it before
it is used (`grpo_stream.run.supervise.servers`).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from pathlib import Path

from grpo_stream.config import SyncConfig
from grpo_stream.config.transports import transport_traits
from grpo_stream.core import metric_names as M
from grpo_stream.core.atomic import fresh_dir, publish_dir
from grpo_stream.serving.adapters import adapter_name
from grpo_stream.serving.client import ServerHTTPError, VLLMClient
from grpo_stream.sync.base import WeightSyncError, current_rank, current_world_size
from grpo_stream.sync.disk import on_every_server, version_folders

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # peft's saved keys name the model inside PeftModel


def adapter_state_dict(model, state_dict: dict | None = None) -> dict:
    """The adapter's tensors under peft's saved names (CPU, contiguous); `state_dict`: a
    gathered full state dict to take them from (None: the model's own)."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, state_dict=state_dict)
    return {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def write_adapter(model, out: Path, state_dict: dict | None = None) -> Path:
    """Atomically publish `model`'s LoRA adapter (peft format) as the folder `out`."""
    from safetensors.torch import save_file

    tmp = fresh_dir(out.with_name(out.name + ".tmp"))
    save_file(adapter_state_dict(model, state_dict), tmp / ADAPTER_FILE, {"format": "pt"})
    model.peft_config["default"].save_pretrained(str(tmp))
    return publish_dir(tmp, out)


def validate_adapter_dir(folder: Path) -> None:
    """Refuse a folder vLLM could not load as an adapter (missing or unreadable files)."""
    for name in (ADAPTER_CONFIG, ADAPTER_FILE):
        if not (folder / name).is_file():
            raise WeightSyncError(f"adapter folder {folder} has no {name}")
    try:
        json.loads((folder / ADAPTER_CONFIG).read_text())
    except ValueError as e:
        raise WeightSyncError(f"{folder / ADAPTER_CONFIG}: not JSON ({e})") from None


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


async def load_on_server(
    client: VLLMClient, url: str, name: str, folder: Path, version: int, timeout_s: float
) -> None:
    """Load `folder` as `name` (a name already held is unloaded first and the prefix
    cache reset: the same name and path would otherwise reuse its KV), then set the
    server's version. Nothing is paused."""
    try:
        await client.load_lora_adapter(url, name, str(folder), timeout_s)
    except ServerHTTPError as e:
        if e.status != 400 or "already been loaded" not in e.body:
            raise
        await client.unload_lora_adapter(url, name)
        await client.load_lora_adapter(url, name, str(folder), timeout_s)
        await client.reset_prefix_cache(url)
    await client.set_weight_version(url, version)


VERSION_OF = re.compile(r"-v(\d+)$")


def outside_window(names: list[str], served: str, version: int, window: int) -> list[str]:
    """The adapter names among `names` (`served`-vK) to unload after pushing `version`:
    K below version - window, or above version (a discarded, killed run's)."""
    out = []
    for n in names:
        m = VERSION_OF.search(n)
        if m and n == adapter_name(served, m.group(1)):
            k = int(m.group(1))
            if k < version - window or k > version:
                out.append(n)
    return out


class LoraSync:
    """`WeightSync` of a LoRA adapter through a shared folder and vLLM's adapter loading."""

    versions_servers = transport_traits("lora").versions_servers

    def __init__(self, cfg: SyncConfig, urls: list[str], root: Path, served_name: str,
                 window: int, rank: int | None = None, api_key: str | None = None):  # fmt: skip
        self.cfg, self.urls, self.api_key = cfg, [u.rstrip("/") for u in urls], api_key
        self.served, self.window = served_name, window  # learner.max_staleness
        self.rank = current_rank() if rank is None else rank
        # under FSDP the adapter comes gathered from the shards (`learner.gather`); in one
        # process push reads it from the model itself
        self.needs_state_dict = current_world_size() > 1
        self.root = Path(root).resolve()
        self.pauses: list[list] = []
        self._published: tuple[int, Path] | None = None
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    def push(self, model, version: int, state_dict=None) -> dict[str, float]:
        if self.rank != 0:
            return {}
        t0 = time.perf_counter()
        folder = self.publish(model, version, state_dict)
        save_s = time.perf_counter() - t0
        self.pauses = []
        pauses = asyncio.run(self._load_all(folder, version))
        self.prune(version)
        return {
            M.SYNC_SAVE_S: save_s,
            M.SYNC_PAUSE_S: max(pauses),
            M.SYNC_S: time.perf_counter() - t0,
            M.SYNC_PAUSES: self.pauses,
            M.SYNC_BYTES: float(folder_bytes(folder)),
        }

    def publish(self, model, version: int, state_dict: dict | None = None) -> Path:
        """Write and validate `RUN/adapters/v{version}` (no server is called) from
        `state_dict` (the gathered adapter), else from the model itself."""
        folder = write_adapter(model, self.root / f"v{version}", state_dict)
        validate_adapter_dir(folder)
        self._published = (version, folder)
        return folder

    def published(self, version: int) -> Path | None:
        """The adapter folder this process published for `version`, while it exists."""
        if self._published is None or self._published[0] != version:
            return None
        return self._published[1] if self._published[1].is_dir() else None

    async def _load_all(self, folder: Path, version: int) -> list[float]:
        async with VLLMClient(self.cfg.timeout_s, api_key=self.api_key) as client:
            jobs = (self._load_within(client, u, folder, version) for u in self.urls)
            return await on_every_server(jobs, self.cfg.mode == "rolling")

    async def _load_within(self, client: VLLMClient, url: str, folder: Path, version: int):
        """One server's load, version and unloads within `sync.timeout_s`."""
        name, t_wall, t0 = adapter_name(self.served, version), time.time(), time.perf_counter()
        try:
            await asyncio.wait_for(
                load_on_server(client, url, name, folder, version, self.cfg.timeout_s),
                self.cfg.timeout_s,
            )
        except TimeoutError:
            raise WeightSyncError(
                f"{url}: loading adapter {name} did not finish within sync.timeout_s="
                f"{self.cfg.timeout_s:g}s; the server keeps serving its older version"
            ) from None
        except Exception as e:
            raise WeightSyncError(
                f"{url}: loading adapter {name} from {folder} failed; the server keeps "
                f"serving its older version: {e}"
            ) from e
        switch_s = time.perf_counter() - t0
        self.pauses.append([url, t_wall, time.time()])
        try:
            held = await client.served_models(url)
            for old in outside_window(held, self.served, version, self.window):
                await client.unload_lora_adapter(url, old)
        except Exception as e:
            raise WeightSyncError(f"{url}: unloading old adapters after {name}: {e}") from e
        return switch_s

    def prune(self, version: int) -> None:
        """Delete the adapter folders outside the window, and a killed writer's `.tmp`."""
        for v, folder in version_folders(self.root):
            if v < version - self.window or v > version:
                shutil.rmtree(folder, ignore_errors=True)
        for tmp in self.root.glob("v*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)

    def close(self) -> None:
        """Nothing is held between pushes."""


def newest_adapter(root: Path) -> tuple[Path, int] | None:
    """The newest complete `vN` adapter folder under `root` and N (None: none yet)."""
    for version, folder in reversed(version_folders(root)):
        try:
            validate_adapter_dir(folder)
        except (WeightSyncError, OSError):  # pruned or torn under us: the one before
            continue
        return folder, version
    return None


async def resync_adapter(
    url: str, cfg: SyncConfig, root: Path, served_name: str, api_key: str | None = None
) -> int:
    """A restarted server (it starts on the base model): load the newest published
    adapter under its version's name and set that version; returns it (0: none yet,
    the base model is version 0's policy, as a fresh adapter is)."""
    newest = newest_adapter(Path(root))
    if newest is None:
        return 0
    folder, version = newest
    name = adapter_name(served_name, version)
    async with VLLMClient(cfg.timeout_s, api_key=api_key) as client:
        try:
            await asyncio.wait_for(
                load_on_server(client, url, name, folder, version, cfg.timeout_s), cfg.timeout_s
            )
        except TimeoutError:
            raise WeightSyncError(
                f"{url}: re-sync to adapter {name} did not finish within "
                f"sync.timeout_s={cfg.timeout_s:g}s"
            ) from None
    return version
