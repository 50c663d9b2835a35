"""Integration: the generator against ONE real vLLM CPU server on a tiny model.

Slow: one server start per module (~1-2 min on a busy 2-core box), then short
generator runs, in-process (`Generator.run`) or through the CLI in a subprocess:
groups land in the buffer with the right token ids and behaviour log-probs, two URLs
share the load, a dead URL is taken out without losing prompts, a pause is survived,
the staleness gate holds the generator back until the learner's progress moves, a
raising reward function is recorded (NaN, reason) and the run goes on, and a dataset
with a missing column is a clear CLI error (exit code 2).

The tiny model is built here (grpo_stream.serving.model.build_tiny_model, SmolLM2's tokenizer from
resolve_model_path(ModelConfig()), prepared into cache_dir() if missing). To iterate
faster, GRPO_STREAM_TEST_VLLM_URL=http://127.0.0.1:PORT reuses a running server instead
(it must serve a default build_tiny_model() as "policy").
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from grpo_stream.buffer.store import open_reader
from grpo_stream.config import Config, ModelConfig, ServerConfig, load_config
from grpo_stream.core.progress import LearnerProgress, write_progress
from grpo_stream.generator.loop import Generator
from grpo_stream.serving.client import get_json, post_json
from grpo_stream.serving.model import build_tiny_model, resolve_model_path
from grpo_stream.serving.server import VLLMServer
from grpo_stream.tasks import make_prompt_source, render_prompt

pytestmark = pytest.mark.slow

PORT = 8400  # this module's vLLM server
DEAD_PORT = 8401  # nothing may listen here
G = 4
MAX_TOKENS = 16
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer_from = resolve_model_path(ModelConfig())
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", tokenizer_from)


@pytest.fixture(scope="module")
def tokenizer(tiny: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


@pytest.fixture(scope="module")
def server(tiny: Path, tmp_path_factory: pytest.TempPathFactory):
    reuse = os.environ.get("GRPO_STREAM_TEST_VLLM_URL")
    if reuse:  # a running server on 127.0.0.1 serving a seed-0 build_tiny_model() as "policy"
        yield SimpleNamespace(url=reuse.rstrip("/"))
        return
    cfg = ServerConfig(max_model_len=512, startup_timeout_s=600)
    log = tmp_path_factory.mktemp("logs") / "vllm.log"
    with VLLMServer(tiny, "policy", PORT, cfg, log) as srv:
        srv.wait_healthy()
        yield srv


def make_cfg(tiny: Path, run_dir: Path, urls: list[str], n: int, *overrides: str) -> Config:
    base = [
        f"run.run_dir={json.dumps(str(run_dir))}",
        f"model.path={json.dumps(str(tiny))}",
        f"server.urls={json.dumps(urls)}",
        "server.startup_timeout_s=120",
        f"generator.group_size={G}",
        f"generator.max_tokens={MAX_TOKENS}",
        f"generator.stop_after_groups={n}",
        "generator.max_in_flight=4",
        "generator.request_timeout_s=120",
        "reward.num_workers=1",
        "generator.wait_for_learner=false",  # no learner: sample at once
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    return load_config(None, base + list(overrides))


def first_prompts(cfg: Config, n: int) -> list:
    return list(itertools.islice(make_prompt_source(cfg.task), n))


def read_all(cfg: Config) -> list:
    reader = open_reader(cfg.buffer_path())
    try:
        reader.refresh()
        return reader.read_groups(0, reader.num_groups())
    finally:
        reader.close()


def run_generator(cfg: Config, tiny: Path, during=None) -> tuple[Generator, int]:
    """Run `Generator.run()` in this process; `during(gen, task)` runs beside it."""
    gen = Generator(cfg, cfg.run.run_dir, str(tiny))

    async def main() -> int:
        task = asyncio.create_task(gen.run())
        if during is not None:
            try:
                await during(gen, task)
            except BaseException:
                gen.request_stop()
                await asyncio.wait_for(task, 120)
                raise
        return await asyncio.wait_for(task, 300)  # a hang guard, not a timing check

    return gen, asyncio.run(main())


def check_groups(groups: list, cfg: Config, tokenizer, n: int) -> None:
    """Whole groups of G, one per prompt of the first n, with consistent token data."""
    prompts = {p.prompt_id: p for p in first_prompts(cfg, n)}
    assert sorted(g[0].prompt_id for g in groups) == sorted(prompts)  # none lost, none extra
    for group in groups:
        prompt = prompts[group[0].prompt_id]
        text, ids = render_prompt(prompt, tokenizer, cfg.task)
        assert [s.sample_index for s in group] == list(range(G))
        for s in group:
            assert s.prompt_id == prompt.prompt_id and s.answer == prompt.answer
            assert s.prompt_ids == ids and s.prompt_text == text
            assert 1 <= len(s.completion_ids) <= MAX_TOKENS
            assert len(s.behaviour_logprobs) == len(s.completion_ids)
            assert all(math.isfinite(x) and x <= 0 for x in s.behaviour_logprobs)
            decoded = tokenizer.decode(s.completion_ids, skip_special_tokens=True)
            # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8
            # character (the length limit cut a multi-byte one); a full decode shows U+FFFD
            assert decoded == s.completion_text or (
                decoded.rstrip("\ufffd") == s.completion_text and s.finish_reason == "length"
            )
            assert s.finish_reason in ("length", "stop")
            if s.finish_reason == "length":
                assert len(s.completion_ids) == MAX_TOKENS
            assert s.policy_version == 0 and s.policy_version_end == 0


def hf_logprobs(tiny: Path, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    """log pi(completion token | prefix) from the HF model, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids + completion_ids])  # [1, P+C]
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]  # [C, V]
    logp = torch.log_softmax(logits.float(), dim=-1)  # [C, V]
    return logp.gather(1, torch.tensor(completion_ids)[:, None])[:, 0].tolist()  # [C]


def test_cli_generate_two_urls_share_the_load(server, tiny, tokenizer, tmp_path) -> None:
    urls = [server.url, server.url.replace("127.0.0.1", "localhost")]  # one server, two names
    assert urls[0] != urls[1]
    n = 6
    cfg = make_cfg(tiny, tmp_path / "run", urls, n)
    config_file = tmp_path / "gen.toml"
    config_file.write_text(cfg.to_toml())
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_stream.cli", "generate", "--config", str(config_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"done (stop_after_groups): {n} groups in the buffer" in proc.stderr
    groups = read_all(cfg)
    check_groups(groups, cfg, tokenizer, n)
    assert {s.server_url for g in groups for s in g} == set(urls)
    # the stored log-probs are the behaviour policy's: equal to the model's own (fp32)
    s = groups[0][0]
    expected = hf_logprobs(tiny, s.prompt_ids, s.completion_ids)
    assert max(abs(a - b) for a, b in zip(expected, s.behaviour_logprobs, strict=True)) < 1e-3
    metrics = (tmp_path / "run" / "generator_metrics.jsonl").read_text().splitlines()
    last = json.loads(metrics[-1])
    assert last["groups_written"] == n and last["samples"] == n * G


def test_dead_url_is_taken_out_and_no_prompt_lost(server, tiny, tokenizer, tmp_path) -> None:
    with socket.socket() as s:  # the dead URL must really have nothing behind it
        assert s.connect_ex(("127.0.0.1", DEAD_PORT)) != 0
    dead = f"http://127.0.0.1:{DEAD_PORT}"
    n = 6
    cfg = make_cfg(tiny, tmp_path / "run", [dead, server.url], n)  # ties go to the dead one
    gen, written = run_generator(cfg, tiny)
    assert written == n and gen.failed_prompts == 0
    groups = read_all(cfg)
    check_groups(groups, cfg, tokenizer, n)
    assert {s.server_url for g in groups for s in g} == {server.url}


def test_pause_during_generation_is_survived(server, tiny, tokenizer, tmp_path) -> None:
    n = 8
    cfg = make_cfg(tiny, tmp_path / "run", [server.url], n)
    seen: dict[str, object] = {}

    async def pause_resume(gen: Generator, task: asyncio.Task) -> None:
        while gen.stats.written < 1 and not task.done():
            await asyncio.sleep(0.1)
        seen["written_before"] = gen.stats.written
        try:
            status, body = await asyncio.to_thread(post_json, f"{server.url}/pause?mode=wait")
            seen["pause"] = (status, body)
            seen["paused"] = await asyncio.to_thread(get_json, f"{server.url}/is_paused")
            await asyncio.sleep(2.0)
        finally:
            seen["resume"] = await asyncio.to_thread(post_json, f"{server.url}/resume")

    gen, written = run_generator(cfg, tiny, pause_resume)
    assert seen["pause"][0] == 200 and seen["paused"] == (200, {"is_paused": True})
    assert seen["resume"][0] == 200
    assert seen["written_before"] < n  # the pause landed while prompts were still open
    assert written == n and gen.failed_prompts == 0
    check_groups(read_all(cfg), cfg, tokenizer, n)


def _user_rewards(tmp_path: Path) -> Path:
    path = tmp_path / "user_rewards.py"
    path.write_text(
        textwrap.dedent(
            """
            import time

            def boom(completion, prompt, **kwargs):
                raise ValueError(f"boom for {prompt.prompt_id}")

            def slow_zero(completion, prompt, **kwargs):
                time.sleep(0.3)  # G of these: scoring a group takes longer than a gate poll
                return 0.0
            """
        )
    )
    return path


def test_staleness_gate_waits_for_learner_progress(server, tiny, tokenizer, tmp_path) -> None:
    rewards = _user_rewards(tmp_path)
    fns = [{"name": "numeric_answer"}, {"name": f"{rewards}:slow_zero"}]
    n = 4
    cfg = make_cfg(
        tiny,
        tmp_path / "run",
        [server.url],
        n,
        "learner.batch_groups=2",
        "generator.max_ahead_batches=0",
        f"reward.functions={_toml_inline(fns)}",
    )
    seen: dict[str, object] = {}

    async def hold_then_release(gen: Generator, task: asyncio.Task) -> None:
        while gen.stats.written < 2 and not task.done():
            await asyncio.sleep(0.1)
        await asyncio.sleep(4.0)  # ample time for a leaky gate to start more prompts
        seen["held"] = len(await asyncio.to_thread(read_all, cfg))
        seen["gated"], seen["done"] = gen.stats.gated, task.done()
        await asyncio.to_thread(
            write_progress, cfg.buffer_path(), LearnerProgress(consumed_groups=2)
        )

    gen, written = run_generator(cfg, tiny, hold_then_release)
    assert seen == {"held": 2, "gated": True, "done": False}
    assert written == n
    groups = read_all(cfg)
    check_groups(groups, cfg, tokenizer, n)
    first_two = {p.prompt_id for p in first_prompts(cfg, 2)}
    assert {g[0].prompt_id for g in groups[:2]} == first_two  # held back: the next two waited
    assert gen.stats.gated is False  # released: no longer reported as waiting


def _toml_inline(fns: list[dict]) -> str:
    return "[" + ", ".join("{" + f"name = {json.dumps(f['name'])}" + "}" for f in fns) + "]"


def test_raising_reward_is_recorded_and_run_continues(server, tiny, tokenizer, tmp_path) -> None:
    rewards = _user_rewards(tmp_path)
    fns = [{"name": "numeric_answer"}, {"name": f"{rewards}:boom"}]
    n = 3
    cfg = make_cfg(tiny, tmp_path / "run", [server.url], n, f"reward.functions={_toml_inline(fns)}")
    gen, written = run_generator(cfg, tiny)
    assert written == n
    groups = read_all(cfg)
    check_groups(groups, cfg, tokenizer, n)
    for s in (s for g in groups for s in g):
        assert math.isnan(s.reward)
        assert s.reward_error.startswith("boom: ValueError:")
        assert f"boom for {s.prompt_id}" in s.reward_error
        assert math.isnan(s.reward_components["boom"])
        assert s.reward_components["numeric_answer"] in (0.0, 1.0)
    assert gen.stats.reward_failures == n * G


def test_dataset_missing_column_is_a_cli_error(tiny, tmp_path) -> None:
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"{i}+1?", "answer": i + 1}) + "\n" for i in range(3))
    )
    args = [
        "generate",
        f"run.run_dir={tmp_path / 'run'}",
        f"model.path={tiny}",
        f'server.urls=["http://127.0.0.1:{DEAD_PORT}"]',
        "task.name=jsonl",
        f"task.path={data}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_stream.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert str(data) in proc.stderr
    assert "no column 'prompt' (task.prompt_column)" in proc.stderr
    assert "question" in proc.stderr  # the columns that do exist are listed
