"""The model names under which LoRA adapter versions are served, one per policy version.

    adapter_name("policy", 3)          # 'policy-v3': what the adapter sync loads
    model = request_model(cfg)         # 'policy-v{version}' with the adapter sync, else 'policy'
    versioned(model, 3)                # 'policy-v3' (a name without the slot is unchanged)

A version's adapter is loaded under its own name, never reloaded under an old one: vLLM's
prefix cache is keyed by the adapter, so an adapter reloaded under a name it had before
could be served KV blocks computed under the older weights. The generator and the
evaluator read a server's weight version before each request and ask for that version's
name (`generator.sampler`), so a sample is made by exactly the adapter it is stamped with.
"""

from __future__ import annotations

from typing import Any

from grpo_stream.config.transports import transport_traits

VERSION_SLOT = "{version}"  # in a request model name: filled with the server's version


def adapter_name(served_name: str, version: int | str) -> str:
    """The served name of the adapter of policy `version`."""
    return f"{served_name}-v{version}"


def request_model(cfg: Any) -> str:
    """The model name requests ask for: a version template with the adapter sync (its
    `adapters` trait), else the base model's served name."""
    served = cfg.model.served_name
    if transport_traits(cfg.sync.transport).adapters:
        return adapter_name(served, VERSION_SLOT)
    return served


def versioned(model: str, version: int) -> str:
    """`model` with its version slot filled (a plain name is returned as it is)."""
    return model.replace(VERSION_SLOT, str(version))
