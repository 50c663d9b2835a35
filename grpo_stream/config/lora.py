"""The `[lora]` section: train LoRA adapters instead of the full weights.

    [lora]
    enabled = true
    rank = 16
    alpha = 32
    target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]

With `enabled`, the learner wraps the policy with peft (`grpo_stream.learner.lora`),
only the adapter's parameters are trained, and the reference log-probs (loss.beta > 0)
come from the same model with the adapter switched off. `sync.transport = "lora"`
pushes the adapter alone into vLLM servers started with LoRA enabled
(`grpo_stream.sync.lora`). The other fields act only with `enabled` (config/rules.py).

`check_lora(cfg)` holds the rules that tie this section to `sync` and `server`;
`vllm_lora_rank(rank)` is the `--max-lora-rank` a server needs for it.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from grpo_stream.config.sections import _Section
from grpo_stream.config.transports import transport_traits

# the ranks vLLM 0.32's --max-lora-rank accepts (vllm/config/lora.py MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# modules whose adapter the learner could not honour: the fused output layer reads the
# lm_head weight directly, and the embedding is tied to it in small models
REFUSED_TARGETS = ("lm_head", "embed_tokens")


class LoraConfig(_Section):
    enabled: bool = Field(
        False, description="train a LoRA adapter on the frozen base model (off: full weights)"
    )
    rank: int = Field(16, ge=1, le=512, description="the adapter's rank r")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: the update is scaled by alpha / r")
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="dropout on the adapter's input (0 keeps pi_old and pi_theta equal at "
        "equal weights, as the learner's other dropouts are)",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],  # fmt: skip
        min_length=1,
        description="module names (suffixes) that get an adapter; not lm_head/embed_tokens",
    )

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m.rsplit(".", 1)[-1] in REFUSED_TARGETS]
        if bad:
            raise ValueError(
                f"{bad}: the learner's fused output layer reads the lm_head weight directly "
                "(and the embedding is tied to it), so an adapter there would be ignored; "
                "target the attention and MLP projections"
            )
        return v


def vllm_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds an adapter of `rank`."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def check_lora(cfg: Any) -> None:
    """The adapter sync needs adapters to push, and adapters need a sync that can take
    them (or none): ValueError naming the fields otherwise."""
    adapters = transport_traits(cfg.sync.transport).adapters
    if adapters and not cfg.lora.enabled:
        raise ValueError(
            f"sync.transport = {cfg.sync.transport!r} pushes a LoRA adapter: set "
            "lora.enabled = true, or choose another transport"
        )
    if cfg.lora.enabled and not adapters and transport_traits(cfg.sync.transport).versions_servers:
        raise ValueError(
            f"lora.enabled = true with sync.transport = {cfg.sync.transport!r}: that "
            "transport pushes full weights; use sync.transport = 'lora' (adapter-only "
            "sync) or 'none'"
        )
    slots, need = cfg.server.max_loras, cfg.learner.max_staleness + 2
    if adapters and slots is not None and slots < need:
        raise ValueError(
            f"server.max_loras = {slots}: the servers must hold every adapter version in "
            f"the staleness window plus the next one, learner.max_staleness + 2 = {need}"
        )
