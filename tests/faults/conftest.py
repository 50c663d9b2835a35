"""The fault suite's session hooks: the table of cases (case, outcome, prompts lost,
groups duplicated) is printed at the end of the run and written to tests/faults/RESULTS.md.
The real vLLM server and the tiny model come from tests/conftest.py (shared by every case).
"""

from __future__ import annotations

import time
from pathlib import Path

from faults_harness import RESULTS

HERE = Path(__file__).resolve().parent


def _table() -> list[str]:
    lines = ["| case | outcome | prompts lost | duplicated |", "|---|---|---|---|"]
    lines += [f"| {c} | {o} | {lost} | {dup} |" for c, o, lost, dup in RESULTS]
    return lines


def pytest_terminal_summary(terminalreporter) -> None:
    if RESULTS:
        terminalreporter.write_sep("=", "fault injection: every prompt exactly once")
        for line in _table():
            terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus) -> None:
    if not RESULTS:
        return
    head = [
        "# Fault-injection results",
        "",
        "Written by `tests/faults/conftest.py` at the end of the last run of the suite "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Each case runs the real "
        "pipeline (tiny model, real vLLM CPU server, the `generate` and `learn` processes) "
        "and checks the buffer, the ledger (`grpo-stream buffer ledger RUN`) and the "
        "checkpoints. Prompts lost: started but in no state; duplicated: groups beyond "
        "one per prompt plus prompts in two states.",
        "",
    ]
    (HERE / "RESULTS.md").write_text("\n".join(head + _table()) + "\n")
