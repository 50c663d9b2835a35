"""Synthetic rollout groups and writer/reader process entry points, for tests and bench.

Test and benchmark support, not part of the package: run from the repository root
(`python -m bench.buffer`; pytest puts the root on sys.path, see tests/conftest.py).

Groups look like real ones (G samples per prompt, prompt/completion token ids, float32
behaviour log-probs, text) and are deterministic in their seed, so a test can rebuild
exactly what a writer process appended and compare. The `*_worker` functions are
module-level so `multiprocessing` (spawn) can start them.

    from bench.synth import make_groups
    groups = make_groups(10, group_size=8)
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time

import numpy as np

from grpo_stream.buffer.schema import Group, Sample


def make_group(
    gid: int,
    group_size: int = 4,
    prompt_len: int = 16,
    completion_len: int = 24,
    version: int = 0,
    run_id: str = "test",
    with_text: bool = True,
) -> Group:
    """One deterministic group (seeded by gid); lengths vary around the given means."""
    rng = np.random.default_rng(gid)
    plen = max(1, int(rng.integers(prompt_len // 2, prompt_len * 3 // 2 + 1)))
    prompt = rng.integers(0, 49152, plen).astype(np.int32).tolist()
    group = []
    for i in range(group_size):
        clen = int(rng.integers(max(completion_len // 2, 0), completion_len * 3 // 2 + 1))
        comp = rng.integers(0, 49152, clen).astype(np.int32).tolist()
        lps = (-rng.exponential(1.0, clen)).astype(np.float32).tolist()
        group.append(
            Sample(
                run_id=run_id,
                prompt_id=f"p{gid}",
                sample_index=i,
                policy_version=version,
                prompt_ids=prompt,
                completion_ids=comp,
                behaviour_logprobs=lps,
                reward=float(np.float32(rng.random())),
                policy_version_end=version,
                prompt_text=f"What is {gid}+{i}? ü" * (plen // 8 + 1) if with_text else "",
                completion_text=f"answer {gid * 7 + i} " * (clen // 4 + 1) if with_text else "",
                answer=str(gid * 7),
                reward_components={"numeric": float(i % 2), "format": 0.5},
                finish_reason="stop" if i % 3 else "length",
                gen_latency_s=float(np.float32(0.25 * i)),
                server_url="http://127.0.0.1:8000",
                created_at=1.7e9 + gid,
            )
        )
    return group


def make_groups(n: int, start: int = 0, **kw) -> list[Group]:
    return [make_group(start + i, **kw) for i in range(n)]


def ragged_samples(
    shapes: list[tuple[int, list[int]]], seed: int, run_id: str, vocab: int = 49152
) -> tuple[list[Sample], list[float]]:
    """Samples and advantages for groups of `(prompt length, completion lengths)`: one
    shared random prompt per group, random completions, behaviour log-probs in
    [-11.5, -10], reward 0/1 alternating, advantages in [-1.5, 1.5] (the shared-prefix
    tests' batches)."""
    rng = random.Random(seed)
    samples, advs = [], []
    for g, (p, cs) in enumerate(shapes):
        prompt = [rng.randrange(3, vocab) for _ in range(p)]
        for k, c in enumerate(cs):
            samples.append(Sample(
                run_id=run_id, prompt_id=f"p{g}", sample_index=k, policy_version=0,
                prompt_ids=prompt, completion_ids=[rng.randrange(3, vocab) for _ in range(c)],
                behaviour_logprobs=[-rng.uniform(10.0, 11.5) for _ in range(c)],
                reward=float(k % 2), row_id=len(samples),
            ))  # fmt: skip
            advs.append(rng.uniform(-1.5, 1.5))
    return samples, advs


def writer_worker(path: str, backend: str, n: int, per_append: int, version_every: int) -> None:
    """Append n deterministic groups (gid-seeded), per_append at a time."""
    from grpo_stream.buffer.store import open_writer

    w = open_writer(path, backend=backend, run_id="mp")
    done = w.num_groups()
    while done < n:
        k = min(per_append, n - done)
        groups = [make_group(done + i, version=(done + i) // version_every) for i in range(k)]
        w.append_groups(groups)
        done += k
    w.close()


def reader_worker(path: str, n: int, out_path: str, timeout_s: float) -> None:
    """Tail-follow until n groups are consumed; write 'gid:size:ok' lines to out_path."""
    from grpo_stream.buffer.cursor import GroupCursor
    from grpo_stream.buffer.store import open_reader

    deadline = time.monotonic() + timeout_s
    while True:  # the writer may not have created the store yet
        try:
            reader = open_reader(path)
            break
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    cur = GroupCursor(reader, poll_s=0.005)
    lines = []
    while cur.position < n:
        k = max(1, min(3, reader.refresh() - cur.position))
        groups, _ = cur.next_groups(min(k, n - cur.position), timeout_s=timeout_s)
        for g in groups:
            want = make_group(g[0].group_id, version=g[0].policy_version)
            ok = [s.completion_ids for s in g] == [s.completion_ids for s in want]
            lines.append(f"{g[0].group_id}:{len(g)}:{int(ok)}")
    with open(out_path, "w") as f:
        f.write("\n".join(lines))


def crash_writer_worker(path: str, backend: str, n_before: int, flag_path: str) -> None:
    """Append n_before groups, then start a large append and freeze halfway through it.

    The freeze point is inside the real write path (after half the payload bytes of a
    segment, or after some chunks of the zarr append), then the flag file is created and
    the process waits for the parent's SIGKILL.
    """
    from grpo_stream.buffer.store import open_writer

    w = open_writer(path, backend=backend, run_id="crash")
    for i in range(n_before):
        w.append_groups([make_group(i)])
    _freeze_midway(backend, flag_path)
    w.append_groups(make_groups(20, start=n_before, completion_len=400))
    sys.exit("unreachable: the freeze should have blocked")  # pragma: no cover


def _freeze_midway(backend: str, flag_path: str) -> None:
    def freeze() -> None:
        with open(flag_path, "w") as f:
            f.write(str(os.getpid()))
        while True:
            signal.pause()

    if backend == "arrow":
        from grpo_stream.buffer import fsutil

        def half_write(tmp, final, data, fsync=True):
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            freeze()

        fsutil.write_file_atomic = half_write  # how StoreFS.write_atomic publishes a segment
    else:
        from grpo_stream.buffer import zarr_io

        real, calls = zarr_io._put_atomic, [0]

        def some_chunks(path, data):
            calls[0] += 1
            if calls[0] > 4:  # a few chunks written, then die inside the next one
                with open(path.parent / f".{path.name}.frozen.tmp", "wb") as f:
                    f.write(bytes(data[: len(data) // 2]))
                freeze()
            real(path, data)

        zarr_io._put_atomic = some_chunks
