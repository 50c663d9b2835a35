"""Benchmark: the learner's time in weight sync and checkpoints, synchronous against
`sync.background`, side by side in one run.

    python -m bench.sync_overlap               # -> bench/results/sync_overlap.json
    python -m bench.sync_overlap --steps 12 --rounds 2

One vLLM CPU server (grpo_stream.serving.server.VLLMServer, port 8301, the demo's model
as the disk transport serves it) and the real learner (`Learner(cfg, ...).run()`) with
configs/cpu.toml's settings (SmolLM2-135M, 4 groups of G = 8, μ = 2, disk sync every
step, a checkpoint every `--every` steps and at the last, no AdamW state in the last),
once with `sync.background = false` and once with `true`, alternating for `--rounds`
rounds, each over `--steps` steps from a fresh run folder. The batches are the demo's
chat-templated arithmetic prompts with random completions of 4..16 tokens, all written
to the buffer before the learner starts (no generator runs: the server is idle when
paused, and the learner never waits for data).

Per mode, from each run's metrics.jsonl: the seconds per step the learner spent in
`sync_s + checkpoint_s` (what it waited for the push and the checkpoint), `gather_s`
(the weights copied for the background writer, or nothing), `eval_wait_s`, and the
worker's own `sync_bg_s` / `checkpoint_bg_s`, against `step_s`. Figures:
sync_checkpoint_share_background = (sync_s + checkpoint_s) / step_s with the background
writer (goal <= 0.08, issue 25's budget for the demo); background_vs_sync_wait_ratio =
(sync_s + checkpoint_s + gather_s) per step, background / synchronous (goal <= 0.5);
background_vs_sync_step_ratio = mean step_s, background / synchronous (goal <= 1.0: the
worker's writes must not slow training more than they save).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.figures import figure, write_result
from grpo_stream.buffer.schema import Sample
from grpo_stream.buffer.store import open_writer
from grpo_stream.config import ServerConfig, load_config
from grpo_stream.core import jsonl
from grpo_stream.core import metric_names as M
from grpo_stream.serving.model import resolve_model_path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "sync_overlap.json"
PORT, GROUP_SIZE = 8301, 8
KEYS = (M.SYNC_S, M.CHECKPOINT_S, M.GATHER_S, M.EVAL_WAIT_S, M.SYNC_BG_S, M.CHECKPOINT_BG_S)


def write_groups(buffer: Path, prompts: list[list[int]], n: int, seed: int = 0) -> None:
    """`n` groups of the demo's prompts (cycled), random completions of 4..16 tokens."""
    rng = random.Random(seed)
    groups = []
    for g in range(n):
        prompt = prompts[g % len(prompts)]
        group = []
        for k in range(GROUP_SIZE):
            c = rng.randint(4, 16)
            group.append(Sample(
                run_id="bench", prompt_id=f"q{g}", sample_index=k, policy_version=0,
                prompt_ids=list(prompt), completion_ids=[rng.randrange(3, 49152) for _ in range(c)],
                behaviour_logprobs=[-rng.uniform(0.1, 3.0) for _ in range(c)],
                reward=float(k % 2), row_id=g * GROUP_SIZE + k,
            ))  # fmt: skip
        groups.append(group)
    w = open_writer(str(buffer), backend="arrow", run_id="bench", fsync=False)
    w.append_groups(groups)
    w.close()


def run_learner(url: str, model_dir: Path, prompts, tmp: Path, name: str, background: bool,
                steps: int, every: int) -> list[dict]:  # fmt: skip
    """One learner run of `steps` steps; its metrics rows."""
    from grpo_stream.learner.loop import Learner

    cfg = load_config(ROOT / "configs" / "cpu.toml")
    run = tmp / name
    run.mkdir()
    cfg.run.run_dir, cfg.model.path = str(run), str(model_dir)
    cfg.server.urls = [url]
    cfg.sync.background = background
    cfg.eval.every = 0  # no evaluator runs here: nothing to wait for
    lc = cfg.learner
    lc.max_steps, lc.checkpoint_every, lc.max_staleness = steps, every, 10**6
    write_groups(Path(cfg.buffer_path(str(run))), prompts, steps * lc.batch_groups)
    (run / "config.toml").write_text(cfg.to_toml())
    Learner(cfg, str(run), str(model_dir)).run()
    gc.collect()  # the learner's model and optimizer (held in cycles) go before the next run
    return jsonl.read(run / "metrics.jsonl")


def per_step(rows: list[dict]) -> dict:
    out = {k: statistics.mean(float(r.get(k) or 0.0) for r in rows) for k in KEYS}
    out[M.STEP_S] = statistics.mean(float(r[M.STEP_S]) for r in rows)
    out[M.TRAIN_S] = statistics.mean(float(r[M.TRAIN_S]) for r in rows)
    return out


def summarise(runs: dict[str, list[list[dict]]]) -> tuple[list[dict], dict]:
    modes = {m: per_step([r for rows in rs for r in rows]) for m, rs in runs.items()}
    s, b = modes["sync"], modes["background"]
    share = (b[M.SYNC_S] + b[M.CHECKPOINT_S]) / b[M.STEP_S]
    waited = {m: v[M.SYNC_S] + v[M.CHECKPOINT_S] + v[M.GATHER_S] for m, v in modes.items()}
    figs = [
        figure("sync_checkpoint_share_background", share, "fraction", "<=", 0.08),
        figure(
            "background_vs_sync_wait_ratio", waited["background"] / waited["sync"], "x", "<=", 0.5
        ),  # fmt: skip
        figure("background_vs_sync_step_ratio", b[M.STEP_S] / s[M.STEP_S], "x", "<=", 1.0),
    ]
    detail = {
        "per_step_mean_s": modes,
        "sync_checkpoint_share": {
            m: (v[M.SYNC_S] + v[M.CHECKPOINT_S]) / v[M.STEP_S] for m, v in modes.items()
        },
        "rows": {
            m: [[{k: r.get(k) for k in (M.STEP, M.STEP_S, *KEYS)} for r in rows] for rows in rs]
            for m, rs in runs.items()
        },  # fmt: skip
    }
    return figs, detail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--every", type=int, default=4, help="learner.checkpoint_every")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args(argv)
    from bench.learner import demo_prompts
    from grpo_stream.serving.server import VLLMServer

    cfg = load_config(ROOT / "configs" / "cpu.toml")
    model_dir = resolve_model_path(cfg.model, "disk")  # the untied copy disk sync serves
    prompts = demo_prompts(16, model_dir)
    runs: dict[str, list[list[dict]]] = {"sync": [], "background": []}
    with tempfile.TemporaryDirectory(prefix="bench-overlap-") as tmp:
        scfg = ServerConfig(port=PORT, max_model_len=512, startup_timeout_s=900)  # a busy box
        server = VLLMServer(model_dir, cfg.model.served_name, PORT, scfg, Path(tmp) / "vllm.log")
        with server:
            startup = server.wait_healthy()
            print(f"  vLLM server up in {startup:.0f} s", flush=True)
            for r in range(args.rounds):
                order = ("sync", "background") if r % 2 == 0 else ("background", "sync")
                for mode in order:
                    t0 = time.perf_counter()
                    rows = run_learner(server.url, model_dir, prompts, Path(tmp), f"{mode}-{r}",
                                       mode == "background", args.steps, args.every)  # fmt: skip
                    runs[mode].append(rows)
                    v = per_step(rows)
                    print(f"  {mode:10s} round {r}: {time.perf_counter() - t0:.0f} s, per step "
                          f"step {v[M.STEP_S]:.2f} sync {v[M.SYNC_S]:.2f} checkpoint "
                          f"{v[M.CHECKPOINT_S]:.2f} gather {v[M.GATHER_S]:.2f} (background: "
                          f"sync {v[M.SYNC_BG_S]:.2f} checkpoint {v[M.CHECKPOINT_BG_S]:.2f})",
                          flush=True)  # fmt: skip
    figs, detail = summarise(runs)
    config = {"steps": args.steps, "checkpoint_every": args.every, "rounds": args.rounds,
              "server_startup_s": startup, "model": str(model_dir)} | detail  # fmt: skip
    write_result(OUT, figs, config)
    for f in figs:
        print(f"  {f['name']}: {f['value']} {f['unit']} (goal {f['op']} {f['goal']}: "
              f"{'ok' if f['ok'] else 'NOT MET'})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
