"""bench/sim_servers.py's pauses follow vLLM 0.32's `/pause` modes: wait drains the
running requests before the reload (and holds new ones), keep freezes them and they
finish on the new weights (a partial rollout: the first tokens old, the rest new),
abort cuts them with what they decoded; and driven by the real generator, each mode
leaves the trained samples it should (bench/sim_pause.py's counts)."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import pytest

from bench.sim_pause import figures, pause_row, summary
from bench.sim_servers import TOKEN_BASE, SimParams, SimServers, decode_tokens
from bench.simulate import point_config, simulate_point

# one request of 100 tokens: 0.1 s prefill + 100 * 0.01 s = 1.1 simulated s (0.22 s real)
P = SimParams(len_mu=math.log(100.5), len_sigma=0.0, max_tokens=200, tpot_s=0.01,
              prefill_s=0.1, sync_s=0.5, scale=0.2)  # fmt: skip
URL = "http://sim-0:8000"


def _versions(c) -> list[int]:
    return [t - TOKEN_BASE for t in c.token_ids]


async def _one_sync(mode: str, sync_at: float, late: bool = False):
    """A request at t=0, a sync to version 1 at `sync_at` (simulated s), optionally a
    second request sent while paused; (first completions, sync wait, second, end times)."""
    servers = SimServers([URL], P, seed=0, pause_mode=mode)
    async with servers:
        t0 = time.monotonic()

        async def timed():
            outs = await servers.complete(URL, "m", [1], 2, {})
            return outs, (time.monotonic() - t0) / P.scale

        first = asyncio.create_task(timed())
        await asyncio.sleep(sync_at * P.scale)
        sync = asyncio.create_task(asyncio.to_thread(servers.sync, 1))
        second = None
        if late:
            await asyncio.sleep(0.1 * P.scale)  # the pause has begun
            second = asyncio.create_task(timed())
        waited = await sync
        return await first, waited, (await second if second else None)


def test_decode_tokens_splits_a_sample_at_the_version_change() -> None:
    segments = [(0, 0.0, 0.3), (1, 0.3, 1.1)]  # version 0 until 0.3 s, then version 1
    ids = decode_tokens(segments, 1.1, 100, P)
    assert [t - TOKEN_BASE for t in ids] == [0] * 20 + [1] * 80  # token j at 0.1+(j+1)0.01
    cut = decode_tokens(segments[:1], 0.3, 100, P)  # aborted at 0.3 s
    assert [t - TOKEN_BASE for t in cut] == [0] * 20
    assert decode_tokens([(0, 0.0, 0.05)], 0.05, 100, P) == []  # cut in the prefill


def test_wait_drains_running_requests_then_holds_new_ones() -> None:
    (outs, end), waited, (late, late_end) = asyncio.run(_one_sync("wait", 0.3, late=True))
    assert [len(c.token_ids) for c in outs] == [100, 100]
    assert all(set(_versions(c)) == {0} for c in outs)  # finished on the old weights
    assert [c.finish_reason for c in outs] == ["length", "length"] and outs[0].text == "42"
    # the sync held for the rest of the running request (0.8 s) and the reload (0.5 s)
    assert 1.2 <= waited <= 2.5 and end <= 0.3 + waited
    # the request sent during the pause ran only after the resume, on version 1
    assert all(set(_versions(c)) == {1} for c in late)
    assert late_end >= 0.3 + waited + 1.0


def test_keep_freezes_running_requests_and_finishes_them_on_new_weights() -> None:
    (outs, end), waited, _ = asyncio.run(_one_sync("keep", 0.3))
    assert 0.45 <= waited <= 0.9  # only the reload: no drain
    for c in outs:
        v = _versions(c)
        assert len(v) == 100 and c.finish_reason == "length"
        old = v.count(0)
        assert 10 <= old <= 40  # decoded before the freeze at 0.3 s: ~20 tokens
        assert v == [0] * old + [1] * (100 - old)  # the rest sampled by version 1
    assert end >= 1.1 + 0.5 - 0.05  # frozen for the reload's 0.5 s


def test_abort_ends_running_requests_with_their_partial_outputs() -> None:
    (outs, end), waited, _ = asyncio.run(_one_sync("abort", 0.3))
    assert 0.45 <= waited <= 0.9
    assert end <= 0.3 + 0.3  # cut at the pause, not at its 1.1 s
    for c in outs:
        assert c.finish_reason == "abort" and c.text == ""  # no final answer reached
        assert 10 <= len(c.token_ids) <= 40 and set(_versions(c)) == {0}
        assert len(c.logprobs) == len(c.token_ids)


def test_unknown_pause_mode_is_named() -> None:
    with pytest.raises(ValueError, match="sync.pause_mode"):
        SimServers([URL], P, seed=0, pause_mode="drain")


def test_summary_means_over_seeds_and_the_figures_compare_keep_with_wait() -> None:
    def row(seed, mode, sps, wait_s, mixed, cut):
        return {"seed": seed, "pause_mode": mode, "samples_per_s": sps, "sync_wait_s": wait_s,
                "mixed_token_share": mixed, "abort_cut_share": cut}  # fmt: skip

    rows = [row(0, "wait", 1.0, 40.0, 0.0, 0.0), row(1, "wait", 3.0, 20.0, 0.0, 0.0),
            row(0, "keep", 4.0, 2.0, 0.3, 0.0), row(1, "keep", 4.0, 1.0, 0.5, 0.0),
            row(0, "abort", 3.0, 1.0, 0.0, 0.02), row(1, "abort", 3.0, 1.0, 0.0, 0.0)]  # fmt: skip
    means = summary(rows)
    assert [m["pause_mode"] for m in means] == ["wait", "keep", "abort"]
    assert means[0]["samples_per_s"] == 2.0 and means[0]["sync_wait_s"] == 30.0
    assert (means[0]["samples_per_s_min"], means[0]["samples_per_s_max"]) == (1.0, 3.0)
    figs = {f["name"]: f for f in figures(means)}
    assert figs["sim_keep_vs_wait_throughput"]["value"] == 2.0  # 4.0 / 2.0
    assert figs["sim_keep_vs_wait_sync_wait_ratio"]["value"] == 0.05  # 1.5 / 30
    assert figs["sim_keep_mixed_token_share"]["value"] == 0.4
    assert not figs["sim_keep_mixed_token_share"]["ok"]  # goal <= 0.10
    assert figs["sim_abort_cut_sample_share"]["value"] == 0.01


FAST = SimParams(len_mu=3.5, len_sigma=0.8, max_tokens=96, tpot_s=0.01, prefill_s=0.1,
                 train_s_per_token=1e-3, sync_s=0.2, scale=0.05)  # fmt: skip


@pytest.mark.parametrize("mode", ["wait", "keep", "abort"])
def test_the_real_generator_under_each_pause_mode(mode: str, tiny_model_dir: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    cfg = point_config(str(tmp_path), 1, 1, 4, FAST, batch_groups=2, group_size=4)
    cfg.sync.pause_mode = mode
    o = simulate_point(cfg, FAST, str(tiny_model_dir))
    row = pause_row(mode, o)
    # a group past the staleness bound is dropped from its batch (learner/source.py)
    assert o.steps == 4 and o.samples + 4 * o.stale_dropped == 4 * 2 * 4
    assert o.sync_wait_s >= 4 * FAST.sync_s * 0.9  # each of the 4 syncs reloads
    if mode == "wait":  # drained: nothing mixed, nothing cut
        assert o.mixed_tokens == 0 and o.aborted_samples == 0
    if mode == "keep":  # nothing cut; mixed tokens only in samples whose bracket spans
        assert o.aborted_samples == 0
        assert o.mixed_tokens == 0 or o.spanning_samples > 0
    if mode == "abort":  # cut samples are trained as they are; none mixes versions
        assert o.mixed_tokens == 0
    assert 0.0 <= row["mixed_token_share"] < 1.0 and row["samples_per_s"] > 0
