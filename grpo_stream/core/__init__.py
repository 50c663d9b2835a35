"""The bottom layer: what every other package may use and which imports no other layer.

Errors (`errors`), atomic publication (`atomic`), child processes (`proc`), the one JSONL
reader and writer (`jsonl`), metric names and the per-step metrics writer
(`metric_names`, `metrics`), phase timers and busy clocks (`timing`), and the files the
processes publish to each other: the learner's progress the generator's gate reads
(`progress`), the evaluator's the learner waits on (`eval_progress`), why a generator
stopped (`generator_end`), and the run folder's records the ledger joins
(`run_records`).
"""
