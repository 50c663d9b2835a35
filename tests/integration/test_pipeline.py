"""The walking skeleton end to end: a real vLLM CPU server, the generator and the
learner as separate processes (the real CLI), two learner steps with weight sync.

Asserts: G samples per prompt with token ids and finite log-probs in the buffer; the
stored behaviour log-probs equal a transformers fp32 recompute (1e-3); the server's
weight version advanced and later samples carry it; the server's answers changed
after the sync and equal what the learner's checkpoint computes; the run folder keeps
one checkpoint and one weights folder, whose model file is the checkpoint's (one inode).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grpo_stream.buffer.store import open_reader
from grpo_stream.serving.server import get_json, post_json

pytestmark = pytest.mark.slow

G = 4
PROBE = [1, 9690, 198, 2683, 314, 216, 34, 45, 36, 47]  # fixed token ids for before/after


def greedy(url: str) -> tuple[list[int], list[float]]:
    body = {
        "model": "policy",
        "prompt": PROBE,
        "max_tokens": 6,
        "temperature": 0.0,
        "logprobs": 0,
        "return_token_ids": True,
        "ignore_eos": True,
    }
    status, out = post_json(f"{url}/v1/completions", body, timeout=120)
    assert status == 200, out
    c = out["choices"][0]
    return c["token_ids"], c["logprobs"]["token_logprobs"]


def recompute(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # [C, V]
    lp = torch.log_softmax(logits, -1)
    return lp.gather(-1, torch.tensor(completion)[:, None])[:, 0]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "grpo_stream.cli", *args]


def _wait_groups(path: str, n: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        r = open_reader(path)
        if r.num_groups() >= n or time.monotonic() > deadline:
            return r.num_groups()
        time.sleep(0.5)


@pytest.fixture(scope="module")
def pipeline(module_tmp, tiny_model_dir, tiny_server):
    url = tiny_server.url
    before = greedy(url)
    run_dir = module_tmp / "run"
    overrides = [
        f"run.run_dir={run_dir}",
        f'server.urls=["{url}"]',
        f"model.path={tiny_model_dir}",
        f"generator.group_size={G}",
        "generator.max_tokens=8",
        "generator.temperature=1.0",
        "generator.max_ahead_batches=1",
        "learner.batch_groups=2",
        "learner.max_steps=2",
        "learner.micro_batch_size=4",
        "learner.lr=1e-3",
        "learner.checkpoint_every=1",
        "loss.beta=0.04",
        "task.use_chat_template=false",
        "reward.functions=[{name='length_penalty', kwargs={target=10, limit=60}}]",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    gen = subprocess.Popen(
        _cli("generate", *overrides),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        learn = subprocess.run(
            _cli("learn", *overrides), env=env, capture_output=True, text=True, timeout=900
        )
        assert learn.returncode == 0, learn.stdout + learn.stderr
        _wait_groups(str(run_dir / "buffer"), 6, 120)
    finally:
        if gen.poll() is None:  # it stops by itself once the learner has finished
            gen.send_signal(signal.SIGTERM)
        gen_out, _ = gen.communicate(timeout=120)
    # 0, or a SIGTERM that landed in the moment between its last line and its exit
    finished = "[generate] done (" in gen_out and gen.returncode == -signal.SIGTERM
    assert gen.returncode == 0 or finished, gen_out
    return {"url": url, "run_dir": run_dir, "before": before, "learn": learn}


def test_buffer_holds_groups_of_g_with_ids_and_logprobs(pipeline):
    r = open_reader(str(pipeline["run_dir"] / "buffer"))
    groups = r.read_groups(0, r.num_groups())
    assert len(groups) >= 6
    for g in groups:
        assert [s.sample_index for s in g] == list(range(G))
        assert len({s.prompt_id for s in g}) == 1
        for s in g:
            assert s.prompt_ids and s.completion_ids
            assert len(s.behaviour_logprobs) == len(s.completion_ids)
            assert all(math.isfinite(x) and x <= 0 for x in s.behaviour_logprobs)


def test_generator_logged_its_own_and_the_servers_metrics(pipeline):
    lines = (pipeline["run_dir"] / "generator_metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["groups_written"] >= 6 and last["samples"] == G * last["groups_written"]
    assert last["vllm_generation_tokens_total"] >= last["tokens"] > 0  # read from /metrics


def test_behaviour_logprobs_match_transformers_recompute(pipeline, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    r = open_reader(str(pipeline["run_dir"] / "buffer"))
    v0 = [
        s
        for g in r.read_groups(0, r.num_groups())
        for s in g
        if s.policy_version == 0 and s.policy_version_end == 0
    ]
    assert len(v0) >= 2 * G
    worst = max(
        (recompute(model, s.prompt_ids, s.completion_ids) - torch.tensor(s.behaviour_logprobs))
        .abs()
        .max()
        .item()
        for s in v0
    )
    assert worst < 1e-3


def test_weight_version_advanced_and_new_samples_carry_it(pipeline):
    assert get_json(f"{pipeline['url']}/weight_info") == (200, {"weight_version": "2"})
    r = open_reader(str(pipeline["run_dir"] / "buffer"))
    versions = {s.policy_version for g in r.read_groups(0, r.num_groups()) for s in g}
    assert 0 in versions and max(versions) >= 1
    rows = [json.loads(x) for x in (pipeline["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2]
    for key in (
        "reward_mean",
        "reward_std",
        "kl",
        "clip_frac",
        "tokens_per_s",
        "staleness_mean",
        "policy_version",
    ):
        assert all(key in m for m in rows), key


def test_server_answers_changed_and_match_the_checkpoint(pipeline):
    from transformers import AutoModelForCausalLM

    ids_before, lp_before = pipeline["before"]
    ids_after, lp_after = greedy(pipeline["url"])
    if ids_after == ids_before:
        assert max(abs(a - b) for a, b in zip(lp_after, lp_before, strict=True)) > 1e-3
    ckpt = Path(pipeline["run_dir"]) / "checkpoints" / "step-2" / "model"
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    expect = recompute(model, PROBE, ids_after)
    torch.testing.assert_close(torch.tensor(lp_after), expect, atol=1e-3, rtol=0)


def test_the_run_keeps_one_checkpoint_sharing_the_served_weights(pipeline):
    """Defect 12 (issue 20): a checkpoint every step, two steps, two syncs: what stays is
    the last checkpoint and the last weights folder, and they share one model file."""
    run_dir = Path(pipeline["run_dir"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2"]
    assert sorted(p.name for p in (run_dir / "weights").iterdir()) == ["v2"]
    kept = os.stat(run_dir / "checkpoints" / "step-2" / "model" / "model.safetensors")
    served = os.stat(run_dir / "weights" / "v2" / "model.safetensors")
    assert kept.st_ino == served.st_ino and kept.st_nlink == 2
