"""Integration: NCCL weight sync into a real vLLM GPU server (needs 2 CUDA devices).

A vLLM server with `--weight-transfer-config '{"backend":"nccl"}'` serves a tiny random
Llama on GPU 0 (`server.gpus = [[0]]`: its CUDA_VISIBLE_DEVICES); the trainer holds the
same model on GPU 1 (NCCL refuses two ranks of one communicator on the same GPU, so this
also shows the send thread runs on the trainer's device, not a new thread's device 0),
perturbs it, and `NCCLSync.push`es it. Checked: the server reports the new /weight_info
version, greedy log-probs changed, and they now match the perturbed model's own
log-probs (computed with Hugging Face on GPU 1) on the same tokens. A second push reuses
the NCCL group. Skipped without 2 GPUs (this CPU box). The weight source itself (vLLM
0.32 and 0.33 contracts) is tests/unit/test_vllm_api.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import free_port

from grpo_stream.config import ModelConfig, ServerConfig, SyncConfig
from grpo_stream.serving.model import build_tiny_model, resolve_model_path
from grpo_stream.serving.server import VLLMServer, get_json, post_json
from grpo_stream.sync.base import WeightSyncError
from grpo_stream.sync.nccl import NCCLSync, local_address_for, sender_device

PROMPT = [1, 9690, 198, 2683, 314, 260, 2023, 282]
TRAINER = "cuda:1"  # the server is on GPU 0: a send thread left on device 0 would collide
NEEDS_TWO_GPUS = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="NCCL weight sync needs CUDA and 2 GPUs (trainer and server on distinct devices)",
)


def _greedy(url: str) -> tuple[list[int], list[float]]:
    body = {
        "model": "policy",
        "prompt": PROMPT,
        "max_tokens": 8,
        "temperature": 0.0,
        "n": 1,
        "logprobs": 0,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
    }
    status, out = post_json(f"{url}/v1/completions", body, timeout=120)
    assert status == 200, out
    choice = out["choices"][0]
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


def _hf_logprobs(model, tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor([PROMPT + tokens], device=TRAINER)  # [1, P+C]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(PROMPT) - 1 : -1].float()  # [C, V]
    lp = torch.log_softmax(logits, dim=-1)
    return lp.gather(1, torch.tensor(tokens, device=TRAINER)[:, None])[:, 0].cpu()  # [C]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = resolve_model_path(ModelConfig())
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", tok)


@pytest.fixture(scope="module")
def gpu0_server(tiny: Path, tmp_path_factory: pytest.TempPathFactory):
    cfg = ServerConfig(
        max_model_len=256,
        startup_timeout_s=600,
        weight_transfer_backend="nccl",
        gpus=[[0]],
        gpu_memory_utilization=0.3,
    )
    log = tmp_path_factory.mktemp("logs") / "vllm.log"
    with VLLMServer(tiny, "policy", free_port(), cfg, log, gpus=cfg.gpus[0]) as srv:
        srv.wait_healthy()
        yield srv


@pytest.mark.gpu
@pytest.mark.slow
@NEEDS_TWO_GPUS
def test_nccl_push_changes_served_weights(tiny: Path, gpu0_server: VLLMServer) -> None:
    from transformers import AutoModelForCausalLM

    url = gpu0_server.url
    tokens0, lp0 = _greedy(url)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).to(TRAINER)
    assert sender_device(model) == torch.device(TRAINER)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        model.lm_head.weight.mul_(1.05)
    sync = NCCLSync(SyncConfig(transport="nccl", timeout_s=300), [url])
    try:
        m = sync.push(model, 1)
        assert get_json(f"{url}/weight_info") == (200, {"weight_version": "1"})
        assert m["sync_pause_s"] >= m["sync_transfer_s"] > 0
        tokens1, lp1 = _greedy(url)
        hf1 = _hf_logprobs(model, tokens1)
        assert torch.allclose(torch.tensor(lp1), hf1, atol=1e-2), (lp1, hf1.tolist())
        old_on_new = _hf_logprobs(model, tokens0)
        assert (torch.tensor(lp0) - old_on_new).abs().max() > 0.1  # the weights did change
        with torch.no_grad():
            model.lm_head.weight.mul_(1.1)
        sync.push(model, 2)  # the NCCL group is reused
        assert get_json(f"{url}/weight_info") == (200, {"weight_version": "2"})
        tokens2, lp2 = _greedy(url)
        assert torch.allclose(torch.tensor(lp2), _hf_logprobs(model, tokens2), atol=1e-2)
    finally:
        sync.close()


def test_a_cpu_model_is_refused_with_the_field() -> None:
    with pytest.raises(WeightSyncError, match="learner.device"):
        sender_device(torch.nn.Linear(2, 2))


def test_master_address_is_loopback_for_local_servers() -> None:
    assert local_address_for(["http://127.0.0.1:8000", "http://localhost:8001"]) == "127.0.0.1"
    assert local_address_for(["http://127.0.0.1:8000"]) == "127.0.0.1"
