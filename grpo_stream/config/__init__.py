"""Typed configuration for every grpo-stream role.

One pydantic model per role (`server`, `generator`, `task`, `reward`, `buffer`,
`learner`, `loss`, `sync`; defined in `sections.py`, `learning.py` and `evaluation.py`,
re-exported here), gathered in `Config`. Every default lives there, each field with a
description (`grpo-stream config show` prints them). Configs are TOML files (see
`configs/`); the CLI applies dotted overrides such as `learner.lr=1e-5` on top. A field
that belongs to one variant (`VARIANT_RULES` in `rules.py`, e.g. `loss.tis_cap` with
`behaviour_correction = "tis"`) is refused when set under another, and a renamed field
(`RENAMED`) names its new name. Every process writes the config it runs with to
RUN/config.toml (`write_run_config`), and tools read it back with `load_run_config`.
It holds what was set and the defaults; derived values stay unset and are derived where
used (`resolved_server`, `resolved_loss`, `TaskConfig.resolved_instruction`), so a resume
derives them anew. `server.api_key` is a `SecretStr`: no file or printout holds it.
This module imports nothing heavy, so `--help` and config errors are fast.

    cfg = load_config("configs/cpu.toml", ["learner.max_steps=3"])
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from grpo_stream.config.critic import CriticConfig
from grpo_stream.config.episodes import EnvConfig
from grpo_stream.config.evaluation import EvalConfig
from grpo_stream.config.learning import LearnerConfig, LossConfig, SyncConfig
from grpo_stream.config.lora import LoraConfig, check_lora, vllm_lora_rank
from grpo_stream.config.reward_model import RewardModelConfig
from grpo_stream.config.rules import RENAMED, VARIANT_RULES, VariantRule, inapplicable
from grpo_stream.config.sections import (
    DEFAULT_MODEL,
    TASK_INSTRUCTIONS,
    BufferConfig,
    GeneratorConfig,
    ModelConfig,
    RewardConfig,
    RewardFunctionConfig,
    RunConfig,
    ServerConfig,
    TaskConfig,
    _Section,
)
from grpo_stream.config.transports import transport_traits
from grpo_stream.core.atomic import atomic_write
from grpo_stream.core.errors import ConfigError

__all__ = [
    "DEFAULT_MODEL",
    "TASK_INSTRUCTIONS",
    "BufferConfig",
    "Config",
    "EnvConfig",
    "ConfigError",
    "EvalConfig",
    "GeneratorConfig",
    "LearnerConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "RewardConfig",
    "RewardFunctionConfig",
    "RewardModelConfig",
    "RunConfig",
    "SECRET_FIELDS",
    "ServerConfig",
    "SyncConfig",
    "TaskConfig",
    "RENAMED",
    "VARIANT_RULES",
    "CriticConfig",
    "VariantRule",
    "inapplicable",
    "load_config",
    "load_run_config",
    "write_run_config",
]


def cache_dir() -> Path:
    """Where prepared models live (override with GRPO_STREAM_CACHE)."""
    root = os.environ.get("GRPO_STREAM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "grpo-stream"
    )
    return Path(root)


# Fields whose values are secrets (SecretStr): no file, printout or record holds them.
SECRET_FIELDS: tuple[str, ...] = ("server.api_key",)


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig, description="the run folder")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the policy model")
    server: ServerConfig = Field(default_factory=ServerConfig, description="vLLM server(s)")
    task: TaskConfig = Field(default_factory=TaskConfig, description="the prompt source")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="reward functions")
    env: EnvConfig = Field(default_factory=EnvConfig, description="multi-turn environment")
    generator: GeneratorConfig = Field(
        default_factory=GeneratorConfig, description="sampling groups from the servers"
    )
    buffer: BufferConfig = Field(default_factory=BufferConfig, description="the rollout store")
    loss: LossConfig = Field(default_factory=LossConfig, description="the objective")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="training")
    sync: SyncConfig = Field(default_factory=SyncConfig, description="weight sync to vLLM")
    eval: EvalConfig = Field(
        default_factory=EvalConfig, description="held-out evaluation over policy versions"
    )
    reward_model: RewardModelConfig = Field(
        default_factory=RewardModelConfig,
        description="the reward-model server(s) of the `reward_model` reward",
    )
    critic: CriticConfig = Field(
        default_factory=CriticConfig, description='PPO\'s value model (loss.advantage = "gae")'
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters (or off)")

    @model_validator(mode="after")
    def _check(self) -> Config:
        self._check_variants()
        check_lora(self)
        if self.loss.mask_low >= self.loss.mask_high:
            raise ValueError("loss.mask_low must be below loss.mask_high")
        if self.task.name in ("jsonl", "parquet") and not self.task.path:
            raise ValueError(f"task.path is required for task.name = {self.task.name!r}")
        if any(f.name == "reward_model" for f in self.reward.functions):
            if not self.reward_model.path:
                raise ValueError(
                    "reward_model.path: reward.functions names 'reward_model', so set the "
                    "reward model's folder (`grpo-stream rm train` writes one)"
                )
        if self.task.name == "countdown" and not any(
            f.name == "countdown" for f in self.reward.functions
        ):
            raise ValueError(
                "reward.functions: task.name = 'countdown' needs the 'countdown' reward "
                "(its answers are expressions, not numbers)"
            )
        return self

    def _check_variants(self) -> None:
        for key, rule in inapplicable(self).items():
            field = key.split(".", 1)[1]
            if field in getattr(self, rule.section).model_fields_set:
                raise ValueError(
                    f"{key} applies only with {rule.condition()}, but "
                    f"{rule.where}.{rule.selector} = "
                    f"{getattr(getattr(self, rule.where), rule.selector)!r}: remove it "
                    "or choose that variant"
                )
        if self.loss.policy_loss == "gspo" and self.loss.aggregation != "seq_mean_token_mean":
            raise ValueError(
                f"loss.aggregation = {self.loss.aggregation!r} with loss.policy_loss = 'gspo': "
                "GSPO is defined per sequence (one ratio per sequence, averaged over "
                "sequences); set loss.aggregation = 'seq_mean_token_mean'"
            )

    # Derived on use, never stored: an unset field stays unset (and out of config.toml).
    def resolved_server(self) -> ServerConfig:
        """`server` for launching: its seed (`server.seed`, else `run.seed`) and weight
        transfer backend (`server.weight_transfer_backend`, else nccl for an nccl sync)."""
        s = self.server
        backend = s.weight_transfer_backend or transport_traits(self.sync.transport).server_backend
        derived = {"seed": s.resolved_seed(self.run), "weight_transfer_backend": backend}
        if transport_traits(self.sync.transport).adapters:  # the window, plus one being loaded
            derived["max_lora_rank"] = s.max_lora_rank or vllm_lora_rank(self.lora.rank)
            derived["max_loras"] = s.max_loras or self.learner.max_staleness + 2
        return s.model_copy(deep=True, update=derived)

    def resolved_loss(self) -> LossConfig:
        """`loss` for the learner: the constant normaliser (`loss.constant_normalizer`,
        else generator.max_tokens: Dr. GRPO divides by the longest possible completion)."""
        if self.loss.aggregation != "constant" or self.loss.constant_normalizer is not None:
            return self.loss
        n = float(self.generator.max_tokens)
        return self.loss.model_copy(update={"constant_normalizer": n})

    def buffer_path(self, run_dir: str | os.PathLike | None = None) -> str:
        if self.buffer.path:
            return self.buffer.path
        rd = run_dir or self.run.run_dir
        if rd is None:
            raise ConfigError("buffer.path is not set and there is no run.run_dir to put it in")
        return os.path.join(str(rd), "buffer")

    def to_dict(self) -> dict[str, Any]:
        """The values as TOML-ready data: no unset (None) fields (derived values stay
        unset: see `resolved_server`), no fields the chosen variants ignore (so the result
        loads back without a variant error), and no secret: a literal `server.api_key`
        becomes `api_key_env`, the variable that hands it on (`ServerConfig.key_env`)."""
        data = self.model_dump(mode="json", exclude_none=True)
        for key in inapplicable(self):
            section, field = key.split(".", 1)
            data[section].pop(field, None)
        data["server"].pop("api_key", None)
        if name := self.server.key_env_name():
            data["server"]["api_key_env"] = name
        return data

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())


def _parse_value(raw: str) -> Any:
    """`1e-5` -> float, `true` -> bool, `[1,2]` -> list, anything else -> the string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _split_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), _parse_value(raw.strip())


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        parts, value = _split_override(item)
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {'.'.join(parts)!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return data


def _check_renamed(data: dict, source: str) -> None:
    for old, new in RENAMED.items():
        section, field = old.split(".")
        if isinstance(data.get(section), dict) and field in data[section]:
            raise ConfigError(f"{old} was renamed to {new} ({source}): use {new}")


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        got = e.get("input")
        secret = loc.endswith("api_key")  # a bad key is not echoed either
        hidden = isinstance(got, dict) or got is None or not loc or secret
        shown = "" if hidden else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{shown}" if loc else f"  {msg}")
    return "\n".join(lines)


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    _check_renamed(data, source)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def _read_toml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    data: dict = {} if path is None else _read_toml(path)
    apply_overrides(data, list(overrides or []))
    return config_from_dict(data, "defaults" if path is None else str(path))


# ---------------------------------------------------------------- the run folder's config
RUN_CONFIG = "config.toml"


def run_config_path(run_dir: str | os.PathLike, role: str | None = None) -> Path:
    """RUN/config.<role>.toml where that role wrote its own (its config differed from
    RUN/config.toml), else RUN/config.toml."""
    own = Path(run_dir) / f"config.{role}.toml"
    return own if role and own.is_file() else Path(run_dir) / RUN_CONFIG


def load_run_config(
    run_dir: str | os.PathLike, overrides: list[str] | None = None, role: str | None = None
) -> Config:
    """The config a run folder's processes ran with, plus `overrides` (derived values are
    derived again, from the new values; an API key is read from `server.api_key_env`).

    `role` ("learn", "generate") prefers that process's own file (see `write_run_config`).
    The file is machine-written, so it is read leniently: a field renamed since it was
    written (`task.epochs`) is read under its new name, and a field the chosen variants
    ignore (every one of them in a folder from before `VARIANT_RULES`; `loss.tis_cap`
    after an override `loss.behaviour_correction=mask`) is dropped rather than refused.
    Old names and foreign-variant fields in `overrides` are still refused."""
    path = run_config_path(run_dir, role)
    if not path.is_file():
        raise ConfigError(f"{path}: missing (is {run_dir} a run folder?)")
    data = _read_toml(path)
    for old, new in RENAMED.items():  # a folder from before the rename
        _move(data, old, new)
    overrides = list(overrides or [])
    _drop_ignored(data, overrides)
    apply_overrides(data, overrides)
    return config_from_dict(data, f"{path} + overrides" if overrides else str(path))


def _move(data: dict, old: str, new: str) -> None:
    (section, field), (_, new_field) = old.split("."), new.split(".")
    if isinstance(data.get(section), dict) and field in data[section]:
        value = data[section].pop(field)
        data[section].setdefault(new_field, value)


def _drop_ignored(data: dict, overrides: list[str]) -> None:
    """Drop from a resolved file's `data` the fields that the variants chosen after
    `overrides` ignore (fields the overrides set themselves stay, to be refused)."""
    merged = apply_overrides({k: dict(v) if isinstance(v, dict) else v for k, v in data.items()},
                             overrides)  # fmt: skip
    given = {".".join(_split_override(o)[0]) for o in overrides}
    for r in VARIANT_RULES:
        section = merged.get(r.where, {})
        default = Config.model_fields[r.where].annotation.model_fields[r.selector].default
        if not isinstance(section, dict) or section.get(r.selector, default) in r.allowed:
            continue
        for f in r.fields:
            if f"{r.section}.{f}" not in given and isinstance(data.get(r.section), dict):
                data[r.section].pop(f, None)


def write_run_config(cfg: Config, run_dir: str | os.PathLike, role: str) -> Path:
    """Write the config process `role` runs with into its run folder; returns the path.

    RUN/config.toml is created if absent (atomically; of two processes starting at once,
    one creates it). If it exists with the same values, nothing is written; if it holds
    different values (say `learn` started with other learner settings than `generate`),
    it is left as it is and this process writes RUN/config.<role>.toml instead, and says
    so on stderr. `load_run_config(run_dir, role=...)` prefers that file."""
    rd = Path(run_dir)
    rd.mkdir(parents=True, exist_ok=True)
    target, text = rd / RUN_CONFIG, cfg.to_toml()
    tmp = rd / f".{RUN_CONFIG}.{role}.{os.getpid()}.tmp"
    tmp.write_text(text)
    try:
        os.link(tmp, target)  # atomic create-if-absent: never clobbers another's file
        return target
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    try:  # as written: a literal key and the variable the file names for it are equal
        same = load_config(target).to_dict() == cfg.to_dict()
    except ConfigError:
        same = False
    if same:
        return target
    own = rd / f"config.{role}.toml"
    atomic_write(own, text)
    print(f"[{role}] {target} holds a different config; wrote this process's to {own}",
          file=sys.stderr)  # fmt: skip
    return own
