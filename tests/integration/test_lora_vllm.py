"""Integration: adapter-only sync into a real vLLM CPU server started with LoRA enabled.

One server on the tiny Llama (`--enable-lora`, runtime adapter loading). The learner's
policy is the tiny model with a rank-4 adapter; after each of three syncs
(`sync.lora.LoraSync`: RUN/adapters/vN, `/v1/load_lora_adapter` as `policy-vN`, the
version set) the generator's request path samples `policy-vN`, and the learner's own
log-probs of those completions equal vLLM's (the drift check, `learner.drift`). Between
syncs a real learner step moves the adapter, so each version is a different policy: the
previous version's samples no longer match. Versions outside the staleness window are
unloaded from the server and deleted from disk, and a version pushed again is served anew.
Then `grpo-stream learn` under torchrun (2 gloo processes, FSDP2) syncs into the same
server: the adapter gathered from the shards is what vLLM serves, and the checkpoint's.
"""

from __future__ import annotations

import asyncio
import random
import subprocess

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file
from test_fsdp_learner import OVERRIDES, _prefill, _torchrun

from grpo_stream.buffer.schema import Sample
from grpo_stream.config import Config, LoraConfig, SyncConfig
from grpo_stream.generator.pool import ServerPool
from grpo_stream.generator.sampler import SampleRequest, request_group
from grpo_stream.learner.drift import sequence_drift
from grpo_stream.learner.lora import apply_lora
from grpo_stream.learner.optim import build_optimizer
from grpo_stream.learner.policy import load_causal_lm
from grpo_stream.learner.step import StepRunner, batch_advantages
from grpo_stream.serving.adapters import request_model
from grpo_stream.serving.client import VLLMClient
from grpo_stream.serving.server import VLLMServer
from grpo_stream.sync.lora import LoraSync
from grpo_stream.tasks.prompt import Prompt

pytestmark = pytest.mark.slow

PROMPTS = [[1, 4093, 198, 1780, 314, 216, 34, 27, 35, 47, 2, 198], [1, 520, 9531, 198, 28, 29]]
WINDOW = 1  # learner.max_staleness: policy-v(N-1) and policy-vN stay loaded


@pytest.fixture(scope="module")
def cfg() -> Config:
    c = Config(lora=LoraConfig(enabled=True, rank=4, alpha=16.0), sync=SyncConfig(transport="lora"))
    c.learner.max_staleness = WINDOW
    c.learner.lr, c.learner.epochs, c.learner.micro_batch_size = 2e-2, 2, 8
    c.generator.temperature, c.generator.max_tokens = 1.0, 10
    return c


@pytest.fixture(scope="module")
def lora_server(cfg: Config, tiny_model_dir, tmp_path_factory):
    server = cfg.resolved_server().model_copy(
        update={"max_model_len": 256, "startup_timeout_s": 600}
    )
    assert (server.max_lora_rank, server.max_loras) == (8, WINDOW + 2)
    log = tmp_path_factory.mktemp("logs") / "vllm-lora.log"
    with VLLMServer(tiny_model_dir, "policy", free_port(), server, log) as srv:
        srv.wait_healthy()
        yield srv


def _sample(url: str, cfg: Config) -> list[Sample]:
    """Two groups of 4 through the generator's own request path (`request_model`)."""
    sampling = {"max_tokens": 10, "temperature": 1.0, "top_p": 1.0, "top_k": -1}

    async def main():
        async with VLLMClient(120) as client:
            pool, out = ServerPool([url], client), []
            for i, ids in enumerate(PROMPTS):
                req = SampleRequest(Prompt(f"p{i}", "q", "0"), "q", ids)
                outs, v0, v1, _, _ = await request_group(
                    pool, request_model(cfg), req, 4, sampling, max_retries=0
                )
                out += [Sample("lora", f"p{i}", j, v0, ids, c.token_ids, c.logprobs,
                               float(j % 2), policy_version_end=v1, group_id=i)
                        for j, c in enumerate(outs)]  # fmt: skip
            return out

    return asyncio.run(main())


def _max_drift(model, samples, cfg) -> float:
    recs = sequence_drift(model, samples, cfg, 0, torch.device("cpu"))
    return max(r["max_abs"] for r in recs)


def _served(url: str) -> list[str]:
    async def main():
        async with VLLMClient(30) as client:
            return await client.served_models(url)

    return asyncio.run(main())


def test_vllm_serves_each_synced_adapter_version(lora_server, cfg, tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    random.seed(0)
    model = apply_lora(load_causal_lm(str(tiny_model_dir), torch.device("cpu")), cfg.lora)
    opt, sched = build_optimizer(model, cfg.learner)
    runner = StepRunner(cfg, model, None, opt, sched, torch.device("cpu"), pad_id=0)
    sync = LoraSync(cfg.sync, [lora_server.url], tmp_path / "adapters", "policy", WINDOW)
    previous = None
    for version in range(3):
        m = sync.push(model, version)
        assert 0 < m["sync_bytes"] < 2**22  # megabytes at most, not the model
        samples = _sample(lora_server.url, cfg)
        assert {s.policy_version for s in samples} == {version}
        assert _max_drift(model, samples, cfg) < 2e-3  # vLLM's policy-vN is the learner's
        if previous is not None:  # the adapter moved: the old version's samples differ
            assert _max_drift(model, previous, cfg) > 1e-2
        groups = [samples[:4], samples[4:]]
        s, a, _ = batch_advantages(groups, cfg)
        runner.run(s, a)  # a real step: the next version is another policy
        previous = samples
    served = _served(lora_server.url)
    assert "policy-v2" in served and "policy-v1" in served and "policy-v0" not in served
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["v1", "v2"]
    sync.push(model, 2)  # a version pushed again (a resumed learner) is served anew
    samples = _sample(lora_server.url, cfg)
    assert _max_drift(model, samples, cfg) < 2e-3


def test_fsdp_learner_syncs_its_gathered_adapter(lora_server, cfg, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    _prefill(run)
    lc = cfg.lora
    overrides = [o for o in OVERRIDES if not o.startswith(("sync.", "learner.max_staleness"))]
    cmd = [*_torchrun(), "-m", "grpo_stream.cli", "learn", f"model.path={tiny_model_dir}",
           *overrides, f"run.run_dir={run}", f'server.urls=["{lora_server.url}"]',
           "sync.transport=lora", f"learner.max_staleness={WINDOW}", "lora.enabled=true",
           f"lora.rank={lc.rank}", f"lora.alpha={lc.alpha}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (run / "adapters").iterdir()) == ["v1", "v2"]
    served = _served(lora_server.url)
    assert {"policy-v1", "policy-v2"} <= set(served) and "policy-v0" not in served
    pushed = load_file(run / "adapters" / "v2" / "adapter_model.safetensors")
    saved = load_file(run / "checkpoints" / "step-2" / "model" / "adapter_model.safetensors")
    assert set(pushed) == set(saved) and all(torch.equal(pushed[k], saved[k]) for k in saved)
    assert max(pushed[k].abs().max().item() for k in pushed if "lora_B" in k) > 1e-3
    model = apply_lora(load_causal_lm(str(tiny_model_dir), torch.device("cpu")), lc,
                       run / "adapters" / "v2")  # fmt: skip
    samples = _sample(lora_server.url, cfg)
    assert {s.policy_version for s in samples} == {2}
    assert _max_drift(model, samples, cfg) < 2e-3  # vLLM's policy-v2 is the gathered adapter
