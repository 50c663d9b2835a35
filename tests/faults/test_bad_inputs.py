"""Malformed configs and dataset files (fault case 7): refused in seconds with one line
naming the file, before any server is waited for; nothing is started, so no prompt is."""

from __future__ import annotations

import pytest
from conftest import free_port
from faults_harness import Run, record

pytestmark = pytest.mark.slow


def _one_clean_error(out, *needles: str) -> None:
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and "usage:" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) <= 2, out.stderr  # one line (and a hint)
    for n in needles:
        assert n in out.stderr, out.stderr


def test_a_malformed_config_file_is_one_line(tmp_path, tiny_model_dir) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[learner]\nlr = \n")
    run = Run(tmp_path, f"http://127.0.0.1:{free_port()}", tiny_model_dir)
    for role in ("generate", "learn"):
        _one_clean_error(run.run(role, "--config", str(bad)), str(bad))
    out = run.run("learn", "learner.lr=-1")  # out of range: the field is named
    _one_clean_error(out, "learner.lr")
    record("malformed config (TOML syntax, out-of-range field)", "refused, exit 2", None)


def test_a_malformed_dataset_file_is_one_line(tmp_path, tiny_model_dir) -> None:
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "ans\n')
    run = Run(tmp_path, f"http://127.0.0.1:{free_port()}", tiny_model_dir)
    out = run.run("generate", "task.name='jsonl'", f"task.path='{data}'")
    _one_clean_error(out, f"{data}:2: not valid JSON")  # the file and the line
    assert not (run.dir / "buffer").exists()  # nothing started
    record("malformed dataset file (torn JSON line)", "refused, exit 2", None)
