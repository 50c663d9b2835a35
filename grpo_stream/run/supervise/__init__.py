"""`run`'s supervision of its children: restart policy, child processes, server restarts.

    from grpo_stream.run.supervise import Commands, Supervisor
    sup = Supervisor(cfg, run_dir, Commands(...)); sup.servers = servers; sup.start()
    code = sup.run(); sup.shutdown()

`policy` (crash window, RUN/supervisor.jsonl), `child` (one child process), `servers`
(restart and re-sync a vLLM server), `loop` (the watch). It sits at the top with `cli`
and `orchestrate`: it may import every layer below.
"""

from grpo_stream.run.supervise.child import Child
from grpo_stream.run.supervise.loop import Commands, Supervisor
from grpo_stream.run.supervise.policy import CrashWindow, SupervisorLog, may_restart

__all__ = ["Child", "Commands", "CrashWindow", "Supervisor", "SupervisorLog", "may_restart"]
