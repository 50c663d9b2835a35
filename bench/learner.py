"""Benchmark: the learner step (shared-prefix vs padded vs bare transformers), and the
disk weight-sync pause.

    python -m bench.learner                   # step + passes + sync -> results/learner.json
    python -m bench.learner --part step       # only (a);  --part sync: (b); passes: (d)
    python -m bench.learner --part sweep      # (c): the shared-prefix threshold for "auto"
    python -m bench.learner --groups 4        # groups of G = 8 per step (default: the demo's 4)
    python -m bench.learner --threads 1       # torch threads (default: torch's; results/learner.json: 2)

(a) The demo's real shapes, side by side in one run. Model: SmolLM2-135M (prepared,
float32). Batch: `--groups` groups of G = 8: the demo's chat-templated arithmetic prompts
(configs/cpu.toml's task through SmolLM2's tokenizer: 44 tokens), completions of random
ids, 4..16 tokens (~10, the demo's max_tokens is 16), μ = 2 epochs, one optimizer step per
epoch, micro_batch_size 32 (configs/cpu.toml: the whole batch in one micro-batch). Three
variants run the same schedule of passes:

* shared: `StepRunner.run` with learner.shared_prefix = true (what "auto" picks here):
  collation, then per epoch forward + backward (fused GRPO loss with TIS, entropy,
  metrics), grad clipping, AdamW step, scheduler step; each pass is ONE forward of the
  4 groups packed into rows (the prompt, then its 8 completions; `learner.batch.
  PackedRows`, the grouped attention mask), learner.pack_mask_mib = 64;
* cached: the same on the prompts' KV cache (learner.pack_mask_mib = 0: one prompt pass,
  then the completions in up to 4 passes of similar length), reported as detail;
* padded: the same with learner.shared_prefix = false (every row re-encodes its prompt);
* bare: per epoch `model(input_ids, attention_mask, labels).loss.backward()` on the
  padded micro-batches (pads labelled -100), grad clipping, AdamW step. No no-grad pass:
  shared and padded run none either here (one optimizer step per epoch, so pi_old is
  epoch 1's own forward, `learner.step`).

Figures: shared_prefix_speedup = padded time / shared time (goal >= 2.5);
tokens_per_s_vs_bare_fwd_bwd = bare time / shared time, i.e. tokens/s on the same padded
token count (goal >= 2.0); shared_prefix_peak_memory_ratio = the peak memory growth of a
shared step / a padded one (goal <= 0.6), measured as bench/gpu_smoke.py does: the
process's peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the
step, after a warm-up (AdamW state exists; gradients are freed between steps), the
smaller (shared) first. Times: median over `--reps` rounds in rotating order after one
warm-up of each.

(d) passes (`--part passes`): the demo's prompts with long-tailed completions (in each
group, 4 samples of 4 tokens and 4 of 64), shared prefix on the KV cache with
`learner.completion_passes` = 4 (default: the short and the long completions run in
separate passes) against 1 (one pass, every row padded to 64):
completion_passes_speedup (goal >= 1.2). The packed groups' time on the same batch is
recorded beside them.

(c) sweep: the same step on 1 group with prompts of 2..16 tokens, padded / shared time
against the share of tokens the shared layout skips (`learner.plan.shared_prefix_saving`):
the break-even sets `learner.plan.AUTO_MIN_SAVED`. Recorded in config["sweep"].

(b) sync_pause_s (goal <= 2 s): one vLLM CPU server (grpo_stream.serving.server.VLLMServer,
port 8300, SmolLM2 from the cache) and `DiskSync.push` of the learner's model `--pushes`
times. The figure is the median time the server spends paused (pause → reload_weights →
update_weight_version → reset_prefix_cache → resume); writing the safetensors folder
happens before the pause and is reported as sync_save_s. After each push the server must
report the new /weight_info version.

The box is shared: the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from grpo_stream.buffer.schema import Sample
from grpo_stream.config import Config, ModelConfig, ServerConfig, SyncConfig, load_config
from grpo_stream.learner.batch import make_micro_batches
from grpo_stream.learner.optim import build_optimizer
from grpo_stream.learner.plan import shared_prefix_saving
from grpo_stream.learner.policy import load_causal_lm, pick_device
from grpo_stream.learner.step import StepRunner, batch_advantages
from grpo_stream.serving.model import resolve_model_path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "learner.json"
GROUP_SIZE, EPOCHS, MICRO_BATCH, COMPLETION_LENS = 8, 2, 32, (4, 16)
PORT = 8300
SWEEP_PROMPT_TOKENS = (1, 2, 6, 16)
LONG_TAIL = [4, 64]  # (d): completion tokens of the even and the odd samples of a group


def demo_prompts(n: int, model_dir: Path) -> list[list[int]]:
    """The first `n` prompts of the demo's task, chat-templated and tokenized as served."""
    import itertools

    from transformers import AutoTokenizer

    from grpo_stream.tasks.prompt import render_prompt
    from grpo_stream.tasks.sources import arithmetic_prompts

    task = load_config(ROOT / "configs" / "cpu.toml").task
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = itertools.islice(arithmetic_prompts(task), n)
    return [render_prompt(p, tok, task)[1] for p in prompts]


def make_batch(prompts: list[list[int]], cfg: Config, seed: int = 0):
    """G completions of random ids per prompt; (samples, advantages)."""
    rng = random.Random(seed)
    groups = []
    for g, prompt in enumerate(prompts):
        group = []
        for k in range(GROUP_SIZE):
            c = rng.randint(*COMPLETION_LENS)
            group.append(Sample(
                run_id="bench", prompt_id=f"q{seed}-{g}", sample_index=k, policy_version=0,
                prompt_ids=list(prompt), completion_ids=[rng.randrange(3, 49152) for _ in range(c)],
                behaviour_logprobs=[-rng.uniform(0.1, 3.0) for _ in range(c)],
                reward=float(rng.random() < 0.5), row_id=g * GROUP_SIZE + k,
            ))  # fmt: skip
        group[0].reward, group[1].reward = 0.0, 1.0  # every group has an advantage
        groups.append(group)
    return batch_advantages(groups, cfg)[:2]


def run_bare(model, opt, mbs, epochs: int, max_grad_norm: float) -> float:
    """The same pass schedule in plain transformers (see the module docstring)."""
    t0 = time.perf_counter()
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        for mb in mbs:
            labels = mb.input_ids.masked_fill(mb.attention_mask == 0, -100)  # [B, L]
            model(
                input_ids=mb.input_ids, attention_mask=mb.attention_mask, labels=labels
            ).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_bytes(fn, device: torch.device) -> int:
    """Peak memory growth while `fn()` runs (CUDA allocator, or the process's peak RSS)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    fn()
    return (_rss_kib("VmHWM") - before) * 1024


class Variants:
    """The step's three variants on one model (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.model_dir = resolve_model_path(ModelConfig())
        self.model = load_causal_lm(str(self.model_dir), device)
        self.cfg, self.runners = {}, {}
        opt = sched = None  # one AdamW for every variant: its state is 2x the model
        for name, shared, passes, pack_mib in (
            ("shared", True, 4, 64.0),
            ("cached", True, 4, 0.0),
            ("padded", False, 4, 64.0),
            ("one_pass", True, 1, 0.0),
        ):
            cfg = Config()
            lc = cfg.learner
            lc.epochs, lc.micro_batch_size, lc.lr = EPOCHS, MICRO_BATCH, 1e-6
            lc.shared_prefix, lc.completion_passes, lc.pack_mask_mib = shared, passes, pack_mib
            if opt is None:
                opt, sched = build_optimizer(self.model, lc)
            self.cfg[name] = cfg
            self.runners[name] = StepRunner(cfg, self.model, None, opt, sched, device, pad_id=2)
        self.bare_opt = opt

    def __call__(self, name: str, samples, advs) -> float:
        if name == "bare":
            idx = list(range(len(samples)))
            mbs = make_micro_batches(samples, advs, MICRO_BATCH, 2, idx)
            mbs = [m.to(self.device) for m in mbs]
            return run_bare(self.model, self.bare_opt, mbs, EPOCHS, 1.0)
        t0 = time.perf_counter()
        self.runners[name].run(samples, advs)
        return time.perf_counter() - t0


def time_rounds(run, names, samples, advs, reps: int, label: str = "") -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(run(name, samples, advs))
            print(f"  {label}{name:6s} round {r}: {times[name][-1]:.2f} s", flush=True)
    return times


def bench_step(n_groups: int, reps: int, device: torch.device) -> tuple[list[dict], dict]:
    run = Variants(device)
    prompts = demo_prompts(n_groups + 1, run.model_dir)
    samples, advs = make_batch(prompts[:n_groups], run.cfg["padded"])
    warm = make_batch(prompts[n_groups:], run.cfg["padded"], seed=1)
    for name in ("shared", "cached", "padded", "bare"):  # AdamW state, threads, first calls
        run(name, *warm)
    peaks = {k: peak_bytes(lambda k=k: run(k, samples, advs), device) for k in ("shared", "padded")}
    times = time_rounds(run, ["shared", "cached", "padded", "bare"], samples, advs, reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    mbs = make_micro_batches(samples, advs, MICRO_BATCH, 2, list(range(len(samples))))
    tokens = sum(int(m.attention_mask.sum()) for m in mbs)
    padded_tokens = sum(int(m.attention_mask.numel()) for m in mbs)
    figures = [
        figure("shared_prefix_speedup", med["padded"] / med["shared"], "x", ">=", 2.5),
        figure(
            "shared_prefix_peak_memory_ratio", peaks["shared"] / peaks["padded"], "x", "<=", 0.6
        ),
        figure("tokens_per_s_vs_bare_fwd_bwd", med["bare"] / med["shared"], "x", ">=", 2.0),
    ]
    detail = {
        "groups": n_groups, "group_size": GROUP_SIZE, "samples": len(samples),
        "prompt_tokens": sorted({len(p) for p in prompts[:n_groups]}),
        "completion_tokens": [len(s.completion_ids) for s in samples],
        "tokens": tokens, "padded_tokens": padded_tokens, "micro_batches": len(mbs),
        "epochs": EPOCHS, "reps": reps, "seconds": times,
        "peak_memory_mib": {k: v / 2**20 for k, v in peaks.items()},
        "tokens_per_s": {k: tokens * EPOCHS / med[k] for k in med},
        "padded_vs_bare_fwd_bwd": med["bare"] / med["padded"],
        "cached_prefix_speedup": med["padded"] / med["cached"],
        "shared_prefix_saving": shared_prefix_saving(samples),
    }  # fmt: skip
    return figures, detail


def bench_sweep(reps: int, device: torch.device) -> tuple[list[dict], dict]:
    """Padded / shared step time against the tokens the shared layout skips (1 group)."""
    run = Variants(device)
    demo = demo_prompts(1, run.model_dir)
    rows = []
    for name in ("shared", "padded"):  # warm-up
        run(name, *make_batch(demo, run.cfg["padded"], seed=9))
    for plen in SWEEP_PROMPT_TOKENS:
        prompts = [p[-plen:] for p in demo]  # the prompt's tail
        samples, advs = make_batch(prompts, run.cfg["padded"])
        cpu0 = time.process_time()
        times = time_rounds(run, ["shared", "padded"], samples, advs, reps, f"P={plen:2d} ")
        med = {k: statistics.median(v) for k, v in times.items()}
        saved = shared_prefix_saving(samples)
        rows.append({"prompt_tokens": plen, "saving": round(saved, 4),
                     "speedup": round(med["padded"] / med["shared"], 4), "seconds": times,
                     "cpu_s": time.process_time() - cpu0})  # fmt: skip
        print(f"  P={plen:2d}: saving {saved:.3f}, speedup {rows[-1]['speedup']:.2f}", flush=True)
    return [], {"groups": 1, "group_size": GROUP_SIZE, "reps": reps, "rows": rows}


def bench_passes(n_groups: int, reps: int, device: torch.device) -> tuple[list[dict], dict]:
    """(d) The demo's prompts with long-tailed completions (half of each group 4 tokens,
    half 64): the KV-cache path with up to 4 completion passes (default) / with one."""
    run = Variants(device)
    prompts = demo_prompts(n_groups, run.model_dir)
    samples, advs = make_batch(prompts, run.cfg["padded"])
    samples = [
        dataclasses.replace(s, completion_ids=(list(s.completion_ids) * 64)[:n],
                            behaviour_logprobs=[-1.0] * n)
        for i, s in enumerate(samples) for n in [LONG_TAIL[i % 2]]
    ]  # fmt: skip
    names = ["cached", "one_pass", "shared"]
    for name in names:  # warm-up
        run(name, samples, advs)
    times = time_rounds(run, names, samples, advs, reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = med["one_pass"] / med["cached"]
    detail = {"groups": n_groups, "completion_tokens": LONG_TAIL, "reps": reps, "seconds": times,
              "packed_vs_cached": med["cached"] / med["shared"]}  # fmt: skip
    return [figure("completion_passes_speedup", speedup, "x", ">=", 1.2)], detail


def _weight_version(url: str) -> str:
    with urllib.request.urlopen(f"{url}/weight_info", timeout=10) as r:  # noqa: S310
        return str(json.loads(r.read())["weight_version"])


def bench_sync(pushes: int) -> tuple[dict, dict]:
    from grpo_stream.serving.server import VLLMServer
    from grpo_stream.sync.disk import DiskSync

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
    return [fig], detail


def figure(name: str, value: float, unit: str, op: str, goal: float) -> dict:
    ok = value >= goal if op == ">=" else value <= goal
    return {"name": name, "value": round(value, 4), "unit": unit, "op": op, "goal": goal, "ok": ok}


def machine(device: torch.device) -> str:
    base = f"{platform.machine()} {os.cpu_count()} cpus, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        base += f", {torch.cuda.get_device_name(device)}"
    return f"{base}, torch {torch.__version__}"


def merge_results(new: dict) -> dict:
    """Keep the figures (and their config) of the parts not run this time (--part, and
    bench/lora.py's `lora_*` figures, which it merges into this file)."""
    try:
        old = json.loads(RESULTS.read_text())
    except (OSError, json.JSONDecodeError):
        return new
    names = {f["name"] for f in new["figures"]}
    kept = [f for f in old.get("figures", []) if f["name"] not in names]
    config = {**old.get("config", {}), **new["config"]}
    return {**old, **new, "figures": kept + new["figures"], "config": config}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.learner", description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["step", "passes", "sync", "sweep", "all"], default="all")
    p.add_argument("--groups", type=int, default=4, help="groups of 8 per step (demo: 4)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--pushes", type=int, default=3)
    args = p.parse_args(argv)
    if args.threads:  # on a box shared with other jobs, 1 thread avoids OpenMP barrier stalls
        torch.set_num_threads(args.threads)
    device = pick_device("auto")
    load = {"before": os.getloadavg()}
    figures, config = [], {"device": device.type, "model": "SmolLM2-135M-Instruct float32"}
    parts = {
        "step": lambda: bench_step(args.groups, args.reps, device),
        "passes": lambda: bench_passes(args.groups, args.reps, device),
        "sync": lambda: bench_sync(args.pushes),
        "sweep": lambda: bench_sweep(args.reps, device),
    }
    for name, run in parts.items():
        if args.part == name or (args.part == "all" and name != "sweep"):
            before = os.getloadavg()
            figs, config[name] = run()
            config[name]["load_average_1_5_15"] = {"before": before, "after": os.getloadavg()}
            figures.extend(figs)
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
