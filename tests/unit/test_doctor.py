"""Preflight (`grpo-stream doctor`, and `run`/`generate`/`learn` at start): each check's
failure names the field or file; issue 12 defect 4 (a bad reward import path and an
unwritable buffer path fail in seconds with one line, not after a server or buffer wait).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grpo_stream.config import load_config
from grpo_stream.run.doctor import (
    PreflightError,
    check_dataset,
    check_servers,
    doctor_cli,
    preflight,
    run_checks,
)
from grpo_stream.run.doctor_checks import (
    bytes_per_sample,
    check_buffer,
    check_model,
    check_security,
    expected_groups,
)

UNWRITABLE = "/sys/grpo-stream-buffer"  # sysfs is read-only, for root too


def cfg_of(*overrides: str, **kw):
    return load_config(None, list(overrides))


def by_name(checks, name: str):
    found = [c for c in checks if c.name == name]
    assert found, [c.line() for c in checks]
    return found[0]


def fake_model(folder: Path, *, tokenizer=True, template=True, tied=False) -> Path:
    """A model folder's metadata files (the checks read no weights)."""
    folder.mkdir(parents=True)
    config = {"model_type": "llama", "tie_word_embeddings": tied, "vocab_size": 64,
              "hidden_size": 8, "num_attention_heads": 1, "num_hidden_layers": 1,
              "intermediate_size": 16}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    tok_cfg = {"chat_template": "{{ messages }}"} if template else {}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return folder


# ---------------------------------------------------------------- config
def test_doctor_reports_a_bad_range_naming_the_field(capsys) -> None:
    assert doctor_cli(["learner.lr=-1"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("FAIL  config")
    assert "learner.lr" in out[0]


# ---------------------------------------------------------------- model
def test_model_folder_missing(tmp_path) -> None:
    c = by_name(check_model(cfg_of(f"model.path={tmp_path}/none")), "model")
    assert not c.ok and c.detail == f"model.path = '{tmp_path}/none': no such folder"


def test_model_without_tokenizer(tmp_path) -> None:
    folder = fake_model(tmp_path / "m", tokenizer=False)
    c = by_name(check_model(cfg_of(f"model.path={folder}")), "model")
    assert not c.ok and "has no tokenizer" in c.detail and str(folder) in c.detail


def test_chat_template_missing_only_matters_when_used(tmp_path) -> None:
    folder = fake_model(tmp_path / "m", template=False)
    c = by_name(check_model(cfg_of(f"model.path={folder}")), "chat template")
    assert not c.ok and "task.use_chat_template = false" in c.detail
    checks = check_model(cfg_of(f"model.path={folder}", "task.use_chat_template=false"))
    assert all(c.ok for c in checks) and "chat template" not in [c.name for c in checks]


def test_tied_embeddings_under_disk_sync_are_named(tmp_path) -> None:
    tied = fake_model(tmp_path / "tied", tied=True)
    disk = by_name(check_model(cfg_of(f"model.path={tied}")), "tied embeddings")
    assert disk.detail.startswith("tied: sync.transport = 'disk' serves an untied copy")
    none = by_name(check_model(cfg_of(f"model.path={tied}", "sync.transport='none'")),
                   "tied embeddings")  # fmt: skip
    assert none.ok and "fine with sync.transport = 'none'" in none.detail
    untied = fake_model(tmp_path / "untied")
    assert by_name(check_model(cfg_of(f"model.path={untied}")), "tied embeddings").detail == (
        "untied: lm_head is its own tensor"
    )


# ---------------------------------------------------------------- buffer
def test_buffer_under_a_file_is_refused(tmp_path) -> None:
    (tmp_path / "f").write_text("x")
    c = by_name(check_buffer(cfg_of(f"buffer.path={tmp_path}/f/buf")), "buffer.path")
    assert (
        not c.ok
        and c.detail == f"buffer.path = {tmp_path}/f/buf: {tmp_path}/f is a file, not a folder"
    )


@pytest.mark.skipif(not os.path.isdir("/sys"), reason="needs a read-only /sys")
def test_buffer_on_a_read_only_filesystem_is_refused() -> None:
    c = by_name(check_buffer(cfg_of(f"buffer.path={UNWRITABLE}")), "buffer.path")
    assert not c.ok and c.detail.startswith(f"buffer.path = {UNWRITABLE}: cannot write in /sys")


def test_buffer_estimate_and_free_disk(tmp_path) -> None:
    cfg = cfg_of(f"buffer.path={tmp_path}/b", "learner.max_steps=10", "learner.batch_groups=4")
    # (10 steps + 1 + max_ahead_batches 1) x 4 groups; 64 prompt tokens x 8 B + 32 x 12 B + 256
    assert (expected_groups(cfg), bytes_per_sample(cfg)) == (48, 1152)
    c = by_name(check_buffer(cfg), "buffer.path")
    assert c.ok and "estimated ~432.0 KiB (48 groups x 8 samples x ~1152 B)" in c.detail
    assert not (tmp_path / "b").exists()  # nothing created, the probe file removed
    assert os.listdir(tmp_path) == []
    huge = cfg_of(f"buffer.path={tmp_path}/b", "learner.max_steps=1000000000")
    c = by_name(check_buffer(huge), "buffer.path")
    assert not c.ok and "free, less than 2x the run's estimated ~" in c.detail
    capped = cfg_of(f"buffer.path={tmp_path}/b", "learner.max_steps=1000000000",
                    "buffer.max_groups=100")  # fmt: skip
    assert expected_groups(capped) == 100 and by_name(check_buffer(capped), "buffer.path").ok


# ---------------------------------------------------------------- rewards, dataset
def test_reward_import_path_that_does_not_exist(tmp_path) -> None:
    t0 = time.monotonic()
    checks = run_checks(cfg_of("reward.functions=[{name='nosuch_mod_x:fn'}]"), "generate")
    c = by_name(checks, "reward.functions")
    assert not c.ok and c.detail.startswith("reward.functions[0].name: ")
    assert "No module named 'nosuch_mod_x'" in c.detail
    assert time.monotonic() - t0 < 20


def test_reward_file_function_imports(tmp_path) -> None:
    f = tmp_path / "my_reward.py"
    f.write_text("def score(completion, prompt, **kw):\n    return 1.0\n")
    c = by_name(run_checks(cfg_of(f"reward.functions=[{{name='{f}:score'}}]"), "generate"),
                "reward.functions")  # fmt: skip
    assert c.ok and c.detail == f"score; imported {f}:score"
    f.write_text("raise RuntimeError('broken at import')\n")
    c = by_name(run_checks(cfg_of(f"reward.functions=[{{name='{f}:score'}}]"), "generate"),
                "reward.functions")  # fmt: skip
    assert not c.ok and "broken at import" in c.detail


def test_dataset_file_and_columns(tmp_path) -> None:
    data = tmp_path / "d.jsonl"
    base = ("task.name='jsonl'", f"task.path={data}")
    c = by_name(check_dataset(cfg_of(*base)), "task.path")
    assert not c.ok and "file not found" in c.detail and str(data) in c.detail
    data.write_text(json.dumps({"prompt": "What is 1+1?", "solution": "2"}) + "\n")
    c = by_name(check_dataset(cfg_of(*base)), "task.path")
    assert not c.ok and "no column 'answer' (task.answer_column)" in c.detail
    c = by_name(check_dataset(cfg_of(*base, "task.answer_column='solution'")), "task.path")
    assert c.ok and "'solution' (task.answer_column)" in c.detail


# ---------------------------------------------------------------- security and servers
def test_remote_host_or_url_without_key_is_refused(monkeypatch) -> None:
    c = check_security(cfg_of("server.host='0.0.0.0'"))[0]
    assert not c.ok and "needs server.api_key" in c.detail
    assert check_security(cfg_of("server.host='0.0.0.0'", "server.api_key='k'"))[0].ok
    c = check_security(cfg_of('server.urls=["http://10.0.0.7:8000", "http://127.0.0.1:1"]'))[0]
    assert (c.name, c.ok) == ("server.urls[0]", False) and "server.api_key" in c.detail
    ok = check_security(cfg_of('server.urls=["http://127.0.0.5:8000"]'))[0]
    assert ok.ok and ok.detail == "0 remote of 1 server.urls; no API key"
    monkeypatch.delenv("H8_TEST_KEY", raising=False)
    c = check_security(cfg_of("server.api_key_env='H8_TEST_KEY'"))[0]
    assert (c.name, c.ok) == ("server.api_key_env", False) and "'H8_TEST_KEY'" in c.detail
    monkeypatch.setenv("H8_TEST_KEY", "secret")
    c = check_security(cfg_of("server.host='0.0.0.0'", "server.api_key_env='H8_TEST_KEY'"))[0]
    assert c.ok and c.detail == "servers bind 0.0.0.0; API key set"
    flag = check_security(cfg_of("server.host='0.0.0.0'", "server.allow_remote_dev_mode=true"))
    assert flag[0].ok and "trusted network" in flag[0].detail


def test_unreachable_server_url_fails_within_the_deadline() -> None:
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    [c] = check_servers(cfg_of(f'server.urls=["{url}"]'))
    assert (c.name, c.ok) == ("server.urls[0]", False)
    assert c.detail.startswith(f"{url}: no /health within 3s")
    assert time.monotonic() - t0 < 10
    assert check_servers(cfg_of()) == []  # servers `run` launches are not probed


def test_preflight_error_is_one_line_naming_every_failure(tmp_path) -> None:
    (tmp_path / "f").write_text("x")
    cfg = cfg_of(f"buffer.path={tmp_path}/f/b", "reward.functions=[{name='nosuch_mod_y:f'}]")
    with pytest.raises(PreflightError) as err:
        preflight(cfg, "generate")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("preflight: buffer.path = ")
    assert "; reward.functions[0].name: " in msg
    assert [c.name for c in preflight(cfg_of(f"buffer.path={tmp_path}/b"), "learn")] == [
        "security", "buffer.path"]  # fmt: skip


# ---------------------------------------------------------------- the CLI, as a user runs it
def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpo_stream.cli", *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_generate_with_a_bad_reward_path_and_no_server_fails_in_seconds(tmp_path) -> None:
    from tests.conftest import free_port

    t0 = time.monotonic()
    r = _cli("generate", f"run.run_dir={tmp_path}/run", f'server.urls=["http://127.0.0.1:{free_port()}"]',
             "reward.functions=[{name='nosuch_pkg.rewards:score'}]")  # fmt: skip
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [
        "grpo-stream generate: preflight: reward.functions[0].name: cannot load "
        "'nosuch_pkg.rewards:score': ModuleNotFoundError: No module named 'nosuch_pkg'"
    ]
    assert took < 20, took  # was: a 300 s health wait (server.startup_timeout_s) first
    assert not (tmp_path / "run").exists()


def test_learn_with_an_unwritable_buffer_fails_in_seconds(tmp_path) -> None:
    (tmp_path / "f").write_text("x")
    t0 = time.monotonic()
    r = _cli("learn", f"buffer.path={tmp_path}/f/buffer")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"grpo-stream learn: preflight: buffer.path = {tmp_path}/f/buffer: {tmp_path}/f is a "
        "file, not a folder"
    ]
    assert time.monotonic() - t0 < 20  # was: a TimeoutError after learner.wait_timeout_s


def test_doctor_cli_prints_one_line_per_check(tmp_path) -> None:
    folder = fake_model(tmp_path / "m")
    r = _cli("doctor", f"model.path={folder}", f"buffer.path={tmp_path}/b")
    assert r.returncode == 0, r.stdout + r.stderr
    names = [line.split()[1] for line in r.stdout.splitlines()]
    assert names == ["config", "security", "model", "chat", "tied", "buffer.path",
                     "reward.functions", "task"]  # fmt: skip
    assert all(line.startswith("ok ") for line in r.stdout.splitlines())
    bad = _cli("doctor", f"model.path={tmp_path}/none", f"buffer.path={UNWRITABLE}")
    assert bad.returncode == 1
    fails = [line for line in bad.stdout.splitlines() if line.startswith("FAIL")]
    assert [f.split()[1] for f in fails] == ["model", "buffer.path"]
