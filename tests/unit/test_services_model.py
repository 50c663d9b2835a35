"""Unit tests for grpo_stream.serving.model path resolution (no model conversion here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from grpo_stream.config import ConfigError, ModelConfig
from grpo_stream.serving.model import find_gguf, is_ready, resolve_model_path


def test_missing_folder_names_model_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="model.path") as err:
        resolve_model_path(ModelConfig(path=str(missing)))
    assert "no such folder" in str(err.value)


def test_folder_without_config_json_names_model_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.path") as err:
        resolve_model_path(ModelConfig(path=str(tmp_path)))
    assert "config.json" in str(err.value)


def test_local_folder_resolves_to_itself(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(ModelConfig(path=str(tmp_path))) == tmp_path.resolve()


def test_ready_needs_the_marker(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert not is_ready(tmp_path)
    (tmp_path / ".ready").write_text("ok\n")
    assert is_ready(tmp_path)


def test_the_gguf_ships_in_the_wheel() -> None:
    gguf = find_gguf()
    assert gguf.suffix == ".gguf"
    assert gguf.stat().st_size > 50_000_000
