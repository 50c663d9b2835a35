"""Variant lookup shared by every algo table.

Each algo module keeps a plain ``dict`` from a `LossConfig` string to a function; the
loss picks the function with `choose`, so adding a variant is one entry in a table,
never another branch in an if-chain. An unknown name is a user error and the message
names the config field:

    fn = choose(AGGREGATIONS, "loss.aggregation", cfg.aggregation)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

F = TypeVar("F")


def choose(table: Mapping[str, F], field: str, name: str) -> F:
    """Return ``table[name]``; raise ValueError naming `field` and the choices otherwise."""
    try:
        return table[name]
    except (KeyError, TypeError):
        choices = ", ".join(repr(k) for k in sorted(table))
        raise ValueError(f"{field}: unknown {name!r} (choose from {choices})") from None
