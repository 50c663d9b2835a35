"""`grpo-stream run` with learner.num_processes=2: the learner runs as 2 FSDP2 ranks under
torchrun beside the generator, against an already running vLLM server, trains, syncs
its gathered weights into the server and exits cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _post(url: str, body: dict) -> None:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()


def _weight_version(url: str) -> str:
    with urllib.request.urlopen(f"{url}/weight_info", timeout=30) as r:
        return str(json.loads(r.read())["weight_version"])


def test_run_with_a_two_process_learner(tmp_path, tiny_model_dir, tiny_server):
    url = tiny_server.url
    try:
        out = subprocess.run(
            [sys.executable, "-m", "grpo_stream.cli", "run", f"run.output_dir={tmp_path}",
             f'server.urls=["{url}"]', f"model.path={tiny_model_dir}",
             "task.use_chat_template=false", "generator.group_size=4", "generator.max_tokens=8",
             "learner.num_processes=2", "learner.batch_groups=2", "learner.micro_batch_size=4",
             "learner.max_steps=2", "learner.lr=1e-3", "learner.num_threads=1"],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert _weight_version(url) == "2"  # rank 0 pushed the gathered weights twice
    finally:  # later tests expect the server on the tiny model's own weights
        _post(f"{url}/collective_rpc", {"method": "reload_weights",
                                        "kwargs": {"weights_path": str(tiny_model_dir)}})  # fmt: skip
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    log = (run_dir / "logs" / "learner.log").read_text()
    assert "FSDP2 over 2 processes on cpu" in log
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert all(r["samples"] == 8 and r["tokens"] > 0 for r in rows)  # the whole batch
