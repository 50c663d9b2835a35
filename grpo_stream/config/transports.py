"""What each `sync.transport` means for the code around the weight sync, as data.

    from grpo_stream.config.transports import transport_traits
    if transport_traits(cfg.sync.transport).reloads_from_disk: ...

Code outside `grpo_stream/sync` never compares a transport's name: it asks a trait,
here or on the `WeightSync` object (`grpo_stream.sync.base`), so a new transport is one
row of this table plus its class in `sync/` (tests/unit/test_transport_traits.py
refuses a name comparison anywhere else). The table lives in `config/`, not `sync/`,
because code that runs before any sync object exists and sits below `sync` in the
layers asks it too: GPU placement (`config.placement`), the config's own validator,
the model folder (`serving.model`), the doctor, the supervisor, replay and the
evaluator. The sync classes read their protocol traits (`versions_servers`) from the
same rows, so the two never disagree. Data only: imports nothing of the project.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransportTraits:
    """The decisions a transport's name stands for (one row per `sync.transport`)."""

    # a push sends the learner's weights into the servers through vLLM's dev-mode RL
    # routes and stamps them with the learner's version: the policy version follows the
    # synced steps, and a server's version is the learner's (False: the servers keep
    # their own weights and versions, and need no dev mode)
    versions_servers: bool
    # the servers load a published safetensors folder with vLLM's reload_weights: a tied
    # lm_head would stay stale (an untied copy is served), and a restarted server is
    # re-synced from the newest folder under RUN/weights
    reloads_from_disk: bool
    # the learner's ranks and every server's workers form one NCCL group: GPUs only, no
    # two of its ranks on one GPU, and the group dies with any server (the learner is
    # restarted with it)
    nccl_group: bool
    # the `--weight-transfer-config` backend the servers must start with (None: none)
    server_backend: str | None
    # a push sends a LoRA adapter (RUN/adapters/vN) that the servers load beside the base
    # model under a versioned name (`policy-vN`, which the generator and evaluator ask
    # for): the servers start with LoRA enabled, and [lora] must be on
    adapters: bool = False


TRANSPORT_TRAITS: dict[str, TransportTraits] = {
    "disk": TransportTraits(
        versions_servers=True, reloads_from_disk=True, nccl_group=False, server_backend=None
    ),
    "nccl": TransportTraits(
        versions_servers=True, reloads_from_disk=False, nccl_group=True, server_backend="nccl"
    ),
    "lora": TransportTraits(
        versions_servers=True,
        reloads_from_disk=False,
        nccl_group=False,
        server_backend=None,
        adapters=True,
    ),
    "none": TransportTraits(
        versions_servers=False, reloads_from_disk=False, nccl_group=False, server_backend=None
    ),
}


def transport_traits(transport: str) -> TransportTraits:
    """The traits of `sync.transport = transport` (ValueError naming the field otherwise)."""
    try:
        return TRANSPORT_TRAITS[transport]
    except KeyError:
        raise ValueError(
            f"sync.transport = {transport!r}: not one of {sorted(TRANSPORT_TRAITS)}"
        ) from None
