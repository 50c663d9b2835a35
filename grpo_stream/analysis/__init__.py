"""Reading finished (or running) runs: plots, sweeps and comparisons across runs.

`plot` and `timing_plot` draw one run's curves; `sweep` runs one `grpo-stream run` per
grid point; `compare` (with `compare_plot` and `compare_table`) sets runs side by side.
"""
