"""gradaudit on the reference agents: every buggy variant flagged with its rule, every clean one silent."""

from pathlib import Path

import pytest

from reference_agents.demo import CASES

REPO = Path(__file__).parents[2]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.agent}-{c.variant}")
def test_agent_variant_audit(gradaudit_cli, case, monkeypatch):
    monkeypatch.chdir(REPO)
    result = gradaudit_cli("run", "-m", f"reference_agents.{case.agent}", "--", "--variant", case.variant, "--quiet")
    assert result.report is not None, result.output
    found = sorted({f["rule"] for f in result.at_least_warning()})
    assert found == sorted(case.expected), result.report["findings"]
    assert result.report["window"]["stopped_by"] == "iterations"
    for finding in result.at_least_warning():
        assert finding["location"]["file"] == f"reference_agents/{case.agent}.py"
