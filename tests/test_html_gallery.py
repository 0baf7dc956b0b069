"""The committed gallery (reports/) says what the code finds now: the findings, not the bytes, of every variant."""

from pathlib import Path

import pytest

from gradaudit.demo import report_name
from gradaudit.report.html import read_embedded_report
from reference_agents.demo import CASES

REPO = Path(__file__).parents[1]
REPORTS = REPO / "reports"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.agent}-{c.variant}")
def test_committed_report_has_todays_findings(gradaudit_cli, case, monkeypatch):
    committed = REPORTS / report_name(case)
    assert committed.exists(), f"{committed} is missing: run `make reports`"
    monkeypatch.chdir(REPO)
    result = gradaudit_cli("run", "-m", f"reference_agents.{case.agent}", "--", "--variant", case.variant, "--quiet")
    stale = "the committed gallery is stale: run `make reports` and commit reports/"
    assert read_embedded_report(committed.read_text())["findings"] == result.report["findings"], stale


def test_index_links_every_variant():
    index = (REPORTS / "index.html").read_text()
    for case in CASES:
        assert f'<a href="{report_name(case)}">report</a>' in index
