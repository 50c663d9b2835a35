"""`server.api_key` is a secret (issue 20, defect 1): no run folder file, `config show`
output, sweep record or error message holds it; a written config names the variable that
carries it (`api_key_env`), so a resume asks for the key again through that variable and
fails naming `server.api_key_env` without it; `run` hands the variable to its children
explicitly; and the weight syncs send the key they are given, with os.environ untouched.
Every check writes real files (or runs real processes) and greps them for the key."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w
from fake_vllm import OK_JSON, CannedServer

from grpo_stream.analysis.sweep import SweepError, load_sweep, run_sweep
from grpo_stream.cli import _check_api_key
from grpo_stream.config import (
    ConfigError,
    load_config,
    load_run_config,
    write_run_config,
)
from grpo_stream.config.sections import CHILD_KEY_ENV
from grpo_stream.config.show import render_config
from grpo_stream.run.orchestrate import _commands, make_run_dir
from grpo_stream.run.supervise import Supervisor
from grpo_stream.sync import make_weight_sync
from grpo_stream.sync.nccl import _ServersClient, worker_count

ROOT = Path(__file__).parents[2]
KEY = "s3cret-k-7f2a"
DISK_ROUTES = ["/pause", "/collective_rpc", "/update_weight_version", "/reset_prefix_cache"]


def files_holding(folder: Path, text: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and text in p.read_text()]


@pytest.fixture
def no_key_env(monkeypatch):
    for name in (CHILD_KEY_ENV, "VLLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_no_run_config_file_holds_the_key(tmp_path: Path, no_key_env) -> None:
    cfg = load_config(None, [f"server.api_key='{KEY}'", f"run.run_dir='{tmp_path}'"])
    assert write_run_config(cfg, tmp_path, "generate") == tmp_path / "config.toml"
    # the same config again (another role): equal as written, no second file
    assert write_run_config(cfg, tmp_path, "eval") == tmp_path / "config.toml"
    other = load_config(None, [f"server.api_key='{KEY}'", "learner.lr=3e-5"])
    assert write_run_config(other, tmp_path, "learn") == tmp_path / "config.learn.toml"
    make_run_dir(cfg)  # `run` writes RUN/config.toml itself
    assert sorted(p.name for p in tmp_path.glob("config*.toml")) == [
        "config.learn.toml",
        "config.toml",
    ]
    assert files_holding(tmp_path, KEY) == []
    server = tomllib.loads((tmp_path / "config.toml").read_text())["server"]
    assert "api_key" not in server and server["api_key_env"] == CHILD_KEY_ENV
    assert KEY not in repr(cfg) and KEY not in str(cfg.model_dump())


def test_config_show_prints_no_key(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "grpo_stream.cli", "config", "show",
                          f"server.api_key='{KEY}'", "server.api_key_env='MY_KEY'"],
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    (tmp_path / "show.toml").write_text(out.stdout)
    assert files_holding(tmp_path, KEY) == []
    assert "# api_key = (secret: set, not shown)" in out.stdout.splitlines()
    assert 'api_key_env = "MY_KEY"' in out.stdout.splitlines()  # the one in effect
    assert "# api_key = (unset)" in render_config(load_config(None))


def test_a_bad_key_is_not_echoed_in_the_error() -> None:
    with pytest.raises(ConfigError, match="server.api_key") as info:
        load_config(None, ["server.api_key=918273645"])  # a number, not a string
    assert "918273645" not in str(info.value)


def test_a_sweep_refuses_the_key_and_records_none(tmp_path: Path, no_key_env) -> None:
    base = tomllib.loads((ROOT / "configs" / "tiny.toml").read_text())
    base.setdefault("server", {})["api_key"] = KEY  # a key in the base config file
    (tmp_path / "base.toml").write_text(tomli_w.dumps(base))
    sweep = f"""[sweep]
base = "base.toml"
out_dir = {json.dumps(str(tmp_path / "out"))}
[sweep.budget]
samples = 8
[[sweep.grid]]
"run.seed" = [0, 1]
"""
    (tmp_path / "sweep.toml").write_text(sweep)

    def launch(argv: list[str], run_dir: Path) -> int:
        """`grpo-stream run`'s writes: the run config (from argv), then metrics rows."""
        i = argv.index("--config")
        cfg = load_config(argv[i + 1], argv[i + 2 :])
        write_run_config(cfg, run_dir, "run")
        (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
        return 0

    ran, failed = run_sweep(load_sweep(tmp_path / "sweep.toml"), launch)
    assert len(ran) == 2 and failed == []
    out = tmp_path / "out"
    assert len(list(out.glob("*/sweep_done.json"))) == 2
    assert len(list(out.glob("*/config.toml"))) == 2
    assert files_holding(out, KEY) == []
    keyed = sweep.replace('"run.seed" = [0, 1]', f"\"server.api_key\" = ['{KEY}']")
    (tmp_path / "keyed.toml").write_text(keyed)
    with pytest.raises(SweepError, match="server.api_key: a secret is not a sweep override"):
        load_sweep(tmp_path / "keyed.toml")
    fixed = sweep.replace(
        "[sweep.budget]", f"overrides = [\"server.api_key='{KEY}'\"]\n[sweep.budget]"
    )
    (tmp_path / "fixed.toml").write_text(fixed)
    with pytest.raises(SweepError, match="server.api_key_env"):
        load_sweep(tmp_path / "fixed.toml")


def test_a_resume_without_the_variable_fails_naming_the_field(tmp_path: Path, no_key_env):
    write_run_config(load_config(None, [f"server.api_key='{KEY}'"]), tmp_path, "run")
    with pytest.raises(ConfigError, match=f"server.api_key_env = '{CHILD_KEY_ENV}'"):
        _check_api_key(load_run_config(tmp_path))
    env = {k: v for k, v in os.environ.items() if k not in (CHILD_KEY_ENV, "VLLM_API_KEY")}
    res = subprocess.run([sys.executable, "-m", "grpo_stream.cli", "run", "--resume",
                          str(tmp_path)], capture_output=True, text=True, timeout=60,
                         env=env)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert f"server.api_key_env = '{CHILD_KEY_ENV}': that environment variable" in res.stderr


def test_with_the_variable_the_weight_sync_sends_the_key(
    tmp_path: Path, tiny_lm, no_key_env, monkeypatch
) -> None:
    write_run_config(load_config(None, [f"server.api_key='{KEY}'"]), tmp_path, "run")
    monkeypatch.setenv(CHILD_KEY_ENV, KEY)  # the user answers the resume's question
    before = dict(os.environ)

    async def main():
        script = {r: [OK_JSON] for r in [*DISK_ROUTES, "/resume"]}
        script["/get_world_size"] = [(200, json.dumps({"world_size": 1}))]
        async with CannedServer(script) as srv:
            cfg = load_run_config(tmp_path, [f"server.urls=['{srv.url}']"])
            sync = make_weight_sync(cfg, str(tmp_path))
            await asyncio.to_thread(sync.push, tiny_lm, 1)
            key = cfg.server.resolved_api_key()  # NCCL: what NCCLSync hands its clients
            assert await asyncio.to_thread(worker_count, srv.url, 10, key) == 1
            nccl = _ServersClient([srv.url], [1], 10, key)
            await asyncio.to_thread(nccl.http.post, srv.url, "/resume")
            return srv.calls

    calls = asyncio.run(main())
    assert [c.path for c in calls] == [*DISK_ROUTES, "/resume", "/get_world_size", "/resume"]
    assert {c.headers.get("Authorization") for c in calls} == {f"Bearer {KEY}"}
    assert dict(os.environ) == before and "VLLM_API_KEY" not in os.environ


def test_run_hands_its_children_the_variable(tmp_path: Path, no_key_env) -> None:
    cfg = load_config(None, [f"server.api_key='{KEY}'"])
    cmds = _commands(cfg, tmp_path / "config.toml", {"CUDA_VISIBLE_DEVICES": ""}, False)
    assert cmds.env == {CHILD_KEY_ENV: KEY}
    show = [sys.executable, "-c", f"import os; print(os.environ.get({CHILD_KEY_ENV!r}))"]
    cmds.generator, cmds.evaluator = show, show
    cmds.learner = lambda again: show
    (tmp_path / "logs").mkdir()
    sup = Supervisor(cfg, tmp_path, cmds)
    sup.start()
    for child in (sup.generator, sup.learner, sup.evaluator):
        assert child.proc.wait(30) == 0
        child.stop()
    for log in ("generator.log", "learner.log", "eval.log"):
        assert (tmp_path / "logs" / log).read_text().strip() == KEY, log
    assert CHILD_KEY_ENV not in os.environ
