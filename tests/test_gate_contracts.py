"""Gradient contracts in pyproject.toml: GA401 missing route, GA402 forbidden route, GA403 wrong owner; SARIF."""

from __future__ import annotations

import json
import shutil

import jsonschema
import pytest

from tests.conftest import FIXTURES, fixture_line
from tests.test_gate import SCRIPT, edit, gradaudit

CONTRACTS = """[tool.gradaudit]
contracts = [
  { loss = "critic_loss", reaches = ["encoder", "critic"] },
  { loss = "actor_loss", avoids = ["encoder"] },
  { group = "encoder", stepped-by = "critic_optimizer" },
]
"""
# The OASIS SARIF 2.1.0 schema (final, rtm.5), vendored from the npm package @microsoft/jest-sarif 1.0.0-beta.0 (MIT).
SCHEMA = json.loads((FIXTURES.parent / "schemas" / "sarif-schema-2.1.0.json").read_text())


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copy(FIXTURES / SCRIPT, tmp_path / SCRIPT)
    (tmp_path / "pyproject.toml").write_text(CONTRACTS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def contract_line(project, text: str) -> int:
    return next(n for n, line in enumerate((project / "pyproject.toml").read_text().splitlines(), 1) if text in line)


def audit(project) -> list[dict]:
    gradaudit("run", SCRIPT, "-q", "--json", "report.json", "--sarif", "report.sarif")
    sarif = json.loads((project / "report.sarif").read_text())
    jsonschema.validate(sarif, SCHEMA)
    return [f for f in json.loads((project / "report.json").read_text())["findings"] if f["rule"].startswith("GA4")]


def test_contracts_hold_on_the_fixed_program(project):
    assert audit(project) == []


def test_missing_route_ga401(project):
    edit(project, "critic(features).pow(2)", "critic(features.detach()).pow(2)")
    edit(project, "head(features)", "head(features.detach())")
    (finding,) = audit(project)
    assert (finding["rule"], finding["subject"]) == ("GA401", "critic_loss -> encoder")
    assert finding["location"] == {"file": SCRIPT, "line": fixture_line(SCRIPT, "critic backward")}
    assert finding["related"] == [{"file": "pyproject.toml", "line": contract_line(project, '"critic_loss"')}]


def test_forbidden_route_ga402(project):
    edit(project, "actor(features.detach())", "actor(encoder(obs))")
    (finding,) = audit(project)
    assert (finding["rule"], finding["subject"]) == ("GA402", "actor_loss -> encoder")
    assert finding["location"] == {"file": SCRIPT, "line": fixture_line(SCRIPT, "actor input")}  # the term
    assert finding["related"] == [{"file": "pyproject.toml", "line": contract_line(project, '"actor_loss"')}]


def test_wrong_owner_ga403_with_sarif_locations(project):
    edit(project, "[*critic.parameters(), *encoder.parameters()]", "critic.parameters()")
    edit(project, "SGD(actor.parameters()", "SGD([*actor.parameters(), *encoder.parameters()]")
    (finding,) = audit(project)
    assert (finding["rule"], finding["subject"]) == ("GA403", "encoder")
    assert "actor_optimizer" in finding["message"] and "'critic_optimizer' must step it" in finding["message"]
    owner = fixture_line(SCRIPT, "owner") + 1  # the actor's optimizer, created on the next line
    assert finding["location"] == {"file": SCRIPT, "line": owner}
    (result,) = [
        r for r in json.loads((project / "report.sarif").read_text())["runs"][0]["results"] if r["ruleId"] == "GA403"
    ]
    assert result["level"] == "error"
    physical = result["locations"][0]["physicalLocation"]
    assert physical["artifactLocation"] == {"uri": SCRIPT, "uriBaseId": "%SRCROOT%"}
    assert physical["region"] == {"startLine": owner}
    related = result["relatedLocations"][0]["physicalLocation"]
    assert related["artifactLocation"]["uri"] == "pyproject.toml"
    assert related["region"]["startLine"] == contract_line(project, 'group = "encoder"')


def test_contract_naming_an_unseen_loss_is_ga401(project):
    (project / "pyproject.toml").write_text(
        '[tool.gradaudit]\ncontracts = [{ loss = "value_loss", reaches = ["critic"] }]\n'
    )
    (finding,) = audit(project)
    assert (finding["rule"], finding["subject"]) == ("GA401", "value_loss")
    assert finding["location"] == {"file": "pyproject.toml", "line": 2}


def test_sarif_carries_the_rule_catalog(project):
    gradaudit("run", SCRIPT, "-q", "--sarif", "report.sarif")
    run = json.loads((project / "report.sarif").read_text())["runs"][0]
    rules = {rule["id"]: rule for rule in run["tool"]["driver"]["rules"]}
    assert rules["GA201"]["defaultConfiguration"]["level"] == "warning"
    assert "no optimizer" in rules["GA201"]["help"]["text"]
    (result,) = run["results"]
    assert run["tool"]["driver"]["rules"][result["ruleIndex"]]["id"] == result["ruleId"] == "GA201"
    assert result["partialFingerprints"]["gradaudit/v1"]


@pytest.mark.parametrize(
    ("contracts", "said"),
    [
        ('[{ loss = "critic_loss" }]', "says neither what it reaches nor what it avoids"),
        ('[{ group = "encoder" }]', "lacks stepped-by"),
        ('[{ loss = "critic_loss", reaches = ["critic"], owner = "x" }]', "contract key 'owner' is unknown"),
    ],
)
def test_bad_contract_is_exit_2(project, contracts, said):
    (project / "pyproject.toml").write_text(f"[tool.gradaudit]\ncontracts = {contracts}\n")
    result = gradaudit("run", SCRIPT, "-q")
    assert result.exit_code == 2 and said in result.output
