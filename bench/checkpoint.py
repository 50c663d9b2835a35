"""Benchmark: what a demo run leaves on disk, and what a checkpoint write costs.

    python -m bench.checkpoint              # both parts -> bench/results/checkpoint.json
    python -m bench.checkpoint --part disk  # (a) only;  --part write: (b) only
    python -m bench.checkpoint --reps 3     # (b): rounds, median

Model: SmolLM2-135M as the demo trains it (prepared under ~/.cache/grpo-stream, float32,
untied head: 162.8M parameters, a 651 MB safetensors file), with AdamW's moments
allocated by one optimizer step. Every write is the product's own code
(`DiskSync.publish`/`prune`, `save_checkpoint`), fsynced as in a run.

(a) disk: the demo's schedule (configs/cpu.toml: 12 steps, a sync every step, a
checkpoint every 5 and at the last) replayed without training, once with the previous
retention (two checkpoints, each writing its own model; two weight folders; AdamW's
state in every checkpoint) and once with the current one (configs/cpu.toml's settings:
one checkpoint whose model is a hard link to the weights just published, one weights
folder, no AdamW state in the last checkpoint). Reported: the run folder's size at the
end and its peak after any step, counted as `du` does (each inode once, allocated
blocks, in GiB). Figure: demo_run_folder_gib (goal <= 1.0).

(b) write: one checkpoint at a sync step, side by side in rotating order: `save` (the
model written again, the previous way), `link` (hard links to RUN/weights/vN), `copy`
(the fallback: the weights folder on another file system, /dev/shm, so the link is
refused with EXDEV and the file is copied), each with AdamW's state, and `final` (link,
no AdamW state). Figure: checkpoint_link_speedup = save time / link time (goal >= 1.2).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.figures import figure, write_result
from grpo_stream.config import LearnerConfig, ModelConfig, SyncConfig
from grpo_stream.learner.checkpoint import save_checkpoint
from grpo_stream.learner.optim import build_optimizer
from grpo_stream.learner.policy import load_causal_lm
from grpo_stream.serving.model import resolve_model_path
from grpo_stream.sync.disk import DiskSync

OUT = Path(__file__).parent / "results" / "checkpoint.json"
STEPS, EVERY = 12, 5  # configs/cpu.toml: learner.max_steps, learner.checkpoint_every
GB = 2**30  # GiB, as `du -h` counts


def disk_bytes(*folders: Path) -> int:
    """Allocated bytes below `folders`, each inode once (as `du` counts hard links)."""
    seen, total = set(), 0
    for folder in folders:
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def trained_model():
    """The demo's policy with AdamW's moments allocated (one step on a small gradient)."""
    torch.manual_seed(0)
    model = load_causal_lm(str(resolve_model_path(ModelConfig())), torch.device("cpu"))
    opt, sched = build_optimizer(model, LearnerConfig())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, sched


def demo_schedule(model, opt, sched, run: Path, current: bool) -> dict:
    """Replay the demo's syncs and checkpoints; the run folder's end and peak size."""
    keep_last, keep = (1, 1) if current else (2, 2)
    sync = DiskSync(SyncConfig(keep_last=keep_last), [], run / "weights", rank=0)
    peak, t0 = 0, time.perf_counter()
    for step in range(1, STEPS + 1):
        sync.publish(model, step)
        sync.prune(step)
        if step % EVERY == 0 or step == STEPS:
            files = sync.published(step) if current else None
            with_opt = not current or step < STEPS  # cpu.toml: keep_final_optimizer = false
            save_checkpoint(str(run), step, model, opt, sched, {"version": step, "cursor": {}},
                            keep=keep, model_files=files, with_optimizer=with_opt)  # fmt: skip
        peak = max(peak, disk_bytes(run))
    return {"end_gb": disk_bytes(run) / GB, "peak_gb": peak / GB,
            "kept": sorted(str(p.relative_to(run)) for p in run.glob("*/*")),
            "wall_s": time.perf_counter() - t0}  # fmt: skip


def bench_disk(model, opt, sched, root: Path) -> tuple[list[dict], dict]:
    rows = {}
    for name, current in (("previous", False), ("current", True)):
        run = root / f"run-{name}"
        rows[name] = demo_schedule(model, opt, sched, run, current)
        shutil.rmtree(run)
        r = rows[name]
        print(f"  {name:8s}: run folder {r['end_gb']:.2f} GiB at the end, peak "
              f"{r['peak_gb']:.2f} GiB; kept {', '.join(r['kept'])}", flush=True)  # fmt: skip
    fig = figure("demo_run_folder_gib", rows["current"]["end_gb"], "GiB", "<=", 1.0)
    return [fig], rows


def _write_once(variant: str, model, opt, sched, run: Path, weights: Path) -> float:
    files = None if variant == "save" else weights
    t0 = time.perf_counter()
    save_checkpoint(str(run), 1, model, opt, sched, {"version": 1, "cursor": {}},
                    model_files=files, with_optimizer=variant != "final")  # fmt: skip
    return time.perf_counter() - t0


def bench_write(model, opt, sched, root: Path, reps: int) -> tuple[list[dict], dict]:
    local = DiskSync(SyncConfig(), [], root / "weights", rank=0).publish(model, 1)
    folders = {"save": local, "link": local, "final": local}
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 2 * disk_bytes(local):
        other = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=shm))
        folders["copy"] = DiskSync(SyncConfig(), [], other, rank=0).publish(model, 1)
    times: dict[str, list[float]] = {v: [] for v in folders}
    new: dict[str, float] = {}
    names = list(folders)
    try:
        for rep in range(reps + 1):  # round 0 warms the page cache and allocator
            for v in names[rep % len(names) :] + names[: rep % len(names)]:
                run = root / f"run-{v}"
                s = _write_once(v, model, opt, sched, run, folders[v])
                # what the checkpoint added: a file it shares with the weights is not new
                size = (disk_bytes(run, folders[v]) - disk_bytes(folders[v])) / GB
                shutil.rmtree(run)
                if rep:
                    times[v].append(s)
                    new[v] = size
                    print(f"  {v:5s}: {s:.2f} s, {size:.2f} GiB new on disk", flush=True)
    finally:
        if "copy" in folders:
            shutil.rmtree(folders["copy"].parent)  # the /dev/shm folder
    med = {v: statistics.median(t) for v, t in times.items()}
    fig = figure("checkpoint_link_speedup", med["save"] / med["link"], "x", ">=", 1.2)
    return [fig], {"median_s": med, "times_s": times, "new_gib": new, "reps": reps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "disk", "write"], default="all")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, opt, sched = trained_model()
    figs, detail = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        if args.part in ("all", "disk"):
            print("(a) the demo's run folder, previous and current retention", flush=True)
            f, detail["disk"] = bench_disk(model, opt, sched, Path(tmp))
            figs += f
        if args.part in ("all", "write"):
            print("(b) one checkpoint at a sync step", flush=True)
            f, detail["write"] = bench_write(model, opt, sched, Path(tmp), args.reps)
            figs += f
    params = sum(p.numel() for p in model.parameters())
    config = {"model": "SmolLM2-135M fp32", "parameters": params, "steps": STEPS,
              "checkpoint_every": EVERY, "part": args.part, "detail": detail}  # fmt: skip
    write_result(OUT, figs, config)
    for f in figs:
        print(f"{f['name']}: {f['value']} {f['unit']} (goal {f['op']} {f['goal']}: "
              f"{'ok' if f['ok'] else 'NOT MET'})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
