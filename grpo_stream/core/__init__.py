"""The bottom layer: what every other package may use and which imports no other layer.

Errors (`errors`), atomic publication (`atomic`), child processes (`proc`), the one JSONL
reader and writer (`jsonl`), metric names and the per-step metrics writer
(`metric_names`, `metrics`), phase timers and busy clocks (`timing`), and the learner's
published progress file that the generator's gate reads (`progress`).
"""
