"""What a run leaves on disk (defect 12, issue 20): a demo left 4.9 GB, two 1.9 GB
checkpoints and two weight folders for a 135M model.

- the real learner in-process (tiny model, real Arrow buffer): after N steps the run
  folder holds one checkpoint; with `learner.keep_final_optimizer = false` the last one
  holds no AdamW state, and a resume with more steps still trains on from it;
- the disk sync keeps one weights folder, but not at the cost of a server that is still
  loading an older one: `run`'s re-sync of a restarted server holds its folder while a
  push lands (a scripted server whose reload is slow: fault injection), and that folder
  is deleted by the next push once the server is done.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import torch
from aiohttp import web
from fake_vllm import OK_JSON
from test_learner_loop import append, make_config, tiny  # noqa: F401 (fixture)
from test_learner_sync_failure import ServerThread

from bench.synth import make_groups
from grpo_stream.config import Config, SyncConfig
from grpo_stream.learner.loop import Learner
from grpo_stream.run.supervise.servers import resync
from grpo_stream.sync.disk import DiskSync, hold_weights, version_folders


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_n_steps_keep_one_checkpoint_and_resume_from_it(tiny: Path, tmp_path: Path, capsys):  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    append(run, make_groups(12, group_size=4, prompt_len=6, completion_len=6))
    more = {"checkpoint_every": 1, "max_staleness": 1000}
    cfg = make_config(tiny, run, max_steps=3, keep_final_optimizer=False, **more)
    Learner(cfg, str(run), str(tiny)).run()
    assert _names(run / "checkpoints") == ["step-3"]
    blob = torch.load(run / "checkpoints" / "step-3" / "trainer.pt", weights_only=False)
    assert blob["optimizer_format"] == "omitted" and blob["optimizer"] is None
    assert blob["scheduler"]["last_epoch"] == 3 * 2 * 2  # steps x epochs x minibatches

    cfg = make_config(tiny, run, max_steps=5, keep_final_optimizer=False, **more)
    Learner(cfg, str(run), str(tiny), resume=True).run()
    err = capsys.readouterr().err
    assert "step-3 holds no optimizer state" in err and "resumed from" in err
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert _names(run / "checkpoints") == ["step-5"]
    # step 4's checkpoint (not the last) kept AdamW's state until step 5 replaced it;
    # the default keeps it in the last one too
    cfg = make_config(tiny, run, max_steps=6, **more)
    Learner(cfg, str(run), str(tiny), resume=True).run()
    blob = torch.load(run / "checkpoints" / "step-6" / "trainer.pt", weights_only=False)
    assert blob["optimizer_format"] == "torch" and blob["optimizer"]["state"]


def _model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def test_the_sync_keeps_the_newest_folder_and_drops_a_killed_runs(tiny: Path, tmp_path: Path):  # noqa: F811
    model, root = _model(tiny), tmp_path / "weights"
    sync = DiskSync(SyncConfig(), [], root, rank=0)
    for v in (0, 1, 2, 5):  # v5: a killed learner's, discarded by the resume below
        sync.publish(model, v)
    assert [v for v, _ in version_folders(root)] == [0, 1, 2, 5]
    (root / "v6.tmp").mkdir()  # the killed learner's half-written folder
    sync.prune(2)
    assert _names(root) == ["v2"]  # keep_last = 1; v5 and v6.tmp: newer than the learner's v2
    with hold_weights(root / "v2"):  # a restarted server loads v2 while v3 is pushed
        sync.publish(model, 3)
        sync.prune(3)
        assert _names(root) == ["v2", "v3"]
    sync.publish(model, 4)
    sync.prune(4)
    assert _names(root) == ["v4"]


def test_a_restarted_servers_folder_outlives_a_push_during_its_reload(tiny: Path, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    model, root = _model(tiny), run / "weights"
    sync = DiskSync(SyncConfig(), [], root, rank=0)
    sync.publish(model, 1)
    seen = {}

    def push_v2() -> None:  # the learner's next push lands while the server reloads v1
        sync.publish(model, 2)
        sync.prune(2)
        seen["during"] = _names(root)

    async def slow_reload(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.setdefault("reloaded", []).append(body["kwargs"]["weights_path"])
        if len(seen["reloaded"]) == 1:
            await asyncio.to_thread(push_v2)
        return web.json_response({})

    routes = ["/pause", "/update_weight_version", "/reset_prefix_cache", "/resume"]
    script = {"/collective_rpc": [slow_reload]} | {r: [OK_JSON] for r in routes}
    with ServerThread(script) as srv:
        cfg = Config()
        cfg.sync.transport = "disk"
        version = resync(srv.url, cfg, run)
    assert seen["during"] == ["v1", "v2"]  # v1 was held: not deleted under the server
    assert seen["reloaded"] == [str(root / "v1"), str(root / "v2")]  # then the newest
    assert version == 2
    sync.publish(model, 3)
    sync.prune(3)
    assert _names(root) == ["v3"]  # released: the next push deletes what no one holds
