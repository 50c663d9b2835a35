"""Bad input through the real CLI: one clear message naming the field, exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grpo_stream.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_malformed_config_names_the_field(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[learner]\nlr = "fast"\nepochs = 0\n')
    out = run_cli("learn", "--config", str(cfg), f"run.run_dir={tmp_path}")
    assert out.returncode == 2
    assert "learner.lr" in out.stderr and "learner.epochs" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_field_and_bad_toml_are_named(tmp_path):
    out = run_cli("run", "learner.learning_rate=1e-5")
    assert out.returncode == 2 and "learner.learning_rate: unknown field" in out.stderr
    bad = tmp_path / "broken.toml"
    bad.write_text("[learner\nlr = 1\n")
    out = run_cli("run", "--config", str(bad))
    assert out.returncode == 2 and str(bad) in out.stderr and "not valid TOML" in out.stderr


def test_missing_config_file_is_named(tmp_path):
    out = run_cli("learn", "--config", str(tmp_path / "nope.toml"))
    assert out.returncode == 2 and "nope.toml" in out.stderr


@pytest.mark.slow
def test_server_not_up_gives_clear_error_after_bounded_wait(tmp_path, tiny_model_dir):
    out = run_cli(
        "generate",
        f"run.run_dir={tmp_path}",
        'server.urls=["http://127.0.0.1:9"]',
        "server.startup_timeout_s=3",
        f"model.path={tiny_model_dir}",
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "did not answer" in out.stderr or "answered /health" in out.stderr
    assert "http://127.0.0.1:9" in out.stderr
    assert "Traceback" not in out.stderr


def test_old_names_and_foreign_variant_settings_are_named(tmp_path):
    out = run_cli("learn", f"run.run_dir={tmp_path}", "task.epochs=2")
    assert out.returncode == 2 and "task.epochs was renamed to task.passes" in out.stderr
    cfg = tmp_path / "old.toml"
    cfg.write_text("[generator]\nmax_groups = 10\n")
    out = run_cli("generate", "--config", str(cfg), f"run.run_dir={tmp_path}")
    assert out.returncode == 2
    assert "generator.max_groups was renamed to generator.stop_after_groups" in out.stderr
    out = run_cli("learn", f"run.run_dir={tmp_path}", "loss.behaviour_correction=mask",
                  "loss.tis_cap=3")  # fmt: skip
    assert out.returncode == 2 and "loss.tis_cap applies only with" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "config.toml").exists()
