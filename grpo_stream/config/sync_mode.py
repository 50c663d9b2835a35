"""`grpo-stream run --sync`: synchronous GRPO on the same processes, the async baseline.

Synchronous GRPO generates a batch, trains on it, syncs the weights, and repeats. The
project gets it from the very same generator, learner, buffer and servers by closing
the pipeline's slack to zero:

- `generator.max_ahead_batches = 0`: the staleness gate (`generator/gate.py`) lets the
  generator hold at most `consumed_groups + learner.batch_groups` groups, i.e. exactly
  one batch the learner has not consumed;
- the learner publishes `consumed_groups` (`BUFFER/consumers/learner.json`) only after
  the step's weight sync returned (`learner/loop.py: _after_step`), so the generator
  starts batch k+1 only once the servers serve the weights trained on batch k;
- `sync.every = 1`: every step is followed by a sync;
- `learner.max_staleness = 0`: a sample from an older version would be dropped (none
  arrives: the gate above guarantees version-0 lag; a drop would show in
  `stale_groups_dropped`).

So `--sync` is `run` with those three overrides and nothing else: an async run with the
same three values trains on the same batches (tests/integration/test_sync_mode.py).
The learner's `wait_s` then holds the whole generation time of each batch, and the
servers sit idle while the learner trains: the timing records (`grpo_stream.core.timing`)
show both.

    cfg = apply_sync_mode(cfg)      # before the run folder's config.toml is written
"""

from __future__ import annotations

from grpo_stream.config import Config

SYNC_OVERRIDES = {
    ("generator", "max_ahead_batches"): 0,
    ("learner", "max_staleness"): 0,
    ("sync", "every"): 1,
}


def apply_sync_mode(cfg: Config) -> Config:
    """`cfg` with the synchronous-mode overrides set (in place; returned for chaining)."""
    for (section, field), value in SYNC_OVERRIDES.items():
        setattr(getattr(cfg, section), field, value)
    return cfg
