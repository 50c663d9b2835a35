"""Product modules hold no code that only tests use: what a test needs beyond the
product's own API lives in tests/unit/*_helpers.py.

Each entry was once a product function or attribute that nothing but a test called;
the test support that replaced it is named beside it, and must exist."""

from __future__ import annotations

import importlib

import pytest

MOVED = [  # (product module, name no longer there, the helper now in tests/unit)
    ("grpo_stream.run.orchestrate", "_supervise", "supervise_helpers:supervise"),
    ("grpo_stream.tasks.runner", "score_group", "reward_helpers:score_group"),
    ("grpo_stream.tasks", "score_group", "reward_helpers:score_group"),
    ("grpo_stream.config.sync_mode", "is_sync_mode", None),  # no test used it
]


@pytest.mark.parametrize(("module", "name", "helper"), MOVED)
def test_test_only_code_lives_in_the_tests(module, name, helper):
    assert not hasattr(importlib.import_module(module), name), f"{module}.{name}"
    if helper is not None:
        mod, attr = helper.split(":")
        assert callable(getattr(importlib.import_module(mod), attr))


def test_step_runner_has_no_test_switch_for_the_proximal_pass(tiny_model_dir):
    from learner_helpers import step_setup

    _, _, runner, _, _ = step_setup(tiny_model_dir)
    assert not hasattr(runner, "proximal_pass")  # tests use learner_helpers.OwnProximalPassRunner
