"""`grpo-stream run` survives its children's deaths (real tiny vLLM CPU server, real
generator and learner processes, configs/tiny.toml).

One run (`killed`): the vLLM server is SIGKILLed after step 2 and the learner after the
server is back; the supervisor restarts the server, re-syncs it (its /weight_info is a
version the learner published, not the initial 0), resumes the learner from its
checkpoint, and the run trains to learner.max_steps with every step in
trained_batches.jsonl exactly once, the cursor ranges touching end to end.
A second run (`stopped`): its generator is SIGKILLed and restarted (no prompt twice in
the buffer), then `run` is sent SIGTERM: the children stop in order, the last trained
step is checkpointed, the buffer reads whole, and no child process is left.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from grpo_stream.buffer.store import open_reader
from grpo_stream.learner.checkpoint import latest_checkpoint
from grpo_stream.serving.client import get_json
from tests.conftest import free_port

pytestmark = pytest.mark.slow

MAX_STEPS = 8


def _start(run_dir: Path, tiny: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "grpo_stream.cli", "run", "--config", "configs/tiny.toml",
            f"run.run_dir={run_dir}", f"model.path={tiny}", f"server.port={port}",
            "server.startup_timeout_s=600", f"learner.max_steps={MAX_STEPS}",
            "learner.checkpoint_every=2", *extra]  # fmt: skip
    out = open(run_dir.parent / f"{run_dir.name}.out", "w")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}"


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _wait(cond, what: str, proc: subprocess.Popen, timeout: float = 600.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := cond():
            return got
        assert proc.poll() is None, f"run exited ({proc.returncode}) while waiting for {what}"
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _child(proc: subprocess.Popen, *words: str) -> psutil.Process | None:
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if all(w in cmd for w in words):
            return p
    return None


def _step(run_dir: Path) -> int:
    rows = _rows(run_dir / "trained_batches.jsonl")
    return rows[-1]["step"] if rows else 0


def _output(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.out").read_text()


@pytest.fixture(scope="module")
def killed(module_tmp, tiny_model_dir):
    run_dir = module_tmp / "killed"
    run_dir.mkdir()
    proc, url = _start(run_dir, tiny_model_dir)
    sup = run_dir / "supervisor.jsonl"
    try:
        _wait(lambda: _step(run_dir) >= 2, "step 2", proc)
        server = _wait(lambda: _child(proc, "vllm.entrypoints.openai.api_server"), "vllm", proc)
        t_kill = time.monotonic()
        server.kill()
        back = _wait(lambda: [r for r in _rows(sup) if r["child"] == "vllm-0"
                              and r["event"] == "restart"], "server restart", proc)  # fmt: skip
        seen_back = time.monotonic() - t_kill
        _, info = get_json(f"{url}/weight_info")
        step_at_kill = _step(run_dir)
        _wait(lambda: _step(run_dir) >= step_at_kill + 2, "2 more steps", proc)
        learner = _wait(lambda: _child(proc, "grpo_stream.cli", "learn"), "learner", proc)
        t_learner_kill, learner_step = time.monotonic(), _step(run_dir)
        learner.kill()
        _wait(lambda: [r for r in _rows(sup) if r["child"] == "learner"], "learner restart", proc)
        _wait(lambda: _step(run_dir) > learner_step, "a step after the resume", proc)
        resumed_s = time.monotonic() - t_learner_kill
        code = proc.wait(900)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(300)
    print(f"server back (seen by the test) {seen_back:.1f}s after SIGKILL; supervisor's "
          f"restart_s {back[0]['restart_s']:.1f}s; learner stepping again {resumed_s:.1f}s "
          "after SIGKILL")  # fmt: skip
    return {"dir": run_dir, "code": code, "back": back[0], "weight_info": info}


def test_a_killed_server_is_restarted_and_resynced(killed) -> None:
    back = killed["back"]
    assert back["exit_code"] == -signal.SIGKILL
    assert back["version"] >= 1  # re-synced to published weights, not the initial model
    served = int(killed["weight_info"]["weight_version"])
    assert served >= back["version"]  # (the learner may have pushed a newer one since)
    assert killed["code"] == 0, _output(killed["dir"])[-4000:]
    assert "[run] vLLM server http://127.0.0.1:" in _output(killed["dir"])


def test_a_killed_learner_resumes_with_no_batch_twice_or_skipped(killed) -> None:
    rows = _rows(killed["dir"] / "trained_batches.jsonl")
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    dropped = {r["group_id"] for r in _rows(killed["dir"] / "dropped_groups.jsonl")}
    # the cursor ranges touch end to end, but for a batch whose groups were all dropped
    # (stale: the generator sampled them at v0 while the server was down), which moves
    # the cursor without a step: each of those is in dropped_groups.jsonl, with its reason
    # (no retention here, so a group's id is its position in the buffer)
    for a, b in zip(rows, rows[1:], strict=False):
        assert b["cursor_start"] >= a["cursor_end"]
        assert set(range(a["cursor_end"], b["cursor_start"])) <= dropped, (a, b, dropped)
    ids = [g for r in rows for g in r["group_ids"]]
    assert len(ids) == len(set(ids)) and not set(ids) & dropped
    assert set(ids) | dropped == set(range(rows[-1]["cursor_end"]))  # none skipped
    restarts = [r for r in _rows(killed["dir"] / "supervisor.jsonl") if r["event"] == "restart"]
    assert {r["child"] for r in restarts} >= {"vllm-0", "learner"}
    learner = [r for r in restarts if r["child"] == "learner"]
    assert learner[0]["exit_code"] in (-signal.SIGKILL, 75)
    assert "restarts/learner" in _output(killed["dir"])
    assert latest_checkpoint(str(killed["dir"])).name == f"step-{MAX_STEPS}"


@pytest.fixture(scope="module")
def stopped(module_tmp, tiny_model_dir):
    run_dir = module_tmp / "stopped"
    run_dir.mkdir()
    proc, _ = _start(run_dir, tiny_model_dir, "learner.checkpoint_every=100")
    sup = run_dir / "supervisor.jsonl"
    try:
        _wait(lambda: _step(run_dir) >= 1, "step 1", proc)
        gen = _wait(lambda: _child(proc, "grpo_stream.cli", "generate"), "generator", proc)
        gen.kill()
        _wait(lambda: [r for r in _rows(sup) if r["child"] == "generator"], "restart", proc)
        _wait(lambda: _step(run_dir) >= 4, "step 4", proc)
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"dir": run_dir, "code": code, "family": family}


def test_sigterm_checkpoints_the_last_step_and_leaves_nothing(stopped) -> None:
    rd = stopped["dir"]
    assert stopped["code"] == 130, _output(rd)[-3000:]
    last = _step(rd)
    assert 4 <= last < MAX_STEPS
    ckpt = latest_checkpoint(str(rd))
    assert ckpt is not None and ckpt.name == f"step-{last}"  # checkpoint_every=100: the stop's
    assert json.loads((ckpt / "state.json").read_text())["step"] == last
    reader = open_reader(str(rd / "buffer"))
    groups = reader.read_groups(0, reader.num_groups())
    assert len(groups) >= last * 2 and all(len(g) == 4 for g in groups)
    prompts = [g[0].prompt_id for g in groups]
    assert len(prompts) == len(set(prompts))  # the restarted generator repeated none
    restarts = [r for r in _rows(rd / "supervisor.jsonl") if r["event"] == "restart"]
    assert [(r["child"], r["exit_code"]) for r in restarts] == [("generator", -signal.SIGKILL)]
    time.sleep(1.0)
    alive = [p for p in stopped["family"] if p.is_running() and p.status() != "zombie"]
    assert not alive, [" ".join(p.cmdline()) for p in alive]
    out = _output(rd)
    assert "[learn] stopped by signal 15 after step" in out
