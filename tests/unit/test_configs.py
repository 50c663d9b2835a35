"""Every shipped config parses, and overrides/validation name their fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from grpo_stream.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"cpu.toml", "tiny.toml", "gpu.toml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert load_config(again) == cfg


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["learner.lr=3e-5", 'generator.stop=["\\n"]', "loss.beta=0.1"])
    assert cfg.learner.lr == 3e-5 and cfg.generator.stop == ["\n"] and cfg.loss.beta == 0.1


@pytest.mark.parametrize(
    "override, field",
    [
        ("learner.epochs=0", "learner.epochs"),
        ("generator.group_size=1", "generator.group_size"),
        ("sync.transport=ftp", "sync.transport"),
        ("nosection.x=1", "nosection"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value)


def test_cpu_default_is_the_demo():
    cfg = load_config(CONFIGS[[p.name for p in CONFIGS].index("cpu.toml")])
    assert cfg.model.path == "smollm2-135m" and cfg.server.host == "127.0.0.1"
    assert cfg.learner.epochs >= 2 and cfg.sync.every == 1
