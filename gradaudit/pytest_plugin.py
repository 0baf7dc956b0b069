"""The pytest plugin (entry point `pytest11`): a `gradaudit` fixture that audits what runs in `with gradaudit:`.

```python
def test_critic_update_trains_the_encoder(gradaudit):
    with gradaudit:
        agent.update(batch)
    gradaudit.assert_clean()
    gradaudit.assert_routes("critic_loss", reaches=["obs_encoder", "critic"], avoids=["actor"])
    gradaudit.assert_matches_baseline("tests/baselines/critic_update.json")
```

`pytest --gradaudit-update-baseline` writes the baselines instead of comparing against them.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import pytest

from gradaudit import gate
from gradaudit.contracts import Contract
from gradaudit.findings import Finding, Severity
from gradaudit.report.console import render_findings
from gradaudit.rules import run_rules
from gradaudit.trace import Location, Trace

_WIDTH = 120


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("gradaudit").addoption(
        "--gradaudit-update-baseline",
        action="store_true",
        help="gradaudit fixture: write the baselines of assert_matches_baseline instead of comparing",
    )


def _failure(title: str, findings: Iterable[Finding], *lines: str) -> str:
    stream = io.StringIO()
    render_findings([f.to_dict() for f in findings], stream, width=_WIDTH)
    return "\n".join([title, stream.getvalue().rstrip(), *lines]).rstrip()


class GradauditFixture:
    """Audits the `with` block (every backward, optimizer step and gradient wipe in it), then checks it."""

    def __init__(self, program: str, update_baselines: bool) -> None:
        self._program, self._update_baselines = program, update_baselines
        self._audit = None

    def __enter__(self) -> GradauditFixture:
        from gradaudit.capture import Audit

        self._audit = Audit(program=self._program)
        self._audit.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        assert self._audit is not None
        return self._audit.__exit__(exc_type, exc, tb)

    @property
    def trace(self) -> Trace:
        if self._audit is None or self._audit.trace is None:
            raise RuntimeError("gradaudit audited nothing yet: run the training code inside `with gradaudit:`")
        return self._audit.trace

    @property
    def findings(self) -> list[Finding]:
        self.trace  # noqa: B018 - says when nothing was audited
        assert self._audit is not None
        return self._audit.findings

    def assert_clean(self, fail_on: str = "warning") -> None:
        """No finding at or above `fail_on` (info, warning, error)."""
        failing = [f for f in self.findings if f.severity >= Severity[fail_on]]
        if failing:
            pytest.fail(_failure(f"gradaudit: {len(failing)} finding(s) at or above {fail_on}", failing), False)

    def assert_routes(self, term: str, reaches: Iterable[str] = (), avoids: Iterable[str] = ()) -> None:
        """The loss `term` (a term's printed name or the loss variable) sends gradient to every group of
        `reaches` and to none of `avoids`: a gradient contract (GA401, GA402) checked on this block."""
        caller = inspect.stack()[1]
        contract = Contract(Location(caller.filename, caller.lineno), term, tuple(reaches), tuple(avoids))
        declare = gate.declarations_for([contract], None)
        assert declare is not None
        broken = run_rules(self.trace, select=("GA401", "GA402"), declarations=declare(self.trace))
        if broken:
            pytest.fail(_failure(f"gradaudit: the routes of `{term}` break the contract", broken), False)

    def assert_matches_baseline(self, path: str | Path) -> None:
        """No finding that `path` does not hold and no gradient regression against it (GA103, GA207, GA208,
        GA307); with `pytest --gradaudit-update-baseline`, writes `path` from this block instead."""
        path = Path(path)
        if self._update_baselines:
            gate.write_baseline(path, self.findings, gate.trace_stats(self.trace))
            return
        try:
            baseline = gate.read_baseline(path)
        except gate.BaselineError as exc:
            pytest.fail(f"gradaudit: {exc} (pytest --gradaudit-update-baseline writes it)", False)
        declare = gate.declarations_for([], baseline)
        assert declare is not None
        regressions = run_rules(
            self.trace, select=("GA103", "GA207", "GA208", "GA307"), declarations=declare(self.trace)
        )
        comparison = gate.compare([*self.findings, *regressions], baseline)
        if comparison.new:
            lines = gate.comparison_lines(comparison, path)
            pytest.fail(
                _failure(f"gradaudit: {len(comparison.new)} new finding(s) against {path}", comparison.new, *lines),
                False,
            )


@pytest.fixture
def gradaudit(request: pytest.FixtureRequest) -> GradauditFixture:
    """Audits the training code run inside `with gradaudit:`; then assert_clean, assert_routes,
    assert_matches_baseline."""
    return GradauditFixture(request.node.nodeid, request.config.getoption("--gradaudit-update-baseline"))
