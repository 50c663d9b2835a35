"""Integration: prepare SmolLM2, build a tiny model, drive a real vLLM CPU server.

Slow (minutes): converts the GGUF once (cached under cache_dir(), GRPO_STREAM_CACHE
respected), starts one real `vllm.entrypoints.openai.api_server` on a tiny random Llama,
samples with token ids and log-probs, runs the disk weight-reload cycle, checks that a
reload that fails half-way is not resumed (the server stays up and paused), and checks
that stopping it leaves no process behind.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from grpo_stream.config import ServerConfig, SyncConfig
from grpo_stream.serving.client import VLLMClient, get_json, post_json
from grpo_stream.serving.model import SMOLLM2_VOCAB, build_tiny_model
from grpo_stream.serving.server import VLLMServer
from grpo_stream.sync import WeightSyncError
from grpo_stream.sync.disk import reload_on_server, validate_weights_dir

pytestmark = pytest.mark.slow


@pytest.fixture
def smollm2(smollm2_dir: Path) -> Path:
    return smollm2_dir  # conftest: prepared once into cache_dir()


@pytest.fixture
def tiny(tiny_model_dir: Path) -> Path:
    return tiny_model_dir  # conftest's tiny Llama (these tests never write into it)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """This module's own server, not conftest's shared one: the reload test needs a
    server still at weight version "default", and its stop test kills it."""
    cfg = ServerConfig(max_model_len=256, startup_timeout_s=600)
    log = tmp_path_factory.mktemp("logs") / "vllm.log"
    srv = VLLMServer(tiny_model_dir, "policy", free_port(), cfg, log)
    with srv:
        srv.wait_healthy()
        yield srv


def test_default_model_loads_and_answers(smollm2: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2)
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert model.config.vocab_size == SMOLLM2_VOCAB
    assert model.get_input_embeddings().weight.dtype == torch.float32
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = prompt["input_ids"] if not torch.is_tensor(prompt) else prompt
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert answer, "the prepared model produced no text"


def test_tiny_model_is_smollm2_shaped(tiny: Path) -> None:
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["vocab_size"] == SMOLLM2_VOCAB
    assert cfg["tie_word_embeddings"] is False  # see grpo_stream.serving.model: vLLM reload
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    assert (tiny / "model.safetensors").is_file()


def test_completions_return_token_ids_and_logprobs(server: VLLMServer) -> None:
    prompt = [1, 9690, 198, 2683, 314, 216, 34, 31, 35, 47, 2]
    body = {
        "model": "policy",
        "prompt": prompt,
        "n": 2,
        "max_tokens": 8,
        "logprobs": 0,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        "temperature": 1.0,
    }
    status, resp = post_json(server.url + "/v1/completions", body)
    assert status == 200, resp
    choices = resp["choices"]
    assert len(choices) == 2
    for ch in choices:
        ids = ch["token_ids"]
        lps = ch["logprobs"]["token_logprobs"]
        assert 1 <= len(ids) <= 8
        assert len(lps) == len(ids)
        assert all(isinstance(t, int) and 0 <= t < SMOLLM2_VOCAB for t in ids)
        assert all(math.isfinite(x) and x <= 0 for x in lps)
        assert ch["logprobs"]["tokens"] == [f"token_id:{t}" for t in ids]
        assert ch["prompt_token_ids"] == prompt


def test_temperature_zero_with_n_above_one_is_refused(server: VLLMServer) -> None:
    body = {"model": "policy", "prompt": [1, 2, 3], "n": 2, "max_tokens": 2, "temperature": 0}
    status, _ = post_json(server.url + "/v1/completions", body)
    assert status == 400


def _hf_logprobs(model_dir: Path, prompt: list[int], gen: list[int]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + gen])).logits.float()  # [1, P+G, V]
    lp = torch.log_softmax(logits, -1)[0]  # [P+G, V]
    return [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(gen)]


def _sample(server: VLLMServer, prompt: list[int]) -> tuple[list[int], list[float]]:
    body = {
        "model": "policy",
        "prompt": prompt,
        "max_tokens": 12,
        "logprobs": 0,
        "return_token_ids": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
    }
    status, resp = post_json(server.url + "/v1/completions", body)
    assert status == 200, resp
    choice = resp["choices"][0]
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


def test_disk_reload_serves_the_new_weights(
    server: VLLMServer, tiny: Path, smollm2: Path, tmp_path: Path
) -> None:
    """pause -> reload_weights -> version -> resume; vLLM's log-probs then match HF's."""
    prompt = [1, 4093, 198, 1780, 314, 216, 34, 27, 35, 47, 2, 198, 1, 520, 9531, 198]
    gen, lps = _sample(server, prompt)
    before = _hf_logprobs(tiny, prompt, gen)
    assert max(abs(a - b) for a, b in zip(lps, before, strict=True)) < 1e-3

    new = build_tiny_model(tmp_path / "tiny-seed1", smollm2, seed=1)
    assert get_json(server.url + "/weight_info") == (200, {"weight_version": "default"})
    assert post_json(server.url + "/pause?mode=wait")[0] == 200
    assert get_json(server.url + "/is_paused") == (200, {"is_paused": True})
    rpc = {"method": "reload_weights", "kwargs": {"weights_path": str(new)}}
    assert post_json(server.url + "/collective_rpc", rpc, timeout=120) == (200, {"results": [None]})
    status, resp = post_json(server.url + "/update_weight_version", {"new_version": "1"})
    assert (status, resp) == (200, {"success": True, "new_version": "1"})
    assert post_json(server.url + "/resume") == (200, {"status": "resumed"})
    assert get_json(server.url + "/weight_info") == (200, {"weight_version": "1"})

    gen, lps = _sample(server, prompt)
    after = _hf_logprobs(new, prompt, gen)
    assert max(abs(a - b) for a, b in zip(lps, after, strict=True)) < 1e-3


def test_failed_reload_leaves_the_server_paused(
    server: VLLMServer, smollm2: Path, tmp_path: Path
) -> None:
    """A folder whose last tensor has the wrong shape passes the header check, and vLLM's
    layer-by-layer reload fails on it half-way. The sync names the server and never
    resumes it: it stays up and paused (a /resume would kill its engine on the next
    request, see sync/disk.py), at the version it had."""
    import torch
    from safetensors.torch import load_file, save_file

    bad = build_tiny_model(tmp_path / "tiny-seed2", smollm2, seed=2)
    weights = load_file(bad / "model.safetensors")
    assert list(weights)[-1] == "model.norm.weight"  # loaded after every layer
    weights["model.norm.weight"] = torch.ones(7)  # [hidden] = [128] expected
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    validate_weights_dir(bad)  # whole files: only vLLM can tell
    version = get_json(server.url + "/weight_info")

    async def reload() -> None:
        async with VLLMClient(120) as client:
            await reload_on_server(client, server.url, bad, 9, SyncConfig(timeout_s=120))

    with pytest.raises(WeightSyncError) as info:
        asyncio.run(reload())
    message = str(info.value)
    assert message.startswith(f"{server.url}: reload_weights failed") and "left paused" in message
    assert "torch.Size([7])" in message  # vLLM's own reason travels with it
    assert server.is_alive() and get_json(server.url + "/health")[0] == 200
    assert get_json(server.url + "/is_paused") == (200, {"is_paused": True})
    assert get_json(server.url + "/weight_info") == version


def test_stop_leaves_no_process(server: VLLMServer) -> None:
    """Runs last: stops the module's server and checks its whole tree is gone."""
    psutil = pytest.importorskip("psutil")
    root = psutil.Process(server.pid)
    family = [root, *root.children(recursive=True)]
    names = [p.name() for p in family]
    assert any("EngineCore" in n for n in names), names
    server.stop()
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    assert not server.is_alive()


def test_serve_cli_prints_urls_and_stops_cleanly(tiny: Path, tmp_path: Path) -> None:
    """`python -m grpo_stream.serving.serve --config X`: URL lines, then SIGTERM -> exit 0, no orphans."""
    psutil = pytest.importorskip("psutil")
    port = free_port()
    config = tmp_path / "serve.toml"
    config.write_text(
        f'[run]\noutput_dir = "{tmp_path}"\n[model]\npath = "{tiny}"\n'
        f"[server]\nport = {port}\nmax_model_len = 256\nstartup_timeout_s = 600\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "grpo_stream.serving.serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("URL "):
                break
        assert lines and lines[-1].strip() == f"URL http://127.0.0.1:{port}", "".join(lines)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert get_json(f"http://127.0.0.1:{port}/weight_info") == (
            200,
            {"weight_version": "default"},
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    assert (tmp_path / "logs" / "vllm-0.log").is_file()
