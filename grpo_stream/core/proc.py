"""Child-process helpers shared by `run` (orchestrate) and the vLLM launcher (serving.server).

    subprocess.Popen(argv, preexec_fn=die_with_parent, ...)   # no orphan if we die
    print(f"log tail:\\n{log_tail(path)}")                   # last lines of a child's log
    n = run_stoppable(generator)         # asyncio.run(generator.run()), SIGTERM/SIGINT stop it

It imports nothing from the project, so every layer may use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
from collections import deque
from pathlib import Path

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the thread that started it dies (Linux only;
    elsewhere a no-op, so a SIGKILLed parent may leave the child behind)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def log_tail(path: Path | str, lines: int = 30) -> str:
    """The last `lines` lines of a text log (streamed: a large log is not read whole)."""
    try:
        with open(path, errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))
    except OSError:
        return f"<no log at {path}>"


def run_stoppable(role) -> object:
    """`asyncio.run(role.run())` with SIGTERM and SIGINT calling `role.request_stop()`, so
    an asyncio process (generator, evaluator) ends its work cleanly when it is stopped."""

    async def main() -> object:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, role.request_stop)
        return await role.run()

    return asyncio.run(main())
