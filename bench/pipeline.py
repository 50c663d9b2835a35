"""Async against synchronous GRPO on real parts: `run --sync`, then `run`, same work.

    python -m bench.pipeline [--quick] [--model tiny|smollm2] [--steps N]

One vLLM CPU server (started here) and one `grpo-stream run` per mode on the same task,
model, seed, batch size and number of learner steps (so the same number of trained
samples). The server is pinned to its own cores (process affinity, inherited by its
engine, and `server.cpu_omp_threads_bind`); the learner to the others
(`learner.num_threads` and affinity), and the generator shares the learner's cores (it
mostly waits on HTTP). It prints each mode's training wall time (the sum of the learner's
`step_s`: from the first wait for data to the last step's end, model loading excluded),
the measured ratio sync/async, the ideal ratio `(gen + train) / max(gen, train)` from the
sync run's phases (gen = its `wait_s`, train = the rest of its steps), and the
efficiency measured / ideal (goal >= 0.9). Writes `bench/results/pipeline.json`
(`async_vs_sync_speedup`, `fraction_of_ideal_overlap`) and appends a table to
`bench/RESULTS.md`. `--quick` runs 2 steps per mode (a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.figures import append_results_md, figure, write_result
from grpo_stream.core import metric_names as M

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "pipeline.json"
MD = ROOT / "bench" / "RESULTS.md"


def split_cpus(cpus: list[int]) -> tuple[list[int], list[int]]:
    """(server cores, learner + generator cores): halves; one core is shared."""
    if len(cpus) < 2:
        return cpus, cpus
    half = len(cpus) // 2
    return cpus[:half], cpus[half:]


def model_dir(name: str, work: Path) -> Path:
    from grpo_stream.config import ModelConfig
    from grpo_stream.serving.model import build_tiny_model, resolve_model_path

    smol = resolve_model_path(ModelConfig())
    return build_tiny_model(work / "tiny", smol) if name == "tiny" else Path(smol)


def start_server(model: Path, cores: list[int], work: Path, max_len: int):
    """A vLLM CPU server whose processes run on `cores` only."""
    from grpo_stream.config import ServerConfig
    from grpo_stream.serving.server import VLLMServer
    from tests.conftest import free_port

    bind = ",".join(map(str, cores))
    cfg = ServerConfig(max_model_len=max_len, startup_timeout_s=900,
                       cpu_omp_threads_bind=bind, cpu_threads=len(cores))  # fmt: skip
    srv = VLLMServer(model, "policy", free_port(), cfg, work / "vllm.log")
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)  # the server's processes inherit it
    try:
        srv.start()
    finally:
        os.sched_setaffinity(0, mine)
    srv.wait_healthy()
    return srv


def run_mode(sync: bool, url: str, model: Path, cores: list[int], run_dir: Path,
             args) -> list[dict]:  # fmt: skip
    """One `grpo-stream run` (pinned to `cores`); its metrics rows."""
    overrides = [
        f"run.run_dir={run_dir}", f'server.urls=["{url}"]', f"model.path={model}",
        f"learner.max_steps={args.steps}", f"learner.batch_groups={args.batch_groups}",
        f"learner.num_threads={len(cores)}", "learner.checkpoint_every=0",
        f"generator.max_tokens={args.max_tokens}", "generator.temperature=1.0",
        f"generator.max_in_flight={args.batch_groups}", "run.seed=1", "task.seed=1",
    ]  # fmt: skip
    argv = ["taskset", "-c", ",".join(map(str, cores)), sys.executable, "-m",
            "grpo_stream.cli", "run", "--config", str(ROOT / "configs" / "tiny.toml"),
            *(["--sync"] if sync else []), *overrides]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{'sync' if sync else 'async'} run failed:\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-3000:]}")  # fmt: skip
    print("\n".join(x for x in proc.stdout.splitlines() if x.startswith("[run] ")))
    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def phases(rows: list[dict]) -> dict:
    wall = sum(r[M.STEP_S] for r in rows)
    gen = sum(r[M.WAIT_S] for r in rows)
    return {"wall_s": wall, "gen_s": gen, "train_s": wall - gen,
            "samples": sum(r[M.SAMPLES] for r in rows), "steps": len(rows)}  # fmt: skip


def compare(sync: dict, asyn: dict) -> dict:
    measured = sync["wall_s"] / asyn["wall_s"]
    ideal = (sync["gen_s"] + sync["train_s"]) / max(sync["gen_s"], sync["train_s"])
    return {"measured": measured, "ideal": ideal, "efficiency": measured / ideal}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 steps per mode (smoke run)")
    ap.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-groups", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--results-md", type=Path, default=MD)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = 2
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    server_cores, learner_cores = split_cpus(sorted(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory(prefix="grpo-pipeline-") as d:
        work = Path(d)
        model = model_dir(args.model, work)
        srv = start_server(model, server_cores, work, 512)
        try:
            runs = {mode: phases(run_mode(mode == "sync", srv.url, model, learner_cores,
                                          work / mode, args))
                    for mode in ("sync", "async")}  # fmt: skip
        finally:
            srv.stop()
    c = compare(runs["sync"], runs["async"])
    lines = ["| mode | steps | samples | wall (s) | gen / wait (s) | train (s) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for mode, r in runs.items():
        lines.append(f"| {mode} | {r['steps']} | {r['samples']} | {r['wall_s']:.1f} | "
                     f"{r['gen_s']:.1f} | {r['train_s']:.1f} |")  # fmt: skip
    lines.append(f"\nmeasured sync/async {c['measured']:.2f}x, ideal {c['ideal']:.2f}x, "
                 f"efficiency {c['efficiency']:.2f} (goal >= 0.9)")  # fmt: skip
    print("\n".join(lines))
    figs = [figure("async_vs_sync_speedup", c["measured"], "x", ">=", round(0.9 * c["ideal"], 3)),
            figure("fraction_of_ideal_overlap", c["efficiency"], "ratio", ">=", 0.9)]  # fmt: skip
    config = {"model": args.model, "steps": args.steps, "batch_groups": args.batch_groups,
              "max_tokens": args.max_tokens, "quick": args.quick, "server_cores": server_cores,
              "learner_and_generator_cores": learner_cores, "runs": runs, **c}  # fmt: skip
    result = write_result(args.out, figs, config)
    title = "Pipeline: async vs --sync on real parts (bench/pipeline.py)"
    append_results_md(args.results_md, title + (" [--quick: smoke]" if args.quick else ""),
                      lines, result)  # fmt: skip
    return result


if __name__ == "__main__":
    main()
