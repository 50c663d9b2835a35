"""Transport names branch only inside `grpo_stream/sync`; everything else asks a trait.

- a source scan (ast) over `grpo_stream/` refuses any comparison of a transport name
  with something named `*transport*`, a `match` on one, and a side table keyed by one,
  outside `sync/` and the trait table itself (`config/transports.py`);
- the trait table, the config's `sync.transport` choices and `sync.TRANSPORTS` list the
  same transports, and each sync class carries its row's `versions_servers`;
- each trait is what its callers read: flipping one row's trait flips their behaviour
  (the version after a step, GPU placement, the servers' weight-transfer backend, the
  supervisor's re-sync of a restarted server, the doctor's tied-embedding check).
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import torch
from fake_vllm import OK_JSON, CannedServer
from test_doctor import by_name, fake_model

from grpo_stream.config import Config, ConfigError, LoraConfig, SyncConfig, load_config
from grpo_stream.config.placement import plan_gpus
from grpo_stream.config.transports import TRANSPORT_TRAITS, transport_traits
from grpo_stream.learner.step import version_after
from grpo_stream.run.doctor_checks import check_model
from grpo_stream.run.supervise.servers import resync
from grpo_stream.sync import TRANSPORTS, make_weight_sync

PKG = Path(__file__).resolve().parents[2] / "grpo_stream"
EXEMPT = (PKG / "sync", PKG / "config" / "transports.py")
# a variable or attribute named like a transport (cfg.sync.transport, sync_transport),
# not a call of a function whose name starts so (transport_traits(...))
MENTION = re.compile(r"transport\w*(?![\w(])")


def _names(node: ast.AST) -> set[str]:
    """Transport names written as a literal (or a tuple/list/set of them) in `node`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value} & set(TRANSPORT_TRAITS)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_names(e) for e in node.elts))
    return set()


def _mentions(node: ast.AST) -> bool:
    return bool(MENTION.search(ast.unparse(node)))


def name_branches(source: str) -> list[tuple[int, str]]:
    """(line, code) of every decision in `source` taken on a transport's name."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(map(_names, sides)) and any(_mentions(s) for s in sides if not _names(s)):
                out.append(node)
        elif isinstance(node, ast.Match) and _mentions(node.subject):
            out.append(node)
        elif isinstance(node, ast.Subscript) and _mentions(node.slice):  # TABLE[cfg.transport]
            out.append(node)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "get" and node.args and _mentions(node.args[0]):
                out.append(node)
    return [(n.lineno, ast.unparse(n)[:80]) for n in out]


def test_the_scan_sees_every_form_of_name_branching() -> None:
    """The scan can fail: each way of branching on the name is caught, a torch
    backend check and a trait lookup are not."""
    caught = [
        'if cfg.sync.transport == "nccl": pass',
        'x = cfg.sync.transport != "none"',
        'x = sync_transport in ("disk", "nccl")',
        'x = "disk" == transport',
        'x = {"disk": 1}[cfg.sync.transport]',
        "x = TABLE.get(self.cfg.sync.transport)",
        'match cfg.sync.transport:\n    case "nccl":\n        pass',
    ]
    for code in caught:
        assert len(name_branches(code)) == 1, code
    fine = [
        'x = dist.get_backend() == "nccl"',
        'x = loss.behaviour_correction == "none"',
        "x = transport_traits(cfg.sync.transport).nccl_group",
        'x = f"sync.transport = {cfg.sync.transport!r}"',
        "x: dict[str, TransportTraits] = {}",
    ]
    assert [c for c in fine if name_branches(c)] == []


def test_no_transport_name_branches_outside_sync() -> None:
    found = [
        f"{path.relative_to(PKG.parent)}:{line}: {code}"
        for path in sorted(PKG.rglob("*.py"))
        if not any(path == e or e in path.parents for e in EXEMPT)
        for line, code in name_branches(path.read_text())
    ]
    assert found == [], "ask a trait (grpo_stream.config.transports / WeightSync) instead"


def test_one_list_of_transports_everywhere(tmp_path: Path) -> None:
    choices = typing.get_args(SyncConfig.model_fields["transport"].annotation)
    everything = {"disk", "nccl", "lora", "none"}
    assert set(choices) == set(TRANSPORT_TRAITS) == set(TRANSPORTS) == everything
    for name in choices:
        lora = LoraConfig(enabled=transport_traits(name).adapters)  # adapters need [lora]
        sync = make_weight_sync(Config(sync=SyncConfig(transport=name), lora=lora), str(tmp_path))
        assert sync.versions_servers is transport_traits(name).versions_servers
        sync.close()
    with pytest.raises(ValueError, match=r"sync.transport = 'ipc': not one of"):
        transport_traits("ipc")


@pytest.fixture
def flip(monkeypatch):
    """flip(name, trait=value): that transport's row with one trait changed."""

    def set_trait(name: str, **trait) -> None:
        row = dataclasses.replace(TRANSPORT_TRAITS[name], **trait)
        monkeypatch.setitem(TRANSPORT_TRAITS, name, row)

    return set_trait


def test_versions_servers_decides_the_version_after_a_step(flip) -> None:
    disk = load_config(None, ["sync.transport=disk", "sync.every=2"])
    none = load_config(None, ["sync.transport=none", "sync.every=2"])
    assert [version_after(s, disk) for s in (1, 2, 3)] == [0, 2, 2]  # the synced steps
    assert [version_after(s, none) for s in (1, 2, 3)] == [1, 2, 3]  # every step's
    flip("disk", versions_servers=False)
    assert [version_after(s, disk) for s in (1, 2, 3)] == [1, 2, 3]


def test_nccl_group_decides_gpu_placement(flip) -> None:
    shared = ['learner.device="cuda:0"', "server.gpus=[[0]]", "server.gpu_memory_utilization=0.4"]
    assert plan_gpus(load_config(None, ["sync.transport=disk", *shared])).servers == [[0]]
    flip("disk", nccl_group=True)
    with pytest.raises(ConfigError, match=r"sync.transport = 'disk': the learner .*NCCL refuses"):
        plan_gpus(load_config(None, ["sync.transport=disk", *shared]))
    # a CPU setup is planned only when GPUs are in play: an NCCL group puts them in play
    assert plan_gpus(load_config(None, ["sync.transport=none"])).servers == [None]
    flip("none", nccl_group=True)
    with pytest.raises(ConfigError, match="NCCL refuses"):
        plan_gpus(load_config(None, ["sync.transport=none"]))


def test_server_backend_starts_the_servers_with_it(flip) -> None:
    # derived where used (Config.resolved_server), never stored in the config itself
    def launched(transport: str):
        return Config(sync=SyncConfig(transport=transport)).resolved_server()

    assert launched("nccl").weight_transfer_backend == "nccl"
    assert launched("disk").weight_transfer_backend is None
    flip("disk", server_backend="nccl")
    assert launched("disk").weight_transfer_backend == "nccl"


def test_adapters_decides_the_servers_lora_slots_and_the_requested_name(flip) -> None:
    from grpo_stream.serving.adapters import request_model, versioned
    from grpo_stream.serving.server import build_command

    lora = ["lora.enabled=true", "lora.rank=4", "learner.max_staleness=3"]
    cfg = load_config(None, ["sync.transport=lora", *lora])
    server = cfg.resolved_server()
    assert (server.max_lora_rank, server.max_loras) == (8, 5)  # vLLM's rank 8 holds r = 4
    argv = build_command(Path("/m"), "policy", 8000, server)
    assert argv[argv.index("--max-lora-rank") + 1] == "8" and "--enable-lora" in argv
    assert versioned(request_model(cfg), 7) == "policy-v7"
    none = load_config(None, ["sync.transport=none", *lora])
    assert none.resolved_server().max_lora_rank is None
    assert versioned(request_model(none), 7) == "policy"
    flip("none", adapters=True)
    assert none.resolved_server().max_loras == 5
    assert versioned(request_model(none), 7) == "policy-v7"


def _resync_calls(tmp_path: Path, transport: str) -> tuple[int, list[str]]:
    """resync() of one server under `transport` with RUN/weights/v3 published: (the
    version it reports, the server's calls)."""
    from safetensors.torch import save_file

    (tmp_path / "weights" / "v3").mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights" / "v3" / "model.safetensors"))
    routes = ["/pause", "/collective_rpc", "/update_weight_version", "/reset_prefix_cache"]

    async def main():
        async with CannedServer({r: [OK_JSON] for r in [*routes, "/resume"]}) as srv:
            cfg = load_config(None, [f"sync.transport={transport}", "sync.timeout_s=10"])
            version = await asyncio.to_thread(resync, srv.url, cfg, tmp_path)
            return version, srv.paths()

    return asyncio.run(main())


def test_reloads_from_disk_decides_a_restarted_servers_resync(tmp_path: Path, flip) -> None:
    assert _resync_calls(tmp_path, "disk") == (3, ["/pause", "/collective_rpc",
                                                   "/update_weight_version",
                                                   "/reset_prefix_cache", "/resume"])  # fmt: skip
    assert _resync_calls(tmp_path, "nccl") == (0, [])  # the resumed learner sends them
    flip("disk", reloads_from_disk=False)
    assert _resync_calls(tmp_path, "disk") == (0, [])
    flip("nccl", reloads_from_disk=True)
    assert _resync_calls(tmp_path, "nccl")[0] == 3


def test_reloads_from_disk_decides_the_doctors_tied_check(tmp_path: Path, flip) -> None:
    tied = fake_model(tmp_path / "tied", tied=True)
    cfg = load_config(None, [f"model.path={tied}", "sync.transport=none"])
    assert by_name(check_model(cfg), "tied embeddings").detail == (
        "tied (fine with sync.transport = 'none')"
    )
    flip("none", reloads_from_disk=True)
    assert by_name(check_model(cfg), "tied embeddings").detail.startswith(
        "tied: sync.transport = 'none' serves an untied copy"
    )
