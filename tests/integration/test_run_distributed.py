"""`grpo-stream run` with learner.num_processes=2: the learner runs as 2 FSDP2 ranks under
torchrun beside the generator, against an already running vLLM server, trains, syncs
its gathered weights into the server and exits cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_stream.serving.server import get_json, post_json

pytestmark = pytest.mark.slow


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
        # rank 0 pushed the gathered weights twice
        assert get_json(f"{url}/weight_info") == (200, {"weight_version": "2"})
    finally:  # later tests expect the server on the tiny model's own weights
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": str(tiny_model_dir)}}
        restored = post_json(f"{url}/collective_rpc", rpc, timeout=120)
    assert restored == (200, {"results": [None]})
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    log = (run_dir / "logs" / "learner.log").read_text()
    assert "FSDP2 over 2 processes on cpu" in log
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert all(r["samples"] == 8 and r["tokens"] > 0 for r in rows)  # the whole batch
