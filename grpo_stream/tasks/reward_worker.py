"""Worker processes that run user reward functions, killed and restarted on timeout.

User functions (import paths) may hang, leak or crash, so they never run in the
generator: each `_Worker` is a spawned process that imports the functions once, then
answers `(call_id, ref, completions, prompt, kwargs)` requests over a pipe with one
outcome per completion. The parent waits at most `timeout` for the answer, in a
dedicated thread pool (so a hang never blocks the event loop or the default executor);
on timeout, death or cancellation it kills the process, and the worker is restarted
before its next call. Replies carry the call id, so a late answer is never mistaken for
the next one. A watchdog thread ends a worker whose parent died.

    pool = WorkerPool([(key, ref, kwargs), ...], size=2, startup_timeout=60)
    errors = await pool.start()          # {key: why it could not be loaded}
    outcomes = await pool.call(ref, completions, prompt, kwargs, timeout=5.0)
    await pool.aclose()
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from grpo_stream.tasks.reward_registry import (
    Outcome,
    call_reward,
    check_kwargs,
    describe,
    load_function,
    reward_kind,
)

Spec = tuple[str, str, dict[str, Any]]  # (component key, import ref, kwargs)
_PARENT_CHECK_S = 1.0


def _exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _load(specs: list[Spec]) -> tuple[dict[str, Any], dict[str, str]]:
    fns: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for key, ref, kwargs in specs:
        try:
            fns[ref] = load_function(ref)
        except BaseException as e:  # a user module may even call sys.exit on import
            errors[key] = f"cannot load {ref!r}: {describe(e)}"
            continue
        problem = check_kwargs(fns[ref], kwargs)
        if problem:
            errors[key] = f"bad kwargs for {ref!r}: {problem}"
    return fns, errors


def worker_main(conn: Any, specs: list[Spec], parent_pid: int) -> None:
    """Entry point of a worker process: load the functions, then serve calls until EOF."""
    _exit_with_parent(parent_pid)
    fns, errors = _load(specs)
    conn.send(("ready", errors))
    while True:
        try:
            call_id, ref, completions, prompt, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        fn = fns[ref]
        conn.send((call_id, call_reward(fn, reward_kind(fn), completions, prompt, kwargs)))


class _Worker:
    """One worker process and its pipe; every method blocks (run them in threads)."""

    def __init__(self, specs: list[Spec], startup_timeout: float) -> None:
        self.specs = specs
        self.startup_timeout = startup_timeout
        self.proc: Any = None
        self.conn: Any = None
        self.killed = False  # set at once by kill(); is_alive() lags behind SIGKILL

    @property
    def alive(self) -> bool:
        return not self.killed and self.proc is not None and self.proc.is_alive()

    def start(self) -> dict[str, str]:
        ctx = multiprocessing.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe()
        proc = ctx.Process(
            target=worker_main,
            args=(child_conn, self.specs, os.getpid()),
            name="grpo-reward-worker",
            daemon=True,
        )
        proc.start()
        self.killed = False
        child_conn.close()  # so the parent sees EOF when the worker dies
        self.proc, self.conn = proc, parent_conn
        if not parent_conn.poll(self.startup_timeout):
            self.stop()
            raise TimeoutError(f"reward worker not ready after {self.startup_timeout}s")
        try:
            _, errors = parent_conn.recv()
        except (EOFError, OSError):
            code = proc.exitcode
            self.stop()
            raise RuntimeError(f"reward worker exited while starting (exit code {code})") from None
        return errors

    def call(self, request: tuple, timeout: float) -> tuple[str, Any]:
        """("ok", outcomes) | ("timeout", None) | ("died", reason)."""
        conn, proc, call_id = self.conn, self.proc, request[0]  # stop() may reset them
        deadline = time.monotonic() + timeout
        try:
            conn.send(request)
            while (remaining := deadline - time.monotonic()) > 0:
                if not conn.poll(remaining):
                    break
                reply_id, payload = conn.recv()
                if reply_id == call_id:
                    return "ok", payload
                # a reply to an abandoned call: drop it
        except (EOFError, OSError):
            proc.join(1.0)
            return "died", f"worker process died (exit code {proc.exitcode})"
        return "timeout", None

    def kill(self) -> None:
        self.killed = True
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()

    def stop(self) -> None:
        self.kill()
        if self.proc is not None:
            self.proc.join(5.0)
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None


class WorkerPool:
    """`size` workers for one set of functions; one call per worker at a time."""

    def __init__(self, specs: list[Spec], size: int, startup_timeout: float) -> None:
        self._workers = [_Worker(specs, startup_timeout) for _ in range(size)]
        # dedicated threads: a waiting call never starves asyncio.to_thread users
        self._threads = ThreadPoolExecutor(2 * size, thread_name_prefix="grpo-reward")
        self._idle: asyncio.Queue[_Worker] | None = None
        self._ids = itertools.count()

    async def _blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    async def start(self) -> dict[str, str]:
        """Start every worker; the load errors by component key (empty: all loaded)."""
        results = await asyncio.gather(
            *(self._blocking(w.start) for w in self._workers), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                await self.aclose()
                raise result
        self._idle = asyncio.Queue()
        for worker in self._workers:
            self._idle.put_nowait(worker)
        return results[0]

    async def call(
        self, ref: str, completions: list[str], prompt: Any, kwargs: dict, timeout: float
    ) -> list[Outcome]:
        """One outcome per completion; a timeout or crash fails them all, with the reason."""
        assert self._idle is not None, "WorkerPool.start() was not awaited"
        worker = await self._idle.get()
        try:
            return await self._call_on(worker, (ref, completions, prompt, kwargs), timeout)
        finally:
            self._idle.put_nowait(worker)

    async def _call_on(self, worker: _Worker, args: tuple, timeout: float) -> list[Outcome]:
        n = len(args[1])
        if not worker.alive:
            try:
                await self._blocking(_restart, worker)
            except Exception as e:
                return [f"reward worker restart failed: {describe(e)}"] * n
        try:
            status, payload = await self._blocking(worker.call, (next(self._ids), *args), timeout)
        except asyncio.CancelledError:
            worker.kill()  # unblocks the waiting thread; restarted before its next call
            raise
        if status == "ok":
            return payload
        worker.kill()
        return [f"timed out after {timeout:g}s" if status == "timeout" else payload] * n

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)


def _restart(worker: _Worker) -> None:
    worker.stop()
    worker.start()
