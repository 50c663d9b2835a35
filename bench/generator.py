"""Generator token throughput vs a plain saturating aiohttp client, one vLLM CPU server.

Both arms send the same requests to the same server (SmolLM2-135M from the cache, or
`--url` for a running server): the first `--prompts` arithmetic prompts rendered with
the chat template, n=`--group-size`, `--max-tokens` with `ignore_eos` (every sample is
exactly max_tokens long, so both arms do the same work), the generator's own sampling
parameters, and the same number of requests in flight (`--concurrency`).

- generator: `grpo_stream.generator.loop.Generator.run()` end to end (staleness gate
  open, weight-version bracketing, reward scoring, buffer writes with fsync).
- saturating: one aiohttp session, a semaphore, POST /v1/completions, count tokens.

Runs alternate G P P G ... (`--rounds` pairs) to cancel drift; each arm's throughput is
its total tokens over its total seconds. Figure: throughput_vs_saturating_client
(generator / saturating, goal >= 0.95).

    GRPO_STREAM_CACHE=... python -m bench.generator   # table + bench/results/generator.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import aiohttp

from grpo_stream.config import Config, ModelConfig, ServerConfig, load_config
from grpo_stream.generator.loop import Generator
from grpo_stream.tasks import make_prompt_source, render_prompt

RESULTS = Path(__file__).parent / "results" / "generator.json"
GOAL = 0.95


class BenchGenerator(Generator):
    """The real generator; only `ignore_eos` is added so both arms sample equal lengths."""

    def sampling_params(self) -> dict:
        return {**super().sampling_params(), "ignore_eos": True}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=8, help="requests per run (one per prompt)")
    p.add_argument("--group-size", type=int, default=8, help="n: samples per request")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--rounds", type=int, default=2, help="pairs of runs (G P, then P G, ...)")
    p.add_argument("--port", type=int, default=8402, help="port for the server started here")
    p.add_argument("--url", default=None, help="use this running server instead")
    return p.parse_args(argv)


def make_cfg(args: argparse.Namespace, url: str, model_dir: Path, run_dir: str) -> Config:
    return load_config(
        None,
        [
            f"run.run_dir={json.dumps(run_dir)}",
            f"model.path={json.dumps(str(model_dir))}",
            f"server.urls={json.dumps([url])}",
            f"generator.group_size={args.group_size}",
            f"generator.max_tokens={args.max_tokens}",
            f"generator.stop_after_groups={args.prompts}",
            f"generator.max_in_flight={args.concurrency}",
            "learner.batch_groups=100000",  # no learner here: keep the gate open
            "generator.wait_for_learner=false",  # and do not wait for its first push
        ],
    )


def payloads(cfg: Config, gen: Generator, count: int) -> list[dict]:
    """The exact requests the generator sends (VLLMClient.complete's payload)."""
    out = []
    for prompt in itertools.islice(make_prompt_source(cfg.task), count):
        _, ids = render_prompt(prompt, gen.tokenizer, cfg.task)
        out.append(
            {
                "model": cfg.model.served_name,
                "prompt": ids,
                "n": cfg.generator.group_size,
                "logprobs": 0,
                "return_token_ids": True,
                "return_tokens_as_token_ids": True,
                **gen.sampling_params(),
            }
        )
    return out


async def saturating(url: str, bodies: list[dict], concurrency: int) -> tuple[int, float]:
    """(completion tokens, seconds) for all bodies with `concurrency` requests in flight."""
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:

        async def one(body: dict) -> int:
            async with sem, session.post(f"{url}/v1/completions", json=body) as resp:
                resp.raise_for_status()
                answer = await resp.json()
            return sum(len(c["token_ids"]) for c in answer["choices"])

        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(one(b) for b in bodies))
        return sum(tokens), time.perf_counter() - t0


def generator_run(args, url: str, model_dir: Path, workdir: str, i: int) -> tuple[int, float]:
    """(completion tokens, seconds of Generator.run()); the tokenizer load is not timed."""
    run_dir = os.path.join(workdir, f"run-{i}")
    cfg = make_cfg(args, url, model_dir, run_dir)
    os.makedirs(run_dir, exist_ok=True)
    gen = BenchGenerator(cfg, run_dir, str(model_dir))
    t0 = time.perf_counter()
    written = asyncio.run(gen.run())
    seconds = time.perf_counter() - t0
    if written != args.prompts or gen.failed_prompts:
        raise RuntimeError(f"generator wrote {written}/{args.prompts} groups")
    return gen.stats.tokens, seconds


def measure(args: argparse.Namespace, url: str, model_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-generator-") as workdir:
        cfg = make_cfg(args, url, model_dir, workdir)
        bodies = payloads(cfg, BenchGenerator(cfg, workdir, str(model_dir)), args.prompts)
        asyncio.run(saturating(url, bodies[: args.concurrency], args.concurrency))  # warm-up
        runs: dict[str, list[tuple[int, float]]] = {"generator": [], "saturating": []}
        order = [("generator", "saturating"), ("saturating", "generator")]
        for r in range(args.rounds):
            for arm in order[r % 2]:
                if arm == "generator":
                    runs[arm].append(generator_run(args, url, model_dir, workdir, len(runs[arm])))
                else:
                    runs[arm].append(asyncio.run(saturating(url, bodies, args.concurrency)))
                tok, sec = runs[arm][-1]
                print(f"  {arm:<10} {tok:6d} tokens {sec:6.1f} s {tok / sec:7.1f} tok/s")
    return runs


def tok_per_s(runs: list[tuple[int, float]]) -> float:
    return sum(t for t, _ in runs) / sum(s for _, s in runs)


def start_server(args: argparse.Namespace, model_dir: Path, log: Path):
    from grpo_stream.serving.server import VLLMServer

    server = VLLMServer(model_dir, "policy", args.port, ServerConfig(max_model_len=512), log)
    server.start()
    try:
        print(f"vLLM server up after {server.wait_healthy():.0f} s")
    except BaseException:
        server.stop()
        raise
    return server


def main(argv: list[str] | None = None) -> dict:
    from grpo_stream.serving.model import resolve_model_path

    args = parse_args(argv)
    model_dir = resolve_model_path(ModelConfig())
    server = None
    if args.url is None:
        server = start_server(args, model_dir, Path(tempfile.gettempdir()) / "bench-gen-vllm.log")
    try:
        runs = measure(args, args.url or server.url, model_dir)
    finally:
        if server is not None:
            server.stop()
    gen, sat = tok_per_s(runs["generator"]), tok_per_s(runs["saturating"])
    ratio = gen / sat
    print(f"{'arm':<12}{'tok/s':>9}\n{'generator':<12}{gen:9.1f}\n{'saturating':<12}{sat:9.1f}")
    print(f"throughput_vs_saturating_client = {ratio:.3f} (goal >= {GOAL})")
    result = {
        "figures": [
            {
                "name": "throughput_vs_saturating_client",
                "value": round(ratio, 4),
                "unit": "ratio",
                "op": ">=",
                "goal": GOAL,
                "ok": ratio >= GOAL,
            }
        ],
        "machine": {
            "node": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg": os.getloadavg(),
        },
        "config": {
            **vars(args),
            "model": str(model_dir),
            "ignore_eos": True,
            "generator_tok_s": round(gen, 2),
            "saturating_tok_s": round(sat, 2),
            "runs": {k: [[t, round(s, 3)] for t, s in v] for k, v in runs.items()},
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
