"""Running a whole job: start, supervise and stop every process, and account for it.

`orchestrate` is `grpo-stream run`; `supervise/` restarts crashed children; `doctor`
and `doctor_checks` are the preflight; `ledger` joins the run's records into the
exactly-once ledger; `timing_summary` is the run's closing summary of where time went.
Imports the roles below it; nothing below imports it.
"""
