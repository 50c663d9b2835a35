"""The CLI's config side: `config show`, the run folder's config.toml written by every
process and read back by replay and buffer tools, user errors as one line, and output
into a closed pipe ending quietly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from grpo_stream import cli
from grpo_stream.config import (
    Config,
    ConfigError,
    load_config,
    load_run_config,
    write_run_config,
)
from grpo_stream.core.errors import UserError

ROOT = Path(__file__).parents[2]
CPU = ROOT / "configs" / "cpu.toml"


def _leaves(model: type, prefix: str = ""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            yield from _leaves(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def test_every_field_has_a_description():
    missing = [key for key, f in _leaves(Config) if not (f.description or "").strip()]
    assert missing == []


def test_config_show_prints_values_with_descriptions_and_loads_back(capsys, tmp_path):
    code = cli.main(["config", "show", "--config", str(CPU), "learner.lr=3e-5"])
    out = capsys.readouterr().out
    assert code == 0
    assert "\nlr = 3e-05\n" in out and '\nname = "cpu-demo"\n' in out
    assert "# mu: passes over each batch per learner step\nepochs = 2\n" in out
    for key, field in _leaves(Config):
        first_words = " ".join(field.description.split()[:4])
        assert first_words in out.replace("\n# ", " "), key
    assert "# tis_cap = 2.0" not in out  # the default correction is tis: in effect
    assert "# mask_low = 0.5  (ignored: applies only with loss.behaviour_correction" in out
    assert "# stop_after_groups = (unset)" in out
    shown = tmp_path / "shown.toml"
    shown.write_text(out)
    assert load_config(shown) == load_config(CPU, ["learner.lr=3e-5"])


def test_config_show_reports_a_bad_override_as_one_line(capsys):
    assert cli.main(["config", "show", "loss.policy_loss=gspo"]) == 2
    err = capsys.readouterr().err
    assert "GSPO is defined per sequence" in err and "Traceback" not in err


# ---------------------------------------------------------------- the run folder's config
def _cfg(tmp_path: Path, *overrides: str) -> Config:
    return load_config(CPU, [f"run.run_dir={tmp_path / 'run'}", *overrides])


def test_processes_started_alone_write_the_run_config(tmp_path):
    run = tmp_path / "run"
    gen_cfg = _cfg(tmp_path, "generator.temperature=0.9")
    assert cli._prepare_run_dir(gen_cfg, "generate") == str(run)
    assert load_config(run / "config.toml") == gen_cfg
    # the learner with the same config: nothing new is written
    assert cli._prepare_run_dir(_cfg(tmp_path, "generator.temperature=0.9"), "learn")
    assert sorted(p.name for p in run.glob("config*.toml")) == ["config.toml"]
    # a learner with other settings keeps the generator's file and writes its own
    learn_cfg = _cfg(tmp_path, "generator.temperature=0.9", "learner.lr=7e-5")
    cli._prepare_run_dir(learn_cfg, "learn")
    assert load_config(run / "config.toml") == gen_cfg
    assert load_config(run / "config.learn.toml") == learn_cfg
    assert load_run_config(run, role="learn").learner.lr == 7e-5
    assert load_run_config(run, role="generate").learner.lr == 2e-5
    assert load_run_config(run).generator.temperature == 0.9


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_children_of_run_find_their_config_unchanged(path, tmp_path):
    """`run` writes RUN/config.toml and its children load it: each must see the same
    values, so none writes a config.<role>.toml of its own."""
    run = tmp_path / "run"
    write_run_config(load_config(path, [f"run.run_dir={run}"]), run, "run")
    for role in ("generate", "learn"):
        assert write_run_config(load_config(run / "config.toml"), run, role).name == "config.toml"
    assert [p.name for p in run.glob("config*.toml")] == ["config.toml"]


def test_buffer_path_alone_puts_the_config_beside_the_buffer(tmp_path):
    cfg = load_config(CPU, [f"buffer.path={tmp_path / 'r2' / 'store'}"])
    assert cli._prepare_run_dir(cfg, "generate") == str(tmp_path / "r2")
    again = load_run_config(tmp_path / "r2")
    assert again.buffer.path == str(tmp_path / "r2" / "store")
    assert again.run.run_dir == str(tmp_path / "r2")


def test_replay_accepts_a_hand_started_run_folder(tmp_path, capsys):
    """Before, `replay` refused a folder that `generate`/`learn` made alone: no config.toml.
    Now it gets past the config to the first missing run file (the learner's log)."""
    from grpo_stream.learner.replay import replay_cli

    run = tmp_path / "run"
    cli._prepare_run_dir(_cfg(tmp_path), "generate")
    cli._prepare_run_dir(_cfg(tmp_path), "learn")
    assert replay_cli([str(run)]) == 2
    err = capsys.readouterr().err
    assert "trained_batches.jsonl" in err and "config.toml" not in err


def test_run_config_overrides_may_switch_variant(tmp_path):
    """A resolved file holds every field of its variant; an override that picks another
    variant drops those rather than refusing them, but its own wrong fields are refused."""
    write_run_config(_cfg(tmp_path), tmp_path / "run", "learn")
    cfg = load_run_config(tmp_path / "run", ["loss.behaviour_correction=mask"])
    assert cfg.loss.behaviour_correction == "mask" and cfg.loss.mask_low == 0.5
    with pytest.raises(ConfigError, match="loss.tis_cap applies only with"):
        load_run_config(tmp_path / "run", ["loss.behaviour_correction=mask", "loss.tis_cap=3"])
    with pytest.raises(ConfigError, match="config.toml: missing"):
        load_run_config(tmp_path / "nowhere")


def test_buffer_tools_find_the_store_through_the_run_config(tmp_path, capsys):
    from bench.synth import make_groups
    from grpo_stream.buffer.store import open_writer
    from grpo_stream.cli.buffer import run_cli

    store = tmp_path / "elsewhere" / "store"
    cfg = load_config(CPU, [f"run.run_dir={tmp_path / 'run'}", f"buffer.path={store}"])
    cli._prepare_run_dir(cfg, "generate")
    w = open_writer(str(store), backend="arrow", run_id="t", fsync=False)
    w.append_groups(make_groups(3))
    w.close()
    assert run_cli(["stats", str(tmp_path / "run")]) == 0
    assert f"store {store} (arrow)" in capsys.readouterr().out


# ---------------------------------------------------------------- user errors, pipes
def _user_error_classes():
    from grpo_stream.buffer.base import (
        CorruptSegmentError,
        GroupsDeletedError,
        StoreNotFoundError,
        WriterLockedError,
    )
    from grpo_stream.buffer.schema import SchemaVersionError
    from grpo_stream.generator.loop import GeneratorError
    from grpo_stream.generator.pool import NoServerAvailable
    from grpo_stream.learner.replay import ReplayError
    from grpo_stream.serving.client import ServerUnavailable, VLLMError
    from grpo_stream.serving.model import ModelPrepError
    from grpo_stream.serving.server import ServerStartError
    from grpo_stream.sync.base import WeightSyncError
    from grpo_stream.tasks.prompt import TaskError

    return {
        ConfigError: ValueError,
        TaskError: ValueError,
        SchemaVersionError: ValueError,
        ReplayError: ValueError,
        GeneratorError: RuntimeError,
        NoServerAvailable: RuntimeError,
        ServerStartError: RuntimeError,
        ServerUnavailable: RuntimeError,
        VLLMError: RuntimeError,
        ModelPrepError: RuntimeError,
        WeightSyncError: RuntimeError,
        WriterLockedError: RuntimeError,
        CorruptSegmentError: RuntimeError,
        GroupsDeletedError: LookupError,
        StoreNotFoundError: FileNotFoundError,
    }


def test_user_errors_share_one_base_and_keep_their_old_one():
    for cls, old_base in _user_error_classes().items():
        assert issubclass(cls, UserError) and issubclass(cls, old_base), cls.__name__


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "grpo_stream.cli", *args],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_a_user_error_subclass_is_one_line_with_status_2(tmp_path):
    """A user error other than a ConfigError (the task file, found by `generate`'s
    preflight or its prompt source): one line, status 2."""
    proc = _cli(
        "generate",
        f"run.run_dir={tmp_path}",
        "task.name=jsonl",
        f"task.path={tmp_path / 'missing.jsonl'}",
        stdout=subprocess.DEVNULL,
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("grpo-stream generate:")]
    assert len(lines) == 1, err
    assert lines[0].endswith(f"task.path: file not found: {tmp_path}/missing.jsonl")
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["config", "show"], ["buffer", "stats", "RUN"]])
def test_output_into_a_closed_pipe_ends_quietly(argv, tmp_path):
    """`grpo-stream buffer stats RUN | head -1`: the reader is gone before the output is
    written; the command stops with status 141 (as SIGPIPE), no BrokenPipeError."""
    from bench.synth import make_groups
    from grpo_stream.buffer.store import open_writer

    w = open_writer(str(tmp_path / "buffer"), backend="arrow", run_id="t", fsync=False)
    w.append_groups(make_groups(40, version=0))
    w.close()
    argv = [str(tmp_path) if a == "RUN" else a for a in argv]
    proc = _cli(*argv, stdout=subprocess.PIPE)
    proc.stdout.close()  # the reader (`head`) exits before the command writes
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert "BrokenPipeError" not in err and "Traceback" not in err and err == ""


def test_head_dash_1_on_buffer_stats(tmp_path):
    from bench.synth import make_groups
    from grpo_stream.buffer.store import open_writer

    w = open_writer(str(tmp_path / "buffer"), backend="arrow", run_id="t", fsync=False)
    w.append_groups(make_groups(5))
    w.close()
    cmd = f"{sys.executable} -m grpo_stream.cli buffer stats {tmp_path} | head -1"
    out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.stdout.startswith(f"store {tmp_path}/buffer (arrow)")
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr


def test_a_run_folder_from_before_the_renames_still_loads(tmp_path, capsys):
    """Old resolved files hold `task.epochs` and every variant's fields; `replay` and
    `run --resume` read them (a user's own file with the old name is refused)."""
    run = tmp_path / "old"
    run.mkdir()
    old = load_config(CPU).model_dump(mode="json", exclude_none=True)  # as before: all fields
    old["task"]["epochs"] = old["task"].pop("passes")
    (run / "config.toml").write_text(tomli_w.dumps(old))
    cfg = load_run_config(run, ["loss.behaviour_correction=mask"])
    assert cfg.task.passes == 1 and cfg.loss.behaviour_correction == "mask"
    with pytest.raises(ConfigError, match="task.epochs was renamed to task.passes"):
        load_config(run / "config.toml")
    with pytest.raises(ConfigError, match="task.epochs was renamed"):
        load_run_config(run, ["task.epochs=2"])
