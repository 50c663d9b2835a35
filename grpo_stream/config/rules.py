"""Which config fields act only under a chosen variant, and which names were renamed.

`VARIANT_RULES` ties fields to the value of another field of their section (e.g.
`loss.tis_cap` acts only with `loss.behaviour_correction = "tis"`); `Config` refuses such a
field when it is set under another variant, and `config show` marks it ignored
(`inapplicable(cfg)`). `RENAMED` maps an old field name to its new one, so a file or
override with the old name is refused with the new name in the message.

    for key, rule in inapplicable(cfg).items(): ...   # 'loss.tis_cap' -> its rule
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from grpo_stream.config.critic import CriticConfig

# Old field names and their new ones: an old name in a file or override is refused.
RENAMED: dict[str, str] = {
    "task.epochs": "task.passes",  # passes over a dataset file, not the learner's mu
    "generator.max_groups": "generator.stop_after_groups",  # not buffer retention
}


@dataclass(frozen=True)
class VariantRule:
    """`section.fields` only act when `where.selector` is one of `allowed` (`where`: the
    section holding the selector, `section` itself unless `selector_section` is set)."""

    section: str
    fields: tuple[str, ...]
    selector: str
    allowed: tuple[str | bool, ...]
    selector_section: str | None = None

    @property
    def where(self) -> str:
        return self.selector_section or self.section

    def applies(self, cfg: Any) -> bool:
        return getattr(getattr(cfg, self.where), self.selector) in self.allowed

    def condition(self) -> str:
        return " or ".join(f"{self.where}.{self.selector} = {a!r}" for a in self.allowed)


VARIANT_RULES: tuple[VariantRule, ...] = (
    VariantRule("loss", ("tis_cap",), "behaviour_correction", ("tis",)),
    VariantRule("loss", ("mask_low", "mask_high"), "behaviour_correction", ("mask",)),
    VariantRule("loss", ("constant_normalizer",), "aggregation", ("constant",)),
    VariantRule("loss", ("kl_in_reward",), "advantage", ("gae",)),
    VariantRule(  # gae passes the raw reward to the critic (whitened there: critic.whiten)
        "loss",
        ("scale_std", "advantage_eps"),
        "advantage",
        ("group", "batch_std", "leave_one_out", "batch"),
    ),
    VariantRule("critic", tuple(CriticConfig.model_fields), "advantage", ("gae",), "loss"),
    VariantRule("buffer", ("rollup_segments", "rollup_target_groups"), "backend", ("arrow",)),
    VariantRule("sync", ("keep_last",), "transport", ("disk",)),
    VariantRule("sync", ("pause_mode",), "transport", ("disk", "nccl")),
    VariantRule("sync", ("timeout_s",), "transport", ("disk", "nccl", "lora")),
    VariantRule("lora", ("rank", "alpha", "dropout", "target_modules"), "enabled", (True,)),
    VariantRule("learner", ("max_refill_batches",), "dynamic_sampling", (True,)),
    VariantRule("task", ("operations",), "name", ("arithmetic",)),
    VariantRule("task", ("min_operand", "max_operand"), "name", ("arithmetic", "countdown")),
    VariantRule(
        "task",
        ("countdown_min_numbers", "countdown_max_numbers", "countdown_max_target"),
        "name",
        ("countdown",),
    ),
    VariantRule(
        "task",
        ("path", "prompt_column", "answer_column", "passes", "shuffle"),
        "name",
        ("jsonl", "parquet"),
    ),
)


def inapplicable(cfg: Any) -> dict[str, VariantRule]:
    """'section.field' -> the rule it breaks, for every field the chosen variants ignore."""
    return {f"{r.section}.{f}": r for r in VARIANT_RULES if not r.applies(cfg) for f in r.fields}
