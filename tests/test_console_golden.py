"""The console report at 80 and 120 columns with installed-package paths (golden files); internal errors.

Regenerate the golden files after an intended change of layout: `GRADAUDIT_UPDATE_GOLDEN=1 pytest tests/test_console_golden.py`.
"""

import io
import os
from pathlib import Path

import pytest

from gradaudit.findings import Finding, Severity
from gradaudit.report import build_report, console
from gradaudit.trace import (
    Backward,
    Chain,
    ChainCall,
    Clamp,
    Exp,
    GradEvent,
    Location,
    Optimizer,
    Parameter,
    Term,
    Trace,
    Window,
)

GOLDEN = Path(__file__).parent / "golden"
PPO = "stable_baselines3/ppo/ppo.py"
DISTRIBUTIONS = "stable_baselines3/common/distributions.py"


def library_trace(name: str = "policy.mlp_extractor.value_net", internal_errors: int = 3) -> Trace:
    """A PPO-like run inside an installed library: long paths, dotted group names, one orphan head."""
    groups = ["policy.mlp_extractor.policy_net", name, "policy.action_net"]
    terms = [
        Term("policy_loss", Location(PPO, 241), False, groups[::2], {groups[0]: 0.0825, groups[2]: 0.04}),
        Term("self.vf_coef * value_loss", Location(PPO, 256), False, groups[1:2], {groups[1]: 18.8}),
    ]
    return Trace(
        program="train_cartpole.py",
        window=Window(3, "iterations", internal_errors=internal_errors),
        parameters=[
            Parameter(f"{group}.{tensor}", group, [64, 64], True, [] if group == name else [0])
            for group in groups
            for tensor in ("weight", "bias")
        ],
        optimizers=[Optimizer(0, "policy.optimizer", "Adam", Location("stable_baselines3/common/policies.py", 571), 3)],
        backwards=[Backward(0, Location(PPO, 275), True, True, terms, groups)],
        events=[GradEvent(i, "accumulate", f"{group}.weight", backward=0, norm=1.5) for i, group in enumerate(groups)],
        chains=[
            Chain(
                "policy.features_extractor.cell",
                0,
                Location("stable_baselines3/common/torch_layers.py", 118),
                [ChainCall(True, True, 8.0, 1.0), ChainCall(True, True, 2.0, 1.0), ChainCall(True, False, 1.0, 1.0)],
            )
        ],
        clamps=[
            Clamp(
                "clamp",
                Location(PPO, 226),
                "th.clamp(ratio, 1 - clip_range, 1 + clip_range)",
                0,
                0.8,
                1.2,
                32,
                0.1,
                0.6,
            )
        ],
        exps=[Exp("exp", Location(DISTRIBUTIONS, 165), "log_std.exp()", 0, "float32", 0.33, 1.4, 0, 32)],
    )


def library_findings(name: str = "policy.mlp_extractor.value_net") -> list[Finding]:
    return [
        Finding(
            "GA201",
            "orphan-param",
            Severity.warning,
            name,
            f"{name} (2 tensors: {name}.weight, {name}.bias) receives gradient (the backward at {PPO}:275) but no "
            "optimizer holds it, so it never learns",
            Location(PPO, 275),
            "add the parameters to the optimizer that should train them, or freeze them with requires_grad_(False)",
        ),
        Finding(
            "GA102",
            "zero-grad-term",
            Severity.info,
            "self.ent_coef * entropy_loss",
            "the loss term `self.ent_coef * entropy_loss` is multiplied by a zero coefficient: its gradient is zero in "
            "all 4 backward passes seen",
            Location(PPO, 256),
            "check the coefficient and whether the term's clamp or mask is ever active",
        ),
    ]


def rendered(report: dict, width: int) -> str:
    stream = io.StringIO()
    console.render(report, stream, width=width)
    return stream.getvalue()


@pytest.mark.parametrize("width", [80, 120])
def test_console_matches_golden(width):
    text = rendered(build_report(library_trace(), library_findings()), width)
    golden = GOLDEN / f"console_{width}.txt"
    if os.environ.get("GRADAUDIT_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    assert max(len(line) for line in text.splitlines()) <= width


def test_narrow_console_prints_findings_as_blocks_with_the_whole_message():
    text = rendered(build_report(library_trace(), library_findings()), 80)
    lines = text.splitlines()
    head = lines.index(f"{PPO}:275: GA201 warning policy.mlp_extractor.value_net")
    assert lines[head + 1] == "    policy.mlp_extractor.value_net (2 tensors:"
    assert "never learns" in " ".join(lines[head + 1 : head + 5])
    assert f"{DISTRIBUTIONS}:165: exp log_std.exp()" in lines


def test_wide_console_keeps_the_findings_table():
    text = rendered(build_report(library_trace(), library_findings()), 120)
    assert "┃ code    ┃ subject" in text
    assert f"│ {PPO}:275 │" in text


def test_internal_errors_are_shown_and_written():
    report = build_report(library_trace(internal_errors=3), [])
    assert report["internal_errors"] == 3
    assert "gradaudit: 3 internal error(s) in its hooks: the audit is partial" in rendered(report, 120)
    clean = build_report(library_trace(internal_errors=0), [])
    assert clean["internal_errors"] == 0 and "internal error" not in rendered(clean, 120)
