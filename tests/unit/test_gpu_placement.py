"""Unit: how `grpo-stream run` splits one machine's GPUs between the learner and the vLLM
servers, the environment and arguments each server is started with, and the learner's
device (`learner.device = "cuda:N"`, made current; one that is not there is named).

No GPU is needed: the split is config, and a server's launch is a pure argv + environment
(`grpo_stream.serving.server.build_command` / `build_env`), checked here as `VLLMServer` and
`launch_servers` build them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grpo_stream.config import Config, ConfigError, load_config
from grpo_stream.config.placement import GpuPlan, learner_gpus, plan_gpus, visible_devices
from grpo_stream.learner.distributed import current_cuda_device
from grpo_stream.serving.server import build_command, build_env, make_servers


def cfg_of(*overrides: str) -> Config:
    return load_config(None, list(overrides))


def test_two_servers_and_a_learner_on_their_own_gpus() -> None:
    cfg = cfg_of("sync.transport=nccl", "server.num_servers=2", "server.gpus=[[1], [2, 3]]",
                 'learner.device="cuda:0"')  # fmt: skip
    assert plan_gpus(cfg) == GpuPlan(learner=None, servers=[[1], [2, 3]])
    assert visible_devices([2, 3]) == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert visible_devices(None) == {}


def test_learner_gpus_become_its_visible_devices() -> None:
    cfg = cfg_of("sync.transport=nccl", "learner.num_processes=2", "learner.gpus=[0, 1]",
                 "server.gpus=[[2]]")  # fmt: skip
    plan = plan_gpus(cfg)
    assert plan.learner == [0, 1] and plan.servers == [[2]]
    assert visible_devices(plan.learner) == {"CUDA_VISIBLE_DEVICES": "0,1"}


def test_nccl_refuses_a_learner_on_a_server_gpu() -> None:
    cfg = cfg_of("sync.transport=nccl", 'learner.device="cuda:1"', "server.gpus=[[1]]")
    with pytest.raises(ConfigError, match=r"learner \(GPUs \[1\]\) and server 0 .*GPU 1"):
        plan_gpus(cfg)


def test_nccl_defaults_overlap_on_gpu_0() -> None:
    # unset: the learner takes cuda:0 and the server GPU 0 too -> named, with the fields
    with pytest.raises(ConfigError, match="server.gpus") as err:
        plan_gpus(cfg_of("sync.transport=nccl"))
    assert "NCCL refuses" in str(err.value)


def test_two_servers_on_one_gpu_are_refused() -> None:
    cfg = cfg_of("server.num_servers=2", "server.gpus=[[1], [1]]", 'learner.device="cuda:0"')
    with pytest.raises(ConfigError, match="servers 0 and 1 both use GPU 1"):
        plan_gpus(cfg)


def test_disk_sync_may_share_a_gpu_when_memory_is_split() -> None:
    shared = ("sync.transport=disk", 'learner.device="cuda"', "server.gpus=[[0]]")
    with pytest.raises(ConfigError, match="server.gpu_memory_utilization"):
        plan_gpus(cfg_of(*shared))
    plan = plan_gpus(cfg_of(*shared, "server.gpu_memory_utilization=0.4"))
    assert plan == GpuPlan(learner=None, servers=[[0]])


def test_cpu_setup_is_not_planned() -> None:
    assert plan_gpus(cfg_of("server.num_servers=2")) == GpuPlan(None, [None, None])
    assert learner_gpus(cfg_of('learner.device="cpu"')) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["server.num_servers=2", "server.gpus=[[1]]"], "1 GPU lists for server.num_servers = 2"),
        (["server.gpus=[[]]"], r"server.gpus\[0\]: an empty GPU list"),
        (["server.gpus=[[1, 1]]"], "distinct"),
        (["learner.gpus=[0, 1]", "server.gpus=[[2]]"], "learner.num_processes = 1"),
        (['learner.device="cuda:0"', "learner.gpus=[0]"], "learner.gpus are both set"),
        (["learner.num_processes=2", 'learner.device="cuda:1"'], "use learner.gpus"),
        (['learner.device="cuda:x"'], "expected cuda:N"),
    ],
)
def test_bad_gpu_lists_name_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_gpus(cfg_of(*overrides))


def test_remote_servers_are_not_planned() -> None:
    cfg = cfg_of("sync.transport=nccl", 'server.urls=["http://10.0.0.2:8000"]')
    assert plan_gpus(cfg) == GpuPlan(learner=None, servers=[])


def test_server_environment_carries_its_gpus_and_dev_mode() -> None:
    cfg = cfg_of("server.num_servers=2", "server.gpus=[[1], [2, 3]]").server
    env = build_env(cfg, base={"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, gpus=[2, 3])
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"  # replaces what the parent sees
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["PATH"] == "/bin"
    inherited = build_env(cfg, base={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert inherited["CUDA_VISIBLE_DEVICES"] == "0,1"  # no list: left as it was


def test_each_launched_server_gets_its_own_list(tmp_path: Path) -> None:
    cfg = cfg_of("server.num_servers=2", "server.gpus=[[1], [2]]",
                 "server.gpu_memory_utilization=0.8").server  # fmt: skip
    servers = make_servers(cfg, tmp_path, "policy", tmp_path)  # what launch_servers starts
    envs = [build_env(cfg, base={}, gpus=s.gpus) for s in servers]  # as VLLMServer.start
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["1", "2"]
    assert [s.port for s in servers] == [8000, 8001]
    for s in servers:
        assert s.command[s.command.index("--gpu-memory-utilization") + 1] == "0.8"
    unset = make_servers(cfg_of().server, tmp_path, "policy", tmp_path)
    assert [s.gpus for s in unset] == [None]


def test_memory_share_becomes_the_vllm_flag(tmp_path: Path) -> None:
    cfg = cfg_of("server.gpu_memory_utilization=0.35", 'server.dtype="bfloat16"').server
    cmd = build_command(tmp_path, "policy", 8000, cfg)
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.35"
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert "--gpu-memory-utilization" not in build_command(tmp_path, "p", 8000, cfg_of().server)


def test_memory_share_is_a_fraction() -> None:
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        cfg_of("server.gpu_memory_utilization=1.5")


def test_run_refuses_the_split_before_starting_anything(tmp_path: Path) -> None:
    from grpo_stream.run.orchestrate import run_pipeline

    cfg = cfg_of("sync.transport=nccl", f'run.output_dir="{tmp_path}"')
    with pytest.raises(ConfigError, match="NCCL refuses"):
        run_pipeline(cfg)
    assert list(tmp_path.iterdir()) == []  # no run folder, no server, no child


def test_the_learner_child_sees_only_its_gpus(tmp_path: Path) -> None:
    import sys

    from grpo_stream.run.orchestrate import Child

    argv = [sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"]
    child = Child("learner", argv, tmp_path / "learner.log", echo=False,
                  env=visible_devices([2, 3]))  # fmt: skip
    child.proc.wait(60)
    child.stop()
    assert (tmp_path / "learner.log").read_text().strip() == "2,3"


def test_cpu_learner_device_is_left_alone() -> None:
    assert current_cuda_device(torch.device("cpu")) == torch.device("cpu")


def test_a_learner_gpu_that_is_not_there_is_named() -> None:
    n = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"learner.device = 'cuda:{n}'"):
        current_cuda_device(torch.device("cuda", n))
