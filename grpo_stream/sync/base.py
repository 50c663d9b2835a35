"""The `WeightSync` protocol every weight transport implements, and its error.

    sync = make_weight_sync(cfg, run_dir)        # grpo_stream.sync: picks by sync.transport
    metrics = sync.push(hf_model, version, state_dict=gathered_or_None)   # on EVERY rank
    sync.close()                                  # at the end of the run (idempotent)

`push` takes the Hugging Face model (a `ShardedPolicy` already unwrapped by the caller)
and returns timing metrics (`{}` where nothing was sent, e.g. on a non-sending rank).
Each transport knows its own rank rules (disk: rank 0 writes and reloads, the other
ranks return at once; NCCL: every rank joins the all-gathers), so the learner calls
`push` on every rank without asking which transport it has. `needs_state_dict` says
whether `push` reads the gathered `state_dict` (disk) or streams the parameters
themselves (NCCL), so the learner gathers one only when it is used. The learner asks
these traits, never the transport's name; code that has no sync object (placement, the
supervisor, the doctor) asks the same rows in `grpo_stream.config.transports`.
`published(version)` is the folder a push of `version` wrote on this process (disk), or None (a transport
that writes none): the learner's checkpoint of that step shares its files.

A failed push raises `WeightSyncError` naming the server(s). After a failure that may
have left a server's weights half-updated, the server is left paused (never resumed on
those weights) for the supervisor to restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from grpo_stream.config.transports import transport_traits
from grpo_stream.core.errors import UserError


class WeightSyncError(UserError, RuntimeError):
    """Weights could not be pushed to a vLLM server; the message names the server."""


@runtime_checkable
class WeightSync(Protocol):
    # push reads the gathered `state_dict` (the learner gathers one only then)
    needs_state_dict: bool
    # push makes the servers serve the learner's own versions, so a sample stamped with a
    # newer version than the learner's came from elsewhere (the learner refuses it), and a
    # step that syncs first waits for the held-out evaluation of the version it replaces
    # (the row of `config.transports.TRANSPORT_TRAITS`, which code without a sync object asks)
    versions_servers: bool

    def push(self, model: Any, version: int, state_dict: dict | None = None) -> dict[str, float]:
        """Make the servers serve `model`'s weights as policy version `version`."""
        ...

    def published(self, version: int) -> Path | None:
        """The folder holding exactly `version`'s weights that this process wrote, or None."""
        ...

    def close(self) -> None:
        """Release what the transport holds (connections, NCCL groups); idempotent."""
        ...


class NoSync:
    """`sync.transport = "none"`: the servers keep their weights; nothing is sent."""

    needs_state_dict = False
    versions_servers = transport_traits("none").versions_servers  # False: the servers' own

    def push(self, model: Any, version: int, state_dict: dict | None = None) -> dict[str, float]:
        return {}

    def published(self, version: int) -> Path | None:
        return None

    def close(self) -> None:
        pass


def _process_group():
    import sys

    dist = sys.modules.get("torch.distributed")
    return dist if dist and dist.is_available() and dist.is_initialized() else None


def current_rank() -> int:
    """This process's rank in torch.distributed (0 when not initialized or not imported)."""
    dist = _process_group()
    return dist.get_rank() if dist else 0


def current_world_size() -> int:
    """The learner's processes in torch.distributed (1 when not initialized)."""
    dist = _process_group()
    return dist.get_world_size() if dist else 1
