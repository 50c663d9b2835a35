"""Restarting a crashed (or wedged) vLLM server of `run`, and re-syncing it.

    new = restart_server(old, cfg, run_dir)   # stopped, started, healthy, re-synced

A restarted server starts on the initial model. Under disk sync it is then brought to
the learner's latest published weights with the same calls the learner's own push makes
(`sync.disk.reload_on_server`: pause, reload_weights, update_weight_version, reset the
prefix cache, resume) from the newest complete `RUN/weights/vN` folder, and its
/weight_info then says N. A push the learner makes meanwhile may publish a newer folder:
the re-sync repeats until the newest folder is the one the server holds. The folder is
held while the server reloads from it (`sync.disk.hold_weights`), so that push does not
delete it under the server. Under NCCL sync the learner's transfer group died with the
server: the supervisor restarts the learner too, and the resumed learner sends its
weights (sync.transport = "nccl"). Under the adapter sync it loads the newest adapter
under `RUN/adapters` as that version's name (`sync.lora.resync_adapter`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from grpo_stream.config import Config
from grpo_stream.config.transports import transport_traits
from grpo_stream.sync.base import WeightSyncError


def newest_weights(weights_root: Path) -> tuple[Path, int] | None:
    """The newest complete `vN` folder under `weights_root` and N (None: none yet)."""
    from grpo_stream.sync.disk import validate_weights_dir, version_folders

    for version, folder in reversed(version_folders(weights_root)):
        try:
            validate_weights_dir(folder)
        except (WeightSyncError, OSError):  # pruned or torn under us: the one before
            continue
        return folder, version
    return None


async def _reload(url: str, folder: Path, version: int, cfg: Config) -> None:
    from grpo_stream.serving.client import VLLMClient
    from grpo_stream.sync.disk import reload_on_server

    key = cfg.server.resolved_api_key()
    async with VLLMClient(cfg.sync.timeout_s, api_key=key) as client:
        await asyncio.wait_for(
            reload_on_server(client, url, folder, version, cfg.sync), cfg.sync.timeout_s
        )


def _reload_held(url: str, folder: Path, version: int, cfg: Config) -> bool:
    """Reload `folder` into the server, holding it against the learner's prune; False
    when it was deleted or replaced before it could be held (the caller looks again)."""
    from grpo_stream.sync.disk import WeightsFolderGone, hold_weights, validate_weights_dir

    try:
        with hold_weights(folder):
            validate_weights_dir(folder)
            asyncio.run(_reload(url, folder, version, cfg))
    except WeightsFolderGone:
        return False
    return True


def resync(url: str, cfg: Config, run_dir: str | Path) -> int:
    """Disk sync: load the newest published weights into the server at `url`; returns
    their version (0 when the learner published none: the initial model is version 0).
    Adapter sync: the newest adapter under RUN/adapters (`sync.lora.resync_adapter`)."""
    if transport_traits(cfg.sync.transport).adapters:
        from grpo_stream.sync.lora import resync_adapter

        root, key = Path(run_dir) / "adapters", cfg.server.resolved_api_key()
        return asyncio.run(resync_adapter(url, cfg.sync, root, cfg.model.served_name, key))
    if not transport_traits(cfg.sync.transport).reloads_from_disk:
        return 0
    held = None
    for _ in range(5):  # a folder newer than the one just loaded: load that one
        newest = newest_weights(Path(run_dir) / "weights")
        if newest is None or newest[1] == held:
            break
        folder, version = newest
        try:
            if not _reload_held(url, folder, version, cfg):
                continue  # pruned between the listing and the hold: list again
        except TimeoutError:
            raise WeightSyncError(
                f"{url}: re-sync to version {version} did not finish within "
                f"sync.timeout_s={cfg.sync.timeout_s:g}s"
            ) from None
        held = version
    return held or 0


def restart_server(old, cfg: Config, run_dir: str | Path, on_started=None):
    """(a new `VLLMServer` in `old`'s place (same port, model, log, GPUs), healthy and
    re-synced; the version it now serves). `on_started(new)` runs right after the process starts, so a caller that
    is interrupted while waiting still stops it."""
    from grpo_stream.serving.server import VLLMServer

    old.stop()  # the whole process group: a SIGKILLed server's engine core goes too
    new = VLLMServer(old.model_dir, old.served_name, old.port, old.cfg, old.log_file, old.gpus)
    new.start()
    if on_started is not None:
        on_started(new)
    new.wait_healthy()
    return new, resync(new.url, cfg, run_dir)
