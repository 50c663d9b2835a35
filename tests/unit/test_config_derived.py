"""Derived values are derived where they are used, never stored (issue 20, defect 5).

The servers' seed (`run.seed` unless `server.seed`), the weight transfer backend (nccl
for `sync.transport = "nccl"`), the constant normaliser of the loss
(`generator.max_tokens` unless `loss.constant_normalizer`) and the task's instruction
(per `task.name` unless `task.instruction`) stay unset in the config and out of
RUN/config.toml, so a resume with new overrides derives them from the new values."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from grpo_stream.config import (
    TASK_INSTRUCTIONS,
    load_config,
    load_run_config,
    write_run_config,
)
from grpo_stream.serving.server import build_command

DERIVED = {
    "server": ("seed", "weight_transfer_backend"),
    "loss": ("constant_normalizer",),
    "task": ("instruction",),
}


def launched_flags(cfg) -> list[str]:
    return build_command(Path("m"), "p", 8000, cfg.resolved_server())


def _flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_run_config_holds_only_set_values_and_defaults(tmp_path: Path) -> None:
    cfg = load_config(None, ["loss.aggregation='constant'", "sync.transport='nccl'"])
    data = tomllib.loads(write_run_config(cfg, tmp_path, "run").read_text())
    for section, fields in DERIVED.items():
        for f in fields:
            assert f not in data[section], f"{section}.{f} was written"
    assert data["loss"]["aggregation"] == "constant" and data["sync"]["transport"] == "nccl"
    assert data["run"]["seed"] == 0 and data["generator"]["max_tokens"] == 32  # defaults
    # what the first run derived
    assert _flag(launched_flags(cfg), "--seed") == "0"
    assert _flag(launched_flags(cfg), "--weight-transfer-config") == '{"backend": "nccl"}'
    assert cfg.resolved_loss().constant_normalizer == 32.0
    assert cfg.task.resolved_instruction() == "Reply with only the number."


def test_a_resume_derives_from_its_new_overrides(tmp_path: Path) -> None:
    cfg = load_config(None, ["loss.aggregation='constant'", "sync.transport='nccl'"])
    write_run_config(cfg, tmp_path, "run")
    resumed = load_run_config(
        tmp_path,
        ["run.seed=7", "generator.max_tokens=48", "sync.transport='disk'",
         "task.name='countdown'", "reward.functions=[{name='countdown'}]"],
    )  # fmt: skip
    cmd = launched_flags(resumed)
    assert _flag(cmd, "--seed") == "7"
    assert "--weight-transfer-config" not in cmd
    assert resumed.resolved_loss().constant_normalizer == 48.0
    assert resumed.task.resolved_instruction() == TASK_INSTRUCTIONS["countdown"]
    again = load_run_config(tmp_path)  # no override: the same derived values as at first
    assert _flag(launched_flags(again), "--seed") == "0"
    assert again.resolved_loss().constant_normalizer == 32.0


def test_values_the_user_set_are_kept_over_a_resume(tmp_path: Path) -> None:
    cfg = load_config(None, ["server.seed=2", "loss.aggregation='constant'",
                             "loss.constant_normalizer=10", "task.instruction='Think.'",
                             "server.weight_transfer_backend='nccl'"])  # fmt: skip
    data = tomllib.loads(write_run_config(cfg, tmp_path, "run").read_text())
    assert data["server"]["seed"] == 2 and data["loss"]["constant_normalizer"] == 10.0
    resumed = load_run_config(tmp_path, ["run.seed=7", "generator.max_tokens=48"])
    cmd = launched_flags(resumed)
    assert _flag(cmd, "--seed") == "2"
    assert _flag(cmd, "--weight-transfer-config") == '{"backend": "nccl"}'
    assert resumed.resolved_loss().constant_normalizer == 10.0
    assert resumed.task.resolved_instruction() == "Think."
    assert resumed.resolved_loss() is resumed.loss  # nothing to derive: the section itself


def test_the_learner_step_divides_by_the_derived_normaliser(tiny_model_dir) -> None:
    from learner_helpers import step_setup

    from grpo_stream.core import metric_names as M

    losses = {}
    for max_tokens in (32, 64):
        cfg, _, runner, samples, advs = step_setup(tiny_model_dir)
        cfg.loss.aggregation = "constant"  # set after load: no stored normaliser goes stale
        cfg.generator.max_tokens = max_tokens
        losses[max_tokens] = runner.run(samples, advs)[M.LOSS]
    assert losses[32] != 0 and losses[32] == pytest.approx(2 * losses[64], rel=1e-5)
