"""Test support for `run`'s supervisor: watch children a test started itself.

    from supervise_helpers import supervise
    learner = Child("learner", argv, tmp_path / "learner.log", echo=False)
    assert supervise(learner, generator, servers=[]) == 0

`run` itself builds its `Supervisor` from the run's commands (`run.orchestrate`); a test
that only needs the watch loop hands it processes it made, and nothing is restarted.
"""

from __future__ import annotations

from grpo_stream.config import Config
from grpo_stream.run.supervise import Child, Supervisor


def supervise(learner: Child, generator: Child, servers, evaluator: Child | None = None) -> int:
    """`Supervisor.run` over started children, restarting none (run.max_restarts = 0)."""
    cfg = Config()
    cfg.run.max_restarts = 0
    sup = Supervisor(cfg, None)
    sup.learner, sup.generator, sup.evaluator, sup.servers = learner, generator, evaluator, servers
    return sup.run()
