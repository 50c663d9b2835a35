"""`run`'s reward-model servers: a killed one is restarted on its port and recorded; one
crash too many is a give-up, also recorded. The children are real processes (`sleep`)
standing in for vLLM, killed to inject the crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from grpo_stream.config import Config
from grpo_stream.run.rm_keeper import RewardServerKeeper, peak_rss_mb


class SleepServer:
    """A child with the RewardModelServer interface the keeper uses."""

    started: list[SleepServer] = []

    def __init__(self, model_dir, served_name, port, cfg, log_file) -> None:
        self.model_dir, self.served_name, self.port = model_dir, served_name, port
        self.cfg, self.log_file, self.proc = cfg, log_file, None

    def start(self):
        self.proc = subprocess.Popen(["sleep", "600"])
        SleepServer.started.append(self)
        return self

    def wait_healthy(self) -> float:
        return 0.0

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()


def _wait(cond, limit_s: float = 30.0) -> bool:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _cfg() -> Config:
    return Config.model_validate({
        "reward": {"functions": [{"name": "reward_model"}]},
        "reward_model": {"path": "rm", "port": 9400},
        "run": {"max_restarts": 1},
    })  # fmt: skip


def _events(run_dir) -> list[tuple[str, str]]:
    lines = (run_dir / "supervisor.jsonl").read_text().splitlines()
    return [(json.loads(x)["event"], json.loads(x)["child"]) for x in lines]


def test_a_killed_reward_server_is_restarted_then_given_up(tmp_path) -> None:
    SleepServer.started = []
    make = lambda cfg, logs: [SleepServer("rm", "reward", 9400, cfg.server, logs / "x.log")]  # noqa: E731
    keeper = RewardServerKeeper(_cfg(), tmp_path, poll_s=0.05, make=make)
    try:
        (first,) = keeper.start()
        os.kill(first.proc.pid, signal.SIGKILL)
        assert _wait(lambda: len(SleepServer.started) == 2 and keeper.servers[0].is_alive())
        second = keeper.servers[0]
        assert second is not first and second.port == 9400
        assert _wait(lambda: (tmp_path / "supervisor.jsonl").exists())
        assert _events(tmp_path) == [("restart", "reward_server0")]
        os.kill(second.proc.pid, signal.SIGKILL)  # run.max_restarts = 1: the second crash
        assert _wait(lambda: keeper.gave_up == "reward_server0")
        assert _events(tmp_path)[-1] == ("give_up", "reward_server0")
        assert len(SleepServer.started) == 2
    finally:
        keeper.close()
    assert not any(s.is_alive() for s in SleepServer.started)


def test_nothing_is_started_for_rule_rewards_or_external_urls(tmp_path) -> None:
    assert RewardServerKeeper(Config(), tmp_path).start() == []
    cfg = _cfg()
    cfg.reward_model.urls = ["http://10.0.0.5:8100"]
    assert RewardServerKeeper(cfg, tmp_path).start() == []


def test_close_records_the_servers_peak_memory(tmp_path) -> None:
    class ShellServer(SleepServer):  # a parent with a child: the tree's memory is summed
        def start(self):
            self.proc = subprocess.Popen(["sh", "-c", "sleep 600 & wait"])
            return self

    make = lambda cfg, logs: [ShellServer("rm", "reward", 9400, cfg.server, logs / "x.log")]  # noqa: E731
    keeper = RewardServerKeeper(_cfg(), tmp_path, poll_s=0.05, make=make)
    (server,) = keeper.start()
    import psutil

    assert _wait(lambda: len(psutil.Process(server.proc.pid).children()) == 1)
    own = peak_rss_mb(server.proc.pid)
    keeper.close()
    (peak,) = json.loads((tmp_path / "reward_servers.json").read_text())["peak_rss_mb"]
    assert peak == own and 0 < peak < 100  # sh + sleep: a few MB
