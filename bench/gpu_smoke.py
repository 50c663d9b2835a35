"""Smoke test and figures for the learner's GPU path, sized to finish in minutes.

    python -m bench.gpu_smoke                      # CUDA: writes bench/results/gpu.json
    python -m bench.gpu_smoke --device cpu         # small sizes, < 1 min: results/gpu-cpu.json
    python -m bench.gpu_smoke --if-cuda            # make bench: one line and exit 0 without CUDA

What it runs, on one device:
1. a small random Llama (vocabulary 151,936 on CUDA, like Qwen2.5; 8,192 with --size small)
   and two learner steps in bf16 through the project's `StepRunner` with the fused output
   layer + GRPO loss, on synthetic groups (random token ids, rewards, behaviour log-probs);
2. the same two steps under FSDP2 with one rank, started through `torch.distributed.run`
   (nccl on CUDA, gloo on CPU): the model is loaded on CPU and `shard_model` moves only
   shards to the device; then `gather.full_state_dict_on_rank0` gathers the weights, whose names
   and shapes must be exactly the Hugging Face ones (`LlamaForCausalLM.state_dict()`: what
   `save_pretrained` writes and vLLM loads), and must have moved from their initial values;
3. figures, as ratios measured side by side in this run (the machines are shared):
   * tokens_per_s_vs_bare_fwd_bwd: the learner step's tokens/s ÷ a bare bf16 schedule on the
     same samples (1 no-grad forward, then per epoch `model(ids, labels).loss.backward()`
     per micro-batch, clip, AdamW), tokens = prompt + completion tokens of the samples;
   * fused_peak_memory_vs_naive: peak memory of `algo.fused_loss_from_hidden` ÷ the naive
     `log_softmax(hidden @ W.T)` path, forward + backward, at vocabulary 151,936 and 16,384
     tokens (CUDA: max_memory_allocated; CPU: peak RSS growth; small: 16,384 x 1,024);
   * nonfinite_losses and fsdp_state_dict_mismatches, which must be 0 (else exit 1).
Imports: torch here; transformers and the project (`grpo_stream.config` needs pydantic)
inside the functions, after a check that names the wheels to carry (README, "Checking
the GPU path"). vLLM and zarr are never imported.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.gpu_parts import (
    build_model,
    learner_config,
    llama_config,
    make_runner,
    sync,
    synthetic_batch,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# fmt: off
SIZES = {  # full: the GPU figures; small: --device cpu in CI, under a minute
    "full": dict(vocab=151936, hidden=512, layers=4, heads=8, groups=8, group_size=8,
                 prompt=64, completion=192, micro=16, chunk=1024,
                 mem_tokens=16384, mem_seq=1024, mem_vocab=151936, mem_hidden=896),
    "small": dict(vocab=8192, hidden=64, layers=2, heads=2, groups=4, group_size=4,
                  prompt=16, completion=32, micro=8, chunk=128,
                  mem_tokens=1024, mem_seq=128, mem_vocab=16384, mem_hidden=64),
}
# fmt: on
NEEDED = ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "pyarrow")
GOALS = {"tokens_per_s_vs_bare_fwd_bwd": (">=", 0.7), "fused_peak_memory_vs_naive": ("<=", 0.25),
         "nonfinite_losses": ("<=", 0), "fsdp_state_dict_mismatches": ("<=", 0)}  # fmt: skip


def check_imports() -> None:
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(
            f"bench.gpu_smoke: missing {', '.join(missing)}. The project's config needs "
            "pydantic; carry its wheels (README, 'Checking the GPU path'): pydantic, "
            "pydantic-core, annotated-types, typing-inspection, typing-extensions, then\n"
            "  pip install --no-index --no-deps --target /tmp/gpu-site wheels/*.whl\n"
            "  PYTHONPATH=/tmp/gpu-site python -m bench.gpu_smoke"
        )


def learner_steps(runner, samples, advs, device: torch.device) -> tuple[list[float], float]:
    """Two `StepRunner.run` steps: (their losses, wall time of the second)."""
    losses, t = [], 0.0
    for _ in range(2):
        sync(device)
        t0 = time.perf_counter()
        m = runner.run(samples, advs)
        sync(device)
        t = time.perf_counter() - t0
        losses.append(float(m["loss"]))
    return losses, t


def bare_batches(samples, micro: int, device: torch.device):
    """Padded (ids, mask, labels) micro-batches of prompt + completion tokens."""
    out = []
    for i in range(0, len(samples), micro):
        seqs = [s.prompt_ids + s.completion_ids for s in samples[i : i + micro]]
        t = max(map(len, seqs))
        ids = torch.zeros(len(seqs), t, dtype=torch.long)  # [B, T]
        mask = torch.zeros(len(seqs), t, dtype=torch.long)  # [B, T]
        for r, s in enumerate(seqs):
            ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
        labels = ids.masked_fill(mask == 0, -100)  # [B, T]
        out.append((ids.to(device), mask.to(device), labels.to(device)))
    return out


def bare_schedule(model, opt, batches, epochs: int, device: torch.device) -> float:
    """What a user writes: 1 no-grad forward, then per epoch fwd+bwd per micro-batch,
    clip, AdamW; bf16 autocast. Returns the wall time."""
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for ids, mask, _ in batches:
            model(input_ids=ids, attention_mask=mask)
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        for ids, mask, labels in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    sync(device)
    return time.perf_counter() - t0


def throughput(size: dict, cfg, device: torch.device) -> dict:
    """The learner's two bf16 steps and the bare schedule on the same samples."""
    samples, advs = synthetic_batch(size, cfg)
    tokens = sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    runner = make_runner(cfg, build_model(size, device), device)
    losses, learner_s = learner_steps(runner, samples, advs, device)
    bare = build_model(size, device)
    opt = torch.optim.AdamW(bare.parameters(), lr=1e-4)
    batches = bare_batches(samples, size["micro"], device)
    bare_schedule(bare, opt, batches, 1, device)  # warm-up (kernels, AdamW state)
    bare_s = bare_schedule(bare, opt, batches, cfg.learner.epochs, device)
    return {"losses": losses, "learner_s": learner_s, "bare_s": bare_s, "tokens": tokens,
            "ratio": bare_s / learner_s}  # fmt: skip


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_bytes(fn, device: torch.device) -> int:
    """Peak memory growth while `fn()` runs (CUDA allocator, or the process's peak RSS)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with contextlib.suppress(OSError, AttributeError):  # glibc: return freed heap pages, so
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # a block reused by fn() counts as growth
    before = _rss_kib("VmRSS")
    with contextlib.suppress(OSError):  # reset the peak (fused runs first: a peak that
        Path("/proc/self/clear_refs").write_text("5")  # cannot be reset still reads right)
    fn()
    return (_rss_kib("VmHWM") - before) * 1024


def memory(size: dict, device: torch.device) -> dict:
    """Fused vs naive output layer + loss, forward + backward, fp32, one micro-batch of
    mem_tokens // mem_seq sequences (the fused chunks hold whole sequences)."""
    from grpo_stream.algo import fused_loss_from_hidden

    n, h, v, chunk = size["mem_tokens"], size["mem_hidden"], size["mem_vocab"], size["chunk"]
    g = torch.Generator().manual_seed(0)
    b, t = n // size["mem_seq"], size["mem_seq"]
    hidden = torch.randn(b, t, h, generator=g).to(device).requires_grad_()  # [B, T, H]
    weight = (0.05 * torch.randn(v, h, generator=g)).to(device).requires_grad_()  # [V, H]
    ids = torch.randint(0, v, (b, t), generator=g).to(device)  # [B, T]
    coef = torch.randn(b, t, generator=g).to(device)  # [B, T]

    def fused():
        hidden.grad = weight.grad = None
        loss, _, _ = fused_loss_from_hidden(
            hidden, weight, ids, lambda rows, lp, ent: (lp * coef[rows]).sum(), chunk
        )
        loss.backward()

    def naive():
        hidden.grad = weight.grad = None
        logp = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)  # [B, T, V]
        (logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * coef).sum().backward()

    with contextlib.suppress(OSError, AttributeError):  # glibc (CPU): blocks >= 64 KiB are
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 << 10)  # mmapped, unmapped on free: RSS = live
    fused(), naive()  # warm-up: one-time allocations (thread pools, kernels) stay out
    fused_b, naive_b = _peak_bytes(fused, device), _peak_bytes(naive, device)
    return {"tokens": n, "seq": t, "vocab": v, "hidden": h, "chunk": chunk,
            "fused_bytes": fused_b, "naive_bytes": naive_b,
            "ratio": fused_b / max(naive_b, 1)}  # fmt: skip


def state_dict_mismatches(full: dict, size: dict) -> list[str]:
    """Differences between a gathered state dict and the Hugging Face model's own."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        ref = {
            k: tuple(v.shape) for k, v in LlamaForCausalLM(llama_config(size)).state_dict().items()
        }
    got = {k: tuple(v.shape) for k, v in full.items()}
    bad = [f"missing {k}" for k in ref if k not in got]
    bad += [f"unexpected {k}" for k in got if k not in ref]
    bad += [f"{k}: {got[k]} != {ref[k]}" for k in ref if k in got and got[k] != ref[k]]
    bad += [f"{k} on {v.device}" for k, v in full.items() if v.device.type != "cpu"]
    return bad


def fsdp_worker(size_name: str, device_name: str, out: str) -> None:
    """One torchrun rank: load on CPU, shard (FSDP2), two bf16 steps, gather, check."""
    from grpo_stream.learner import distributed as d
    from grpo_stream.learner import gather

    size = SIZES[size_name]
    dist = d.init_distributed(device_name)
    cfg = learner_config(size)
    model = build_model(size, torch.device("cpu"))  # loaded on CPU, as the learner does
    start = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    sharded = d.shard_model(model, dist, d.mixed_precision_dtype("bfloat16", dist.device))
    runner = make_runner(cfg, sharded, dist.device, dist.world_size, dist.rank)
    samples, advs = synthetic_batch(size, cfg)
    losses, step_s = learner_steps(runner, samples, advs, dist.device)
    full = gather.full_state_dict_on_rank0(sharded)  # collective: every rank
    if dist.rank == 0:
        moved = not torch.equal(full["model.layers.0.mlp.up_proj.weight"], start)
        result = {
            "losses": losses,
            "step_s": step_s,
            "tensors": len(full),
            "mismatches": state_dict_mismatches(full, size)
            + ([] if moved else ["model.layers.0.mlp.up_proj.weight did not change in 2 steps"]),
            "backend": torch.distributed.get_backend(),
        }
        Path(out).write_text(json.dumps(result))
    d.shutdown_distributed()


def run_fsdp(size_name: str, device: torch.device) -> dict:
    """`fsdp_worker` as one rank under torch.distributed.run; its result."""
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        out = Path(tmp) / "fsdp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "1", "-m", "bench.gpu_smoke", "--fsdp-worker", str(out),
               "--device", device.type, "--size", size_name]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not out.exists():
            log = (proc.stdout + proc.stderr)[-3000:]
            return {"losses": [], "mismatches": [f"torchrun rank failed ({proc.returncode})"],
                    "log": log}  # fmt: skip
        return json.loads(out.read_text())


def figure(name: str, value: float, unit: str) -> dict:
    op, goal = GOALS[name]
    ok = value >= goal if op == ">=" else value <= goal
    return {"name": name, "value": round(value, 4), "unit": unit, "op": op, "goal": goal, "ok": ok}


def machine(device: torch.device) -> str:
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{platform.machine()} {os.cpu_count()} cpus{gpu}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_smoke", description=__doc__.split("\n")[0]
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=None,
        help="full (default on cuda) or small (default on cpu, < 1 min)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: bench/results/gpu.json (gpu-cpu.json with --device cpu)",
    )
    p.add_argument(
        "--if-cuda",
        action="store_true",
        help="where no CUDA device is present, say so in one line and exit 0 (make bench)",
    )
    p.add_argument("--fsdp-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.if_cuda and args.device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu_smoke: skipped, no CUDA device here "
              "(`python -m bench.gpu_smoke --device cpu` runs its small CPU check)")  # fmt: skip
        return 0
    check_imports()
    size_name = args.size or ("full" if args.device == "cuda" else "small")
    if args.fsdp_worker:
        fsdp_worker(size_name, args.device, args.fsdp_worker)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.gpu_smoke: no CUDA device (use --device cpu)")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    return report(
        size_name,
        device,
        args.out or RESULTS / ("gpu.json" if device.type == "cuda" else "gpu-cpu.json"),
    )


def report(size_name: str, device: torch.device, out: Path) -> int:
    size = SIZES[size_name]
    t0 = time.perf_counter()
    cfg = learner_config(size)
    tp = throughput(size, cfg, device)
    mem = memory(size, device)
    fsdp = run_fsdp(size_name, device)
    losses = tp["losses"] + fsdp["losses"]
    nonfinite = sum(not torch.isfinite(torch.tensor(x)) for x in losses) + (4 - len(losses))
    figures = [
        figure("tokens_per_s_vs_bare_fwd_bwd", tp["ratio"], "x"),
        figure("fused_peak_memory_vs_naive", mem["ratio"], "x"),
        figure("nonfinite_losses", float(nonfinite), "steps"),
        figure("fsdp_state_dict_mismatches", float(len(fsdp["mismatches"])), "tensors"),
    ]
    result = {"figures": figures, "machine": machine(device),
              "config": {"device": str(device), "size": size_name, **size, "throughput": tp,
                         "memory": mem, "fsdp": fsdp,
                         "wall_s": time.perf_counter() - t0}}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for f in figures:
        print(
            f"{f['name']:32s} {f['value']:>10} {f['unit']:8s} {f['op']} {f['goal']}  "
            f"{'ok' if f['ok'] else 'MISSED'}"
        )
    for line in fsdp["mismatches"][:10]:
        print(f"  fsdp: {line}")
    print(f"wrote {out} in {time.perf_counter() - t0:.0f}s")
    checks_ok = nonfinite == 0 and not fsdp["mismatches"]
    return 0 if checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
