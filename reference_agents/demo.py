"""The reference-agent variants `make demo` audits, with the rules each must be flagged with.

`python -m reference_agents.demo` is `gradaudit demo`: it audits each variant in its own process and writes the
HTML gallery (gradaudit/demo.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    agent: str
    variant: str
    expected: tuple[str, ...]
    """Rule codes expected at warning or above; () for a clean variant."""


CASES = (
    Case("distributional_ppo", "fixed", ()),
    Case("distributional_ppo", "cvar-empirical", ("GA101",)),
    Case("lapo", "fixed", ()),
    Case("lapo", "encoder-in-actor", ("GA203",)),
    Case("lapo", "encoder-orphan", ("GA201",)),
    Case("cpql", "single_step", ()),
    Case("cpql", "last_5", ()),
    Case("cpql", "whole_grad", ()),
    Case("calf", "fixed", ()),
    Case("calf", "constraint-nograd", ("GA101",)),
)


if __name__ == "__main__":
    from gradaudit.demo import run_demo

    sys.exit(run_demo(Path("reports")))
