"""grpo-stream: GRPO as an asynchronous streaming pipeline on stock vLLM.

The packages, lowest layer first (`docs/architecture.md` draws them, and
`tests/unit/test_layers.py` keeps the allow-list): `core`, `config`, `serving` (the one
vLLM client, the server launcher, model preparation), `algo`, `buffer`, `tasks`,
`sync`, the roles `generator`, `learner` and `eval`, then `run` (supervision,
preflight, the ledger), `analysis` (plots, sweeps, comparisons) and `cli`.
"""
