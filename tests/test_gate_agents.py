"""The project's own CI gate (`make gate`): `gradaudit check` holds every reference-agent variant to its baseline
under reports/baselines/, LAPO to its encoder contract."""

import json
import subprocess
import sys
from pathlib import Path

from reference_agents.demo import CASES

REPO = Path(__file__).parents[1]


def test_reference_agents_pass_the_gate(tmp_path):
    sarif = tmp_path / "gate.sarif"
    completed = subprocess.run(
        [sys.executable, "-m", "gradaudit", "check", "--sarif", str(sarif)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    for case in CASES:
        assert f"{case.agent}-{case.variant}" in completed.stdout
    results = json.loads(sarif.read_text())["runs"][0]["results"]
    audits = {(r["properties"]["audit"], r["ruleId"]) for r in results}
    assert ("lapo-encoder-in-actor", "GA403") in audits  # the contract the variant breaks, locked in its baseline
    assert not any(audit == "lapo-fixed" for audit, _ in audits)


def test_each_buggy_variant_baseline_locks_its_rules():
    for case in CASES:
        locked = json.loads((REPO / "reports" / "baselines" / f"{case.agent}-{case.variant}.json").read_text())
        rules = {f["rule"] for f in locked["findings"]}
        assert set(case.expected) <= rules
    in_actor = json.loads((REPO / "reports" / "baselines" / "lapo-encoder-in-actor.json").read_text())
    assert {(f["rule"], f["subject"]) for f in in_actor["findings"]} >= {("GA403", "obs_encoder")}
