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


def test_checkpoints_are_periodic_by_default():
    """Resume is advertised, so a default run checkpoints every few steps, not only at
    the end; the shipped configs keep it on."""
    assert load_config(None).learner.checkpoint_every == 5
    for path in CONFIGS:
        assert load_config(path).learner.checkpoint_every > 0, path.name


@pytest.mark.parametrize(
    "old, new, value",
    [
        ("task.epochs", "task.passes", "2"),
        ("generator.max_groups", "generator.stop_after_groups", "5"),
    ],
)
def test_renamed_fields_name_the_new_name(old, new, value, tmp_path):
    with pytest.raises(ConfigError, match=f"{old} was renamed to {new}"):
        load_config(None, [f"{old}={value}"])
    section, field = old.split(".")
    path = tmp_path / "old.toml"
    path.write_text(f"[{section}]\n{field} = {value}\n")
    with pytest.raises(ConfigError, match=f"{old} was renamed to {new}") as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_new_names_take_effect():
    cfg = load_config(None, ["generator.stop_after_groups=7", "task.name=jsonl",
                             "task.path=x.jsonl", "task.passes=3"])  # fmt: skip
    assert cfg.generator.stop_after_groups == 7 and cfg.task.passes == 3
    assert cfg.learner.epochs == 2  # mu keeps its name


@pytest.mark.parametrize(
    "overrides, field, variant",
    [
        (["loss.behaviour_correction=mask", "loss.tis_cap=3"], "loss.tis_cap", "'tis'"),
        (["loss.behaviour_correction=none", "loss.tis_cap=3"], "loss.tis_cap", "'tis'"),
        (["loss.mask_low=0.3"], "loss.mask_low", "'mask'"),
        (["loss.behaviour_correction=none", "loss.mask_high=3"], "loss.mask_high", "'mask'"),
        (["loss.constant_normalizer=64"], "loss.constant_normalizer", "'constant'"),
        (["buffer.backend=zarr", "buffer.rollup_segments=8"], "buffer.rollup_segments", "'arrow'"),
        (["sync.transport=nccl", "sync.keep_last=3"], "sync.keep_last", "'disk'"),
        (["sync.transport=none", "sync.pause_mode=keep"], "sync.pause_mode", "'nccl'"),
        (["task.countdown_max_target=50"], "task.countdown_max_target", "'countdown'"),
        (["task.shuffle=true"], "task.shuffle", "'jsonl'"),
        (
            [
                "task.name=countdown",
                'reward.functions=[{name="countdown"}]',
                'task.operations=["*"]',
            ],
            "task.operations",
            "'arithmetic'",
        ),  # fmt: skip
    ],
)
def test_a_setting_of_another_variant_is_refused(overrides, field, variant):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert f"{field} applies only with" in msg and variant in msg, msg
    assert "Value error" not in msg and "<root>" not in msg


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.behaviour_correction=mask", "loss.mask_low=0.3", "loss.mask_high=3"],
        ["loss.tis_cap=3"],
        ["loss.aggregation=constant", "loss.constant_normalizer=64"],
        ["loss.behaviour_correction=none"],  # defaults of the other variants are fine
        ["buffer.backend=zarr"],
        [
            "task.name=countdown",
            'reward.functions=[{name="countdown"}]',
            "task.countdown_max_target=50",
        ],  # fmt: skip
        ["loss.policy_loss=gspo", "loss.aggregation=seq_mean_token_mean", "loss.dual_clip_c=3"],
    ],
)
def test_settings_of_the_chosen_variant_are_accepted(overrides, tmp_path):
    cfg = load_config(None, overrides)
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())  # the resolved file leaves out what the variant ignores
    assert load_config(again) == cfg


def test_resolved_toml_leaves_out_ignored_fields():
    text = load_config(None, ["loss.behaviour_correction=mask"]).to_toml()
    assert "mask_low = 0.5" in text and "tis_cap" not in text
    assert "prompt_column" not in text and "countdown_max_target" not in text


@pytest.mark.parametrize("aggregation", ["token_mean", "constant"])
def test_gspo_needs_the_sequence_aggregation(aggregation):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["loss.policy_loss=gspo", f"loss.aggregation={aggregation}"])
    msg = str(e.value)
    assert "loss.aggregation" in msg and "GSPO is defined per sequence" in msg
    assert "seq_mean_token_mean" in msg


def test_gspo_with_the_default_aggregation_is_refused_too():
    """The default aggregation is token_mean: gspo alone must say what to change."""
    with pytest.raises(ConfigError, match="set loss.aggregation = 'seq_mean_token_mean'"):
        load_config(None, ["loss.policy_loss=gspo"])


def test_rollup_can_be_turned_off_from_a_file():
    """TOML has no null: `0` is how a file turns roll-up off (the writer's None)."""
    assert load_config(None, ["buffer.rollup_segments=0"]).buffer.writer_opts() == {
        "fsync": True,
        "rollup_segments": None,
    }
    assert load_config(None, ["buffer.rollup_segments=8"]).buffer.writer_opts() == {
        "fsync": True,
        "rollup_segments": 8,
    }
    with pytest.raises(ConfigError, match="buffer.rollup_segments"):
        load_config(None, ["buffer.rollup_segments=1"])


def test_endless_passes_can_be_written_in_a_file(tmp_path):
    """TOML has no null: `task.passes = 0` is how a file asks for endless passes."""
    from grpo_stream.tasks import make_prompt_source

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?", "answer": "4"}\n')
    base = ["task.name=jsonl", f"task.path={data}", "task.num_prompts=5"]
    endless = load_config(None, [*base, "task.passes=0"]).task
    assert [p.meta["row"] for p in make_prompt_source(endless)] == [0, 1, 0, 1, 0]
    once = load_config(None, base).task
    assert len(list(make_prompt_source(once))) == 2
