"""How many rows `retort data demo` and `retort demo` write per domain (light: the CLI imports it)."""

from __future__ import annotations

from typing import NamedTuple


class DemoRows(NamedTuple):
    train: int  # SFT
    eval: int  # held out
    rl: int  # GRPO's own problems


DEMO_ROWS = DemoRows(train=3000, eval=40, rl=1000)
