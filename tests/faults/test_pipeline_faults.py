"""Faults injected into the real pipeline (issue 12): each case runs `generate` and
`learn` against the session's real vLLM CPU server on the tiny model, kills or starves a
part on purpose, and checks that every started prompt ends in exactly one state
(grpo_stream.run.ledger), that no group is duplicated, and what the run said.

The server is shared by every case (and by other test files): each case's fresh learner
pushes its own weights as version 0 first, which is itself defect 1's fix under test.
"""

from __future__ import annotations

import math
import os
import subprocess
import textwrap

import pytest
from faults_harness import Run, cli, kill, log_tail, record, steps_logged, wait_until

from grpo_stream.buffer.store import open_reader
from grpo_stream.core.jsonl import read as read_jsonl
from grpo_stream.run.ledger import run_ledger

pytestmark = pytest.mark.slow

STEPS = 3


def _finish(run: Run, gen, learn, timeout: float = 400) -> None:
    assert run.wait(learn, timeout) == 0, log_tail(learn)
    assert run.wait(gen, 120) == 0, log_tail(gen)  # it stops once the learner finished


def _exactly_once(run: Run):
    led = run.ledger()
    assert led.none == [], led.none
    assert led.multi == {}, led.multi
    assert led.duplicated_groups == 0
    return led


def _increasing(batches: list[list[int]]) -> None:
    flat = [g for b in batches for g in b]
    assert flat == sorted(set(flat)), batches  # none trained twice, in cursor order


def test_a_reused_server_is_reset_to_this_runs_version_0(tmp_path, tiny_server, tiny_model_dir):
    """Defect 1: run A leaves its final weights (version 3) on the server; run B, a fresh
    learner on the same server, must train step 1 on its own version-0 samples."""
    url = tiny_server.url
    a = Run(tmp_path, url, tiny_model_dir, "learner.lr=1e-2", name="a")
    gen, learn = a.start("generate"), a.start("learn")
    _finish(a, gen, learn)
    from grpo_stream.serving.server import get_json

    assert get_json(f"{url}/weight_info") == (200, {"weight_version": str(STEPS)})
    b = Run(tmp_path, url, tiny_model_dir, name="b")
    gen, learn = b.start("generate"), b.start("learn")
    _finish(b, gen, learn)
    first = b.metrics()[0]
    assert first["staleness_mean"] >= 0 and first["staleness_max"] >= 0
    assert first["kl"] < 0.05, first["kl"]  # not run A's policy (KL was 47 there)
    lineage = (b.dir / "lineage").read_text().strip()
    r = open_reader(b.buffer)
    rows = r.read_table(0, r.num_groups(), ["run_id", "policy_version"]).to_pylist()
    assert {x["run_id"] for x in rows} == {f"b@{lineage}"}
    trained = {g for batch in b.trained() for g in batch}
    step1 = b.trained()[0]
    assert all(rows[G * gid]["policy_version"] == 0 for gid in step1)
    assert trained and a.ledger().ok
    led = _exactly_once(b)
    record("reused server holding another run's weights (defect 1)",
           f"step 1 on version 0 (stale {first['staleness_mean']:.0f}, KL {first['kl']:.4f})",
           led)  # fmt: skip


G = 2


def test_generator_killed_mid_append_restarts_without_repeat_or_gap(
    tmp_path, tiny_server, tiny_model_dir
):
    run = Run(tmp_path, tiny_server.url, tiny_model_dir)
    learn = run.start("learn")
    gen = run.start("generate", env={"GRPO_STREAM_FAULT": "append:kill@3"})
    assert gen.wait(300) == -9, log_tail(gen)  # SIGKILLed itself half way through group 3
    assert any(n.endswith(".tmp") for n in os.listdir(run.buffer))  # the torn segment
    assert open_reader(run.buffer).num_groups() == 3
    gen = run.start("generate")  # what run's supervision does
    _finish(run, gen, learn)
    assert not any(n.endswith(".tmp") for n in os.listdir(run.buffer))
    assert "prompts already started" in log_tail(gen)
    _increasing(run.trained())
    if not run.drops():  # the learner never noticed: an uninterrupted run's batches
        assert run.trained() == [[0, 1], [2, 3], [4, 5]]
    assert len(run.metrics()) == STEPS
    out = subprocess.run(cli("buffer", "ledger", str(run.dir)), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "in two states: 0; in none: 0; duplicated groups: 0" in out.stdout
    record("generator SIGKILLed mid-append", "restarted; in-flight prompts regenerated once",
           _exactly_once(run))  # fmt: skip


REWARDS = """
import math, time

def flaky(completion, prompt, **kwargs):
    i = int(prompt.prompt_id.rsplit("-", 1)[1])
    if i % 4 == 1:
        raise ValueError(f"boom for {prompt.prompt_id}")
    if i % 4 == 2:
        time.sleep(30)  # past reward.timeout_s
    if i % 4 == 3:
        return math.nan
    return float(len(completion) % 3)
"""


def test_rewards_that_raise_hang_or_return_nan_drop_their_groups(
    tmp_path, tiny_server, tiny_model_dir
):
    mod = tmp_path / "flaky_rewards.py"
    mod.write_text(textwrap.dedent(REWARDS))
    run = Run(tmp_path, tiny_server.url, tiny_model_dir, "reward.timeout_s=2",
              f"reward.functions=[{{name='{mod}:flaky'}}]", "learner.max_steps=2")  # fmt: skip
    gen, learn = run.start("generate"), run.start("learn")
    _finish(run, gen, learn, timeout=500)
    led = _exactly_once(run)
    reasons = [d["detail"] for d in run.drops() if d["reason"] == "reward_failed"]
    assert any("boom for" in r for r in reasons), reasons
    assert any("timed out" in r for r in reasons), reasons
    assert led.counts["reward_failed"] == len(reasons) >= 3
    assert all(math.isfinite(m["reward_mean"]) for m in run.metrics())
    record("reward raises / hangs past timeout / returns NaN",
           f"{len(reasons)} groups dropped with the reason; run finished", led)  # fmt: skip


def test_a_truncated_segment_is_skipped_and_its_prompts_regenerated(
    tmp_path, tiny_server, tiny_model_dir
):
    run = Run(tmp_path, tiny_server.url, tiny_model_dir, "buffer.rollup_segments=0")
    out = run.run("generate", "generator.wait_for_learner=false", "generator.stop_after_groups=3",
                  timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    seg = sorted(n for n in os.listdir(run.buffer) if n.startswith("seg-"))[1]
    path = os.path.join(run.buffer, seg)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    gen, learn = run.start("generate"), run.start("learn", "learner.max_steps=2")
    _finish(run, gen, learn)
    corrupt = [d for d in run.drops() if d["reason"] == "corrupt"]
    assert [d["group_id"] for d in corrupt] == [1]
    r = open_reader(run.buffer)
    r.read_groups(0, r.num_groups())
    assert r.corrupt() == [seg]  # named, never read as data
    _increasing(run.trained())
    record("truncated segment file", "segment skipped and named; its prompt regenerated",
           _exactly_once(run))  # fmt: skip


def _published_checkpoint(run_dir) -> bool:
    """A renamed `checkpoints/step-N` folder (not a `step-N.tmp` being written)."""
    root = os.path.join(run_dir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return any(n.startswith("step-") and not n.endswith(".tmp") for n in names)


def test_learner_killed_mid_step_resumes_from_its_checkpoint(tmp_path, tiny_server, tiny_model_dir):
    run = Run(tmp_path, tiny_server.url, tiny_model_dir, "learner.max_steps=4")
    gen, learn = run.start("generate"), run.start("learn")
    # a published checkpoint, not a logged row: with sync.background a step's row comes
    # before its checkpoint (written by the worker while the next step trains)
    wait_until(lambda: _published_checkpoint(run.dir), 300, "checkpoint step-1")
    kill(learn)  # in step 2: reading, training, syncing or checkpointing
    learn = run.start("learn", "--resume")
    _finish(run, gen, learn)
    assert "resumed from" in log_tail(learn)
    steps = [m["step"] for m in run.metrics()]
    assert steps == [1, 2, 3, 4], steps
    batches = run.trained()
    _increasing(batches)
    if not run.drops():  # nothing refused: the batches are an uninterrupted run's
        assert batches == [[0, 1], [2, 3], [4, 5], [6, 7]]
    record("learner SIGKILLed mid-step", "resumed from its checkpoint; no batch twice",
           _exactly_once(run))  # fmt: skip


def test_a_checkpoint_missing_a_shard_falls_back_to_the_one_before(
    tmp_path, tiny_server, tiny_model_dir
):
    run = Run(
        tmp_path,
        tiny_server.url,
        tiny_model_dir,
        "learner.max_steps=2",
        "learner.keep_checkpoints=2",
    )  # the one before is kept only on request
    gen, learn = run.start("generate"), run.start("learn")
    _finish(run, gen, learn)
    (run.dir / "checkpoints" / "step-2" / "model" / "model.safetensors").unlink()
    learn = run.start("learn", "--resume", "learner.max_steps=3")
    gen = run.start("generate")
    _finish(run, gen, learn)
    said = log_tail(learn, 20000)
    assert "step-2 is incomplete (missing model/model.safetensors)" in said, said
    assert "at step 1" in said
    assert [m["step"] for m in run.metrics()] == [1, 2, 3]
    _increasing(run.trained())
    record("checkpoint folder missing a shard", "previous checkpoint used, and said so",
           _exactly_once(run))  # fmt: skip


def _tmpfs(path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)  # fmt: skip
    return out.returncode == 0


def _fill(path) -> None:
    """Take every free byte of the file system under `path`."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


def test_a_full_disk_stops_the_generator_cleanly(tmp_path, tiny_server, tiny_model_dir):
    disk = tmp_path / "small"
    if not _tmpfs(disk, "16m"):
        record("full disk during append", "SKIPPED: cannot mount a tmpfs here", None)
        pytest.skip("cannot mount a tmpfs (not root, or no mount namespace)")
    try:
        run = Run(tmp_path, tiny_server.url, tiny_model_dir, f"buffer.path={disk}/buffer",
                  "buffer.rollup_segments=0", "learner.max_steps=2")  # fmt: skip
        gen = run.start("generate", "generator.wait_for_learner=false",
                        "generator.max_ahead_batches=1000")  # fmt: skip
        wait_until(lambda: os.path.isdir(f"{disk}/buffer") and
                   sum(n.startswith("seg-") for n in os.listdir(f"{disk}/buffer")) >= 2
                   or gen.poll() is not None, 300, "two groups", poll=0.05)  # fmt: skip
        _fill(disk / "filler")
        assert run.wait(gen, 300) != 0
        assert "No space left on device" in log_tail(gen), log_tail(gen)
        r = open_reader(f"{disk}/buffer")
        n = r.num_groups()
        assert len(r.read_groups(0, n)) == n >= 2 and r.corrupt() == []  # published: whole
        (disk / "filler").unlink()  # space freed: the run continues where it stopped
        gen, learn = run.start("generate"), run.start("learn")
        _finish(run, gen, learn)
        record("full disk during append", f"generator stopped with ENOSPC after {n} groups; "
               "resumed once space was freed", _exactly_once(run))  # fmt: skip
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_at_a_checkpoint_stops_the_learner_and_keeps_the_last(
    tmp_path, tiny_server, tiny_model_dir
):
    """RUN/checkpoints on a file system with room for one checkpoint (~150 MB here): the
    second fails (one line); once space is freed, `learn --resume` continues from the
    first, and nothing is trained twice or lost."""
    disk = tmp_path / "ckpt-disk"
    if not _tmpfs(disk, "200m"):
        record("full disk during checkpoint", "SKIPPED: cannot mount a tmpfs here", None)
        pytest.skip("cannot mount a tmpfs (not root, or no mount namespace)")
    try:
        run = Run(tmp_path, tiny_server.url, tiny_model_dir, "learner.max_steps=3")
        (run.dir / "checkpoints").symlink_to(disk)
        gen, learn = run.start("generate"), run.start("learn")
        assert run.wait(learn, 400) != 0
        said = log_tail(learn)
        assert "step-2 could not be written" in said and "Traceback" not in said, said
        assert "MiB free" in said and "the last whole one is" in said, said
        assert sorted(p.name for p in disk.iterdir() if not p.name.endswith(".tmp")) == ["step-1"]
        mount = ["mount", "-o", "remount,size=600m", str(disk)]
        assert subprocess.run(mount).returncode == 0  # space freed
        learn = run.start("learn", "--resume")
        _finish(run, gen, learn)
        assert [m["step"] for m in run.metrics()] == [1, 2, 3]
        _increasing(run.trained())
        record("full disk during checkpoint", "learner stopped, naming the disk; resumed from "
               "step-1 once space was freed", _exactly_once(run))  # fmt: skip
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_learner_killed_mid_checkpoint_resumes_from_the_one_before(
    tmp_path, tiny_server, tiny_model_dir
):
    run = Run(tmp_path, tiny_server.url, tiny_model_dir, "learner.max_steps=4")
    gen, learn = run.start("generate"), run.start("learn")
    ckpts = run.dir / "checkpoints"
    writing = lambda: ckpts.is_dir() and any(p.suffix == ".tmp" for p in ckpts.iterdir())  # noqa: E731
    wait_until(lambda: writing() or learn.poll() is not None, 300, "a checkpoint being written",
               poll=0.002)  # fmt: skip
    kill(learn)  # while step-N.tmp is being written (or just after: then it is whole)
    half = sorted(p.name for p in ckpts.iterdir())
    learn = run.start("learn", "--resume")
    _finish(run, gen, learn)
    assert [m["step"] for m in run.metrics()] == [1, 2, 3, 4]
    assert not any(p.suffix == ".tmp" for p in ckpts.iterdir())  # the torn one was replaced
    _increasing(run.trained())
    torn = [n for n in half if n.endswith(".tmp")]
    whole = [n for n in half if not n.endswith(".tmp")] or ["none: from the start"]
    record("learner SIGKILLed mid-checkpoint",
           f"killed writing {', '.join(torn) or 'after it'}; resumed from {whole[-1]}",
           _exactly_once(run))  # fmt: skip


def _run_child(proc, *words: str):
    import psutil

    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if all(w in " ".join(p.cmdline()) for w in words):
                return p
        except psutil.NoSuchProcess:
            continue
    return None


def _versions(run_dir) -> set[str]:
    root = run_dir / "weights"
    return (
        {p.name for p in root.iterdir() if not p.name.endswith(".tmp")} if root.is_dir() else set()
    )


def test_server_killed_mid_request_and_mid_reload_nothing_lost(tmp_path, tiny_model_dir):
    """`run` with its own server: SIGKILL it while the generator's requests are in flight,
    then again as the learner publishes new weights (its reload); run's supervision
    (grpo_stream/run/supervise) restarts and re-syncs it, resumes the learner whose sync
    failed, and every prompt still ends exactly once."""
    from conftest import free_port

    run_dir = tmp_path / "run"
    argv = [*cli_run(), "--config", "configs/tiny.toml", f"run.run_dir={run_dir}",
            f"model.path={tiny_model_dir}", f"server.port={free_port()}",
            "server.startup_timeout_s=600", "learner.max_steps=5", "learner.checkpoint_every=1",
            "generator.retry_budget_s=900", "run.max_restarts=6"]  # fmt: skip
    out = open(tmp_path / "run.out", "w")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    alive = lambda: proc.poll() is None  # noqa: E731
    try:
        wait_until(lambda: steps_logged(run_dir) >= 1 or not alive(), 900, "step 1", poll=0.3)
        server = _run_child(proc, "vllm.entrypoints.openai.api_server")
        assert server is not None and alive(), (tmp_path / "run.out").read_text()[-3000:]
        server.kill()  # mid-request: the generator always has requests in flight
        at = steps_logged(run_dir)
        wait_until(lambda: steps_logged(run_dir) > at or not alive(), 900, "a step after it",
                   poll=0.3)  # fmt: skip
        seen = _versions(run_dir)
        wait_until(lambda: _versions(run_dir) - seen or not alive(), 600, "new weights",
                   poll=0.005)  # fmt: skip
        server = _run_child(proc, "vllm.entrypoints.openai.api_server")
        if server is not None:
            server.kill()  # mid-reload: the learner is pausing/reloading it right now
        code = proc.wait(900)
    finally:
        if proc.poll() is None:
            proc.kill()
    said = (tmp_path / "run.out").read_text()
    assert code == 0, said[-3000:]
    assert [m["step"] for m in read_jsonl(str(run_dir / "metrics.jsonl"))] == [1, 2, 3, 4, 5]
    restarts = [r for r in read_jsonl(str(run_dir / "supervisor.jsonl"))
                if r.get("event") == "restart"]  # fmt: skip
    led = run_ledger(str(run_dir))
    assert led.none == [] and led.multi == {} and led.duplicated_groups == 0, led
    assert "[run] ledger:" in said
    kinds = sorted({r["child"] for r in restarts})
    record("vLLM server SIGKILLed mid-request, then mid-reload (under run)",
           f"restarted {len(restarts)}x ({', '.join(kinds)}); run finished", led)  # fmt: skip


def cli_run() -> list[str]:
    import sys

    return [sys.executable, "-m", "grpo_stream.cli", "run"]
