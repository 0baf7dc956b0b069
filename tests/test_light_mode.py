"""Light mode (`gradaudit run --light`): lifecycle, membership and reachability findings as in the full audit."""

import pytest
import torch
from torch import nn

import gradaudit
from gradaudit.report import build_report

LIFECYCLE = ("GA201", "GA202", "GA203", "GA204", "GA205", "GA305")
"""What light mode keeps: the lifecycle and membership rules, and non-finite losses and gradients (GA305's loss
finding is placed at the backward, not at the op that made the NaN: light mode does not trace ops)."""

CASES = [
    ("encoder_layout.py", "--layout", "encoder-in-actor"),
    ("encoder_layout.py", "--layout", "encoder-orphan"),
    ("encoder_layout.py", "--layout", "fixed"),
    ("unused_head.py", "--bug"),
    ("two_optimizers.py", "--bug"),
    ("zero_grad_missing.py", "--bug"),
    ("frozen_backbone.py",),
    ("cvar_constraint.py", "--bug"),
    ("grad_accumulation.py", "--zero-grad-inside"),
    ("nan_loss.py", "--bug"),
    ("dqn.py", "--bug"),
    ("closure.py",),
]


def _lifecycle(findings: list[dict]) -> list[tuple[str, str, object]]:
    return sorted(
        (f["rule"], f["subject"], f["location"]["line"] if f["location"] and f["rule"] != "GA305" else None)
        for f in findings
        if f["rule"].startswith(LIFECYCLE)
    )


@pytest.mark.parametrize("case", CASES, ids=lambda case: " ".join(case))
def test_light_mode_reports_the_lifecycle_findings_of_the_full_audit(gradaudit_cli, case):
    script, *args = case
    full = gradaudit_cli("run", script, "--", *args)
    light = gradaudit_cli("run", script, "--light", "--", *args)
    assert light.report["light"] and not full.report["light"]
    assert _lifecycle(light.report["findings"]) == _lifecycle(full.report["findings"])
    assert all(f["rule"].startswith((*LIFECYCLE, "GA101")) for f in light.report["findings"])


def test_lifecycle_fixtures_have_lifecycle_findings(gradaudit_cli):
    """The comparison above is not vacuous: the buggy fixtures do have lifecycle findings."""
    assert _lifecycle(gradaudit_cli("run", "zero_grad_missing.py", "--light", "--", "--bug").report["findings"])
    assert _lifecycle(gradaudit_cli("run", "two_optimizers.py", "--light", "--", "--bug").report["findings"])


def test_light_mode_says_it_did_not_trace_the_op_behind_a_nan_loss(gradaudit_cli):
    result = gradaudit_cli("run", "nan_loss.py", "--light", "--", "--bug")
    loss = [f for f in result.report["findings"] if f["rule"] == "GA305" and f["subject"] == "loss"]
    assert loss and "light mode did not trace" in loss[0]["message"]


def test_light_mode_splits_the_loss_by_the_graph(gradaudit_cli):
    """Without provenance the terms are found by reachability: the unused head's term reaches only its head."""
    result = gradaudit_cli("run", "unused_head.py", "--light")
    reached = {group["group"]: group["reached_by"] for group in result.report["groups"]}
    assert reached == {"policy": ["loss[0]"], "value_head": ["loss[1]"]}


def test_a_wide_graph_beyond_the_node_limit_is_audited_and_said_to_be_cut():
    """`--max-nodes` bounds the walk of a wide graph; the report says the walk stopped, lifecycle rules still hold."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.ones(())) for _ in range(10)]
    optimizer = torch.optim.SGD(params, lr=0.1)
    with gradaudit.audit(light=True, max_nodes=1_000) as audit:
        loss = torch.stack([params[i % 10] * 2.0 for i in range(5_000)]).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    (backward,) = audit.trace.backwards
    assert backward.walk_truncated and audit.trace.window.internal_errors == 0
    assert audit.findings == []  # every parameter received gradient, read during the real backward
    assert any("larger than gradaudit walks" in note for note in build_report(audit.trace, audit.findings)["notes"])
