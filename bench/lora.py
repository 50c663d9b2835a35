"""Benchmark: LoRA against full fine-tuning on the demo's shapes, side by side in one run.

    python -m bench.lora                 # step + sync -> results/learner.json (lora_*)
    python -m bench.lora --part step     # (a) only;  --part sync: (b) only

(a) step: the learner step of bench/learner.py (SmolLM2-135M float32, the demo's 4
chat-templated arithmetic prompts x G = 8 random completions of 4..16 tokens, mu = 2,
one optimizer step per epoch, shared prefix), once with full weights and once with
configs/cpu-lora.toml's adapter (rank 16 on every attention and MLP projection), each in a
fresh child process (`--child full|lora`): load, AdamW, one warm-up step, then `--reps`
timed steps, with glibc's mmap threshold at the LoRA config's
`learner.malloc_mmap_threshold_kib` for both (learner/heap.py: freed activations leave
the heap), then again under glibc's adaptive threshold (recorded as `adaptive_heap`).
lora_peak_memory_ratio = the LoRA learner's peak RSS while it trains (VmHWM,
reset once the model is loaded, so a loader's transient copies do not count: weights,
optimizer state, gradients, activations) / the full learner's (goal <= 0.6);
lora_step_time_ratio = median LoRA step / median full step (recorded, goal <= 1.0: the
frozen base skips its weight gradients and AdamW updates only the adapter). Each child
also records what it holds, to say where the peak goes: the runtime (RSS before
loading), the weights, the gradients, AdamW's moments, and what autograd keeps for the
backward of one micro-batch (`saved_for_backward_mib`).

(b) sync: the demo's sync of version v, `--pushes` times each, to a real vLLM CPU server:
full weights by `DiskSync` (pause, reload_weights, version, prefix cache reset, resume) to
a plain server, the adapter by `LoraSync` (/v1/load_lora_adapter as policy-vN, version) to
a LoRA-enabled one. lora_sync_pause_ratio = median LoRA switch / median disk pause (goal
<= 0.25); lora_sync_bytes_ratio = adapter bytes / weight folder bytes per sync (the bytes
themselves are in config.sync). After each push the server must report the version.

The figures and their details (config.lora_step, config.lora_sync) are merged into
bench/results/learner.json beside bench/learner.py's, which keeps them when it reruns.
The box is shared: the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PORTS = (8310, 8311)


def _lora_config():
    from grpo_stream.config import load_config

    return load_config(ROOT / "configs" / "cpu-lora.toml")


def _lora_cfg():
    return _lora_config().lora


def _mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def saved_for_backward_mib(runner, samples, advs) -> float:
    """MiB that autograd keeps for the backward of the step's first micro-batch (its
    activations: every saved tensor's storage once, parameters left out)."""
    import torch

    from grpo_stream.learner.plan import plan_micro_batches

    weights = {p.untyped_storage().data_ptr() for p in runner.model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    mbs = plan_micro_batches(samples, advs, runner.cfg.learner, runner.pad_id, runner.model)
    runner.real_seqs = [len(mb.index) for mb in mbs]
    totals = {"total_tokens": float(sum(mb.num_tokens for mb in mbs)),
              "total_seqs": float(len(samples))}  # fmt: skip
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = runner._micro_batch_loss(mbs[0], None, None, totals)[0]
    loss.backward()
    runner.opt.zero_grad(set_to_none=True)
    return sum(kept.values()) / 2**20


def breakdown(model, opt, runtime_mib: float) -> dict:
    """MiB of what the learner holds besides its activations: the Python/torch runtime
    (RSS before loading), the weights, the trained ones' gradients, AdamW's moments."""
    import torch

    moments = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    return {
        "runtime_mib": runtime_mib,
        "weights_mib": _mib(model.parameters()),
        "gradients_mib": _mib(p for p in model.parameters() if p.requires_grad),
        "optimizer_state_mib": _mib(moments),
    }


def child(kind: str, reps: int, heap_kib: int | None) -> dict:
    """One learner variant in this process: its step times, peak RSS and what it holds,
    with glibc's mmap threshold fixed at `heap_kib` (None: glibc's adaptive one)."""
    import torch

    from bench.learner import _rss_kib, demo_prompts, make_batch
    from grpo_stream.config import Config, ModelConfig
    from grpo_stream.learner.heap import set_mmap_threshold
    from grpo_stream.learner.lora import apply_lora
    from grpo_stream.learner.optim import build_optimizer
    from grpo_stream.learner.policy import load_causal_lm
    from grpo_stream.learner.step import StepRunner
    from grpo_stream.serving.model import resolve_model_path

    torch.set_num_threads(1)
    set_mmap_threshold(heap_kib)  # what the learner's set_threads does, before loading
    import transformers  # noqa: F401 (loaded by every learner: part of the runtime)

    runtime = _rss_kib("VmRSS") / 1024
    model_dir = resolve_model_path(ModelConfig())
    model = load_causal_lm(str(model_dir), torch.device("cpu"))
    if kind == "lora":
        model = apply_lora(model, _lora_cfg())
    loaded = _rss_kib("VmRSS") / 1024
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here: training, not loading
    cfg = Config()
    cfg.learner.epochs, cfg.learner.micro_batch_size, cfg.learner.lr = 2, 32, 1e-6
    opt, sched = build_optimizer(model, cfg.learner)
    runner = StepRunner(cfg, model, None, opt, sched, torch.device("cpu"), pad_id=2)
    prompts = demo_prompts(5, model_dir)
    samples, advs = make_batch(prompts[:4], cfg)
    runner.run(*make_batch(prompts[4:], cfg, seed=1))  # warm-up: AdamW state exists
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        runner.run(samples, advs)
        times.append(time.perf_counter() - t0)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = _rss_kib("VmHWM") / 1024
    held = breakdown(model, opt, runtime)
    return {
        "seconds": times,
        "peak_rss_mib": peak,
        "rss_after_load_mib": loaded,
        "trained": trained,
        **held,
        "saved_for_backward_mib": saved_for_backward_mib(runner, samples, advs),
    }


def _run_child(kind: str, reps: int, heap_kib: int | None) -> dict:
    cmd = [sys.executable, "-m", "bench.lora", "--child", kind, "--reps", str(reps),
           "--heap", json.dumps(heap_kib)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {kind} heap={heap_kib}: {row}", flush=True)
    return row


def bench_step(reps: int) -> tuple[list[dict], dict]:
    """Each kind under configs/cpu-lora.toml's fixed mmap threshold (the figures), then
    under glibc's adaptive one (recorded: what the freed-activation holes cost)."""
    from bench.learner import figure

    heap = _lora_config().learner.malloc_mmap_threshold_kib
    fixed = {kind: _run_child(kind, reps, heap) for kind in ("lora", "full")}
    adaptive = {kind: _run_child(kind, reps, None) for kind in ("lora", "full")}
    med = {k: statistics.median(v["seconds"]) for k, v in fixed.items()}
    figures = [
        figure("lora_peak_memory_ratio",
               fixed["lora"]["peak_rss_mib"] / fixed["full"]["peak_rss_mib"], "x", "<=", 0.6),
        figure("lora_step_time_ratio", med["lora"] / med["full"], "x", "<=", 1.0),
    ]  # fmt: skip
    peak = {k: v["peak_rss_mib"] for k, v in adaptive.items()}
    return figures, {
        **fixed,
        "reps": reps,
        "malloc_mmap_threshold_kib": heap,
        "lora": {**fixed["lora"], "config": _lora_cfg().model_dump()},
        "adaptive_heap": {
            **adaptive,
            "peak_memory_ratio": peak["lora"] / peak["full"],
            "step_time_ratio": statistics.median(adaptive["lora"]["seconds"])
            / statistics.median(adaptive["full"]["seconds"]),
        },  # fmt: skip
    }


def _pushes(sync, model, url: str, pushes: int) -> list[dict]:
    from bench.learner import _weight_version

    rows = []
    for v in range(1, pushes + 1):
        rows.append(sync.push(model, v))
        if _weight_version(url) != str(v):
            raise RuntimeError(f"{url} did not take version {v}")
        print(f"  {type(sync).__name__} v{v}: {rows[-1]['sync_pause_s']:.3f} s", flush=True)
    return rows


def bench_sync(pushes: int) -> tuple[list[dict], dict]:
    import torch

    from bench.learner import figure
    from grpo_stream.config import Config, ModelConfig, ServerConfig, SyncConfig
    from grpo_stream.learner.lora import apply_lora
    from grpo_stream.learner.policy import load_causal_lm
    from grpo_stream.serving.model import resolve_model_path
    from grpo_stream.serving.server import VLLMServer
    from grpo_stream.sync.disk import DiskSync
    from grpo_stream.sync.lora import LoraSync, folder_bytes

    model_dir = resolve_model_path(ModelConfig())
    model = load_causal_lm(str(model_dir), torch.device("cpu"), trainable=False)
    lora_cfg = Config(lora=_lora_cfg(), sync=SyncConfig(transport="lora"))
    lora_server = lora_cfg.resolved_server().model_copy(update={"max_model_len": 512})
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        rows = {}
        for kind, scfg, port in (("full", ServerConfig(max_model_len=512), PORTS[0]),
                                 ("lora", lora_server, PORTS[1])):  # fmt: skip
            with VLLMServer(model_dir, "policy", port, scfg, Path(tmp) / f"{kind}.log") as srv:
                srv.wait_healthy()
                if kind == "full":
                    sync = DiskSync(SyncConfig(), [srv.url], Path(tmp) / "weights")
                    rows[kind] = _pushes(sync, model, srv.url, pushes)
                    size = folder_bytes(Path(tmp) / "weights" / f"v{pushes}")
                else:
                    policy = apply_lora(model, lora_cfg.lora)
                    sync = LoraSync(lora_cfg.sync, [srv.url], Path(tmp) / "adapters", "policy", 2)
                    rows[kind] = _pushes(sync, policy, srv.url, pushes)
                    adapter = rows[kind][-1]["sync_bytes"]
    pause = {k: statistics.median(r["sync_pause_s"] for r in v) for k, v in rows.items()}
    figures = [
        figure("lora_sync_pause_ratio", pause["lora"] / pause["full"], "x", "<=", 0.25),
        figure("lora_sync_bytes_ratio", adapter / size, "x", "<=", 0.1),
    ]
    detail = {"pushes": pushes, "bytes_per_sync": {"full": size, "lora": adapter},
              "pause_s": {k: [r["sync_pause_s"] for r in v] for k, v in rows.items()},
              "total_s": {k: [r["sync_s"] for r in v] for k, v in rows.items()}}  # fmt: skip
    return figures, detail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["step", "sync", "all"], default="all")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--pushes", type=int, default=3)
    p.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    p.add_argument("--heap", type=json.loads, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.reps, args.heap)))
        return 0
    from bench.learner import RESULTS, merge_results

    figures, config = [], {}
    for name, run in (("step", lambda: bench_step(args.reps)),
                      ("sync", lambda: bench_sync(args.pushes))):  # fmt: skip
        if args.part in (name, "all"):
            before = os.getloadavg()
            figs, part = run()
            part["load_average_1_5_15"] = {"before": before, "after": os.getloadavg()}
            part["machine"] = f"{os.cpu_count()} cpus, SmolLM2-135M-Instruct float32, cpu"
            config[f"lora_{name}"] = part
            figures.extend(figs)
    out = merge_results({"figures": figures, "config": config})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    for f in figures:
        print(f"{f['name']:28s} {f['value']:>10.4f} {f['op']:>3s}{f['goal']:>7}  {f['ok']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
