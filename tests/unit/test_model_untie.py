"""Unit: a tied model (lm_head = embedding) is untied before a disk-synced run serves it.

vLLM's `reload_weights` (the disk sync) finds no lm_head in a tied checkpoint and keeps
the old head, so `resolve_model_path(model, "disk")` hands every process of the run an
untied copy (made once into the cache). NCCL streams the learner's parameters, so a
tied model is used as it is there. The tiny tied Llama is built in tmp_path with
SmolLM2's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo_stream.config import ConfigError, ModelConfig
from grpo_stream.serving.model import build_tiny_model, check_model_dir, is_tied, resolve_model_path


@pytest.fixture(scope="module")
def tied(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tied"
    return build_tiny_model(out, smollm2_dir, hidden=32, heads=2, tie_word_embeddings=True)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next(folder.glob("*.safetensors")))


def test_disk_sync_gets_an_untied_copy(
    tied: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRPO_STREAM_CACHE", str(tmp_path / "cache"))
    assert is_tied(tied) and "lm_head.weight" not in _weights(tied)
    out = resolve_model_path(ModelConfig(path=str(tied)), "disk")
    assert out.parent == tmp_path / "cache" / "untied" and out.name.startswith("tied-")
    assert not is_tied(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    w = _weights(out)
    assert w["lm_head.weight"].shape == (49152, 32)
    torch.testing.assert_close(w["lm_head.weight"], w["model.embed_tokens.weight"])
    torch.testing.assert_close(
        w["model.embed_tokens.weight"], _weights(tied)["model.embed_tokens.weight"]
    )
    check_model_dir(out)  # loads, untied, tokenizer with a chat template and an eos
    ready = (out / ".ready").stat().st_mtime_ns
    again = resolve_model_path(ModelConfig(path=str(tied)), "disk")
    assert again == out and (out / ".ready").stat().st_mtime_ns == ready  # made once


def test_nccl_and_untied_models_are_used_as_they_are(
    tied: Path, smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRPO_STREAM_CACHE", str(tmp_path / "cache"))
    assert resolve_model_path(ModelConfig(path=str(tied)), "nccl") == tied.resolve()
    assert resolve_model_path(ModelConfig(path=str(tied))) == tied.resolve()
    untied = resolve_model_path(ModelConfig(path=str(smollm2_dir)), "disk")
    assert untied == smollm2_dir.resolve()  # the prepared default is written untied
    assert not (tmp_path / "cache").exists()


def test_unreadable_config_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ConfigError, match="model.path"):
        resolve_model_path(ModelConfig(path=str(tmp_path)), "disk")
