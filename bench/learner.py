"""Benchmark: learner step throughput vs bare transformers, and disk weight-sync pause.

    python -m bench.learner                   # both parts; writes bench/results/learner.json
    python -m bench.learner --part step       # only (a);  --part sync: only (b)
    python -m bench.learner --samples 32      # the batch size (default: 32 on CUDA, 8 on CPU)

(a) tokens_per_s_vs_bare_fwd_bwd (goal >= 0.85). Model: SmolLM2-135M (prepared, float32).
Batch: synthetic groups of G = 8 completions (bench.synth; prompts ~40 and
completions ~24 tokens, random ids), μ = learner.epochs = 2, one optimizer step per epoch,
micro-batches of `micro_batch_size`. Both variants run the SAME schedule of passes over
the SAME padded micro-batches:

* grpo step: `StepRunner.run` as the learner calls it: collation, 1 no-grad proximal
  forward, then per epoch a forward + backward per micro-batch (chunked log-probs, GRPO
  loss with TIS, entropy and metrics), grad clipping, AdamW step, scheduler step;
* bare: 1 no-grad `model(input_ids, attention_mask)` forward, then per epoch
  `model(input_ids, attention_mask, labels).loss.backward()` per micro-batch (pads
  labelled -100), grad clipping, AdamW step.

tokens/s = non-pad tokens × μ / wall time of the whole schedule (the proximal pass is
inside the time of both, so it is counted fairly: as overhead on both sides). The
figure is grpo tokens/s ÷ bare tokens/s = bare time ÷ grpo time, median over `--reps`
alternating rounds after one small warm-up of each (AdamW state, thread pools).

(b) sync_pause_s (goal <= 2 s): one vLLM CPU server (services.vllm_server.VLLMServer,
port 8300, SmolLM2 from the cache) and `DiskSync.push` of the learner's model `--pushes`
times. The figure is the median time the server spends paused (pause → reload_weights →
update_weight_version → reset_prefix_cache → resume); writing the safetensors folder
happens before the pause and is reported as sync_save_s. After each push the server must
report the new /weight_info version.

The box is shared: the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from bench.synth import make_groups
from grpo_stream.config import Config, ModelConfig, ServerConfig, SyncConfig
from grpo_stream.learner.batch import make_micro_batches
from grpo_stream.learner.optim import build_optimizer
from grpo_stream.learner.policy import load_causal_lm, pick_device
from grpo_stream.learner.step import StepRunner, batch_advantages
from services.model import resolve_model_path

RESULTS = Path(__file__).resolve().parent / "results" / "learner.json"
GROUP_SIZE, PROMPT_LEN, COMPLETION_LEN, EPOCHS = 8, 40, 24, 2
PORT = 8300


def make_batch(n_samples: int, cfg: Config, start: int = 0):
    groups = make_groups(
        max(1, n_samples // GROUP_SIZE),
        start=start,
        group_size=GROUP_SIZE,
        prompt_len=PROMPT_LEN,
        completion_len=COMPLETION_LEN,
        with_text=False,
    )
    return batch_advantages(groups, cfg)[:2]  # samples, advantages


def run_grpo(runner: StepRunner, samples, advs) -> float:
    t0 = time.perf_counter()
    runner.run(samples, advs)
    return time.perf_counter() - t0


def run_bare(model, opt, mbs, epochs: int, max_grad_norm: float) -> float:
    """The same pass schedule in plain transformers (see the module docstring)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for mb in mbs:
            model(input_ids=mb.input_ids, attention_mask=mb.attention_mask)
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        for mb in mbs:
            labels = mb.input_ids.masked_fill(mb.attention_mask == 0, -100)  # [B, L]
            model(
                input_ids=mb.input_ids, attention_mask=mb.attention_mask, labels=labels
            ).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
    return time.perf_counter() - t0


def warm_up(runner: StepRunner, model, bare_opt, cfg: Config, device: torch.device) -> None:
    """One 2-sample round of each: AdamW state allocation, thread pools, first-call costs."""
    samples, advs = make_batch(GROUP_SIZE, cfg, start=100)
    samples, advs = samples[:2], advs[:2]
    run_grpo(runner, samples, advs)
    mbs = [m.to(device) for m in make_micro_batches(samples, advs, 16, 2, [0, 1])]
    run_bare(model, bare_opt, mbs, EPOCHS, cfg.learner.max_grad_norm)


def bench_step(n_samples: int, reps: int, device: torch.device) -> tuple[dict, dict]:
    cfg = Config()
    cfg.learner.epochs, cfg.learner.micro_batch_size, cfg.learner.lr = EPOCHS, 16, 1e-6
    model = load_causal_lm(str(resolve_model_path(ModelConfig())), device)
    opt, sched = build_optimizer(model, cfg.learner)
    bare_opt = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr, betas=cfg.learner.betas)
    runner = StepRunner(cfg, model, None, opt, sched, device, pad_id=2)
    samples, advs = make_batch(n_samples, cfg)
    order = list(range(len(samples)))
    mbs = [m.to(device) for m in make_micro_batches(samples, advs, 16, 2, order)]
    tokens = sum(int(m.attention_mask.sum()) for m in mbs)
    warm_up(runner, model, bare_opt, cfg, device)
    times: dict[str, list[float]] = {"grpo": [], "bare": []}
    for r in range(reps):
        for name in ("grpo", "bare") if r % 2 == 0 else ("bare", "grpo"):
            if name == "grpo":
                times[name].append(run_grpo(runner, samples, advs))
            else:
                times[name].append(
                    run_bare(model, bare_opt, mbs, EPOCHS, cfg.learner.max_grad_norm)
                )
            print(f"  {name:5s} round {r}: {times[name][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: tokens * EPOCHS / med[k] for k in med}
    ratio = tps["grpo"] / tps["bare"]
    fig = figure("tokens_per_s_vs_bare_fwd_bwd", ratio, "x", ">=", 0.85)
    detail = {
        "samples": len(samples),
        "tokens": tokens,
        "micro_batches": len(mbs),
        "epochs": EPOCHS,
        "reps": reps,
        "seconds": times,
        "tokens_per_s": tps,
    }
    return fig, detail


def _weight_version(url: str) -> str:
    with urllib.request.urlopen(f"{url}/weight_info", timeout=10) as r:  # noqa: S310
        return str(json.loads(r.read())["weight_version"])


def bench_sync(pushes: int) -> tuple[dict, dict]:
    from grpo_stream.sync.disk import DiskSync
    from services.vllm_server import VLLMServer

    model_dir = resolve_model_path(ModelConfig())
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        scfg = ServerConfig(port=PORT, max_model_len=512)
        server = VLLMServer(model_dir, "policy", PORT, scfg, Path(tmp) / "vllm.log")
        with server:
            startup = server.wait_healthy()
            print(f"  vLLM server up in {startup:.0f} s", flush=True)
            model = load_causal_lm(str(model_dir), torch.device("cpu"), trainable=False)
            sync = DiskSync(SyncConfig(), [server.url], Path(tmp) / "weights")
            rows = []
            for v in range(1, pushes + 1):
                rows.append(sync.push(model, v))
                if _weight_version(server.url) != str(v):
                    raise RuntimeError(f"server did not take version {v}")
                print(
                    f"  push v{v}: pause {rows[-1]['sync_pause_s']:.2f} s, "
                    f"save {rows[-1]['sync_save_s']:.2f} s",
                    flush=True,
                )
    pause = [r["sync_pause_s"] for r in rows]
    fig = figure("sync_pause_s", statistics.median(pause), "s", "<=", 2.0)
    detail = {
        "pushes": pushes,
        "pause_s": pause,
        "save_s": [r["sync_save_s"] for r in rows],
        "total_s": [r["sync_s"] for r in rows],
        "server_startup_s": startup,
        "pause_mode": SyncConfig().pause_mode,
        "max_pause_s": max(pause),
    }
    return fig, detail


def figure(name: str, value: float, unit: str, op: str, goal: float) -> dict:
    ok = value >= goal if op == ">=" else value <= goal
    return {"name": name, "value": round(value, 4), "unit": unit, "op": op, "goal": goal, "ok": ok}


def machine(device: torch.device) -> str:
    base = f"{platform.machine()} {os.cpu_count()} cpus, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        base += f", {torch.cuda.get_device_name(device)}"
    return f"{base}, torch {torch.__version__}"


def merge_results(new: dict) -> dict:
    """Keep the figures (and their config) of the part not run this time (--part)."""
    try:
        old = json.loads(RESULTS.read_text())
    except (OSError, json.JSONDecodeError):
        return new
    names = {f["name"] for f in new["figures"]}
    kept = [f for f in old.get("figures", []) if f["name"] not in names]
    config = {**old.get("config", {}), **new["config"]}
    return {**new, "figures": kept + new["figures"], "config": config}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.learner", description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["step", "sync", "all"], default="all")
    p.add_argument("--samples", type=int, default=None, help="default: 32 on CUDA, 8 on CPU")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--pushes", type=int, default=3)
    args = p.parse_args(argv)
    device = pick_device("auto")
    n = args.samples or (32 if device.type == "cuda" else 8)
    load = {"before": os.getloadavg()}
    figures, config = [], {"device": device.type, "model": "SmolLM2-135M-Instruct float32"}
    parts = {
        "step": lambda: bench_step(n, args.reps, device),
        "sync": lambda: bench_sync(args.pushes),
    }
    for name, run in parts.items():
        if args.part in (name, "all"):
            before = os.getloadavg()
            fig, config[name] = run()
            config[name]["load_average_1_5_15"] = {"before": before, "after": os.getloadavg()}
            figures.append(fig)
    load["after"] = os.getloadavg()
    out = merge_results({"figures": figures, "machine": machine(device), "config": config})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'figure':32s} {'value':>10s} {'goal':>10s}  ok")
    for f in figures:
        print(f"{f['name']:32s} {f['value']:>10.4f} {f['op']:>3s}{f['goal']:>7}  {f['ok']}")
    print(f"load average (1, 5, 15 min): before {load['before']}, after {load['after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
