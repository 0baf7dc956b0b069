from tests.conftest import fixture_line


def test_constraint_from_observed_rewards_is_a_dead_term(gradaudit_cli):
    result = gradaudit_cli("run", "cvar_constraint.py", "--", "--bug")
    assert result.exit_code == 1
    (finding,) = result.findings("GA101")
    assert finding["severity"] == "error"
    assert finding["subject"] == "loss.new_tensor(lam) * violation"
    assert finding["location"] == {
        "file": "cvar_constraint.py",
        "line": fixture_line("cvar_constraint.py", "GA101-here"),
    }
    assert f"cvar_constraint.py:{fixture_line('cvar_constraint.py', 'GA101-break')}" in finding["message"]
    assert "torch.as_tensor" in finding["message"]


def test_constraint_from_predicted_cvar_is_clean(gradaudit_cli):
    result = gradaudit_cli("run", "cvar_constraint.py")
    assert result.findings("GA101") == []
    terms = {t["name"]: t for t in result.report["terms"]}
    assert terms["loss.new_tensor(lam) * violation"]["groups_reached"] == ["critic"]


def test_literal_constant_is_not_a_dead_term():
    import torch

    import gradaudit

    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([w], lr=0.1)
    with gradaudit.audit() as audit:
        loss = (w * 2).sum() + torch.tensor(1e-8) + 1e-8
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert [f.rule for f in audit.findings] == []


def test_detached_term_names_the_detach_line():
    import torch

    import gradaudit

    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([w], lr=0.1)
    with gradaudit.audit() as audit:
        penalty = (w**2).sum().detach()
        loss = (w * 2).sum() + audit.term("l2_penalty", penalty)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    (finding,) = audit.findings
    assert (finding.rule, finding.subject) == ("GA101", "l2_penalty")
    assert ".detach()" in finding.message


NUMPY_PENALTIES = {
    "sort-mean": ("as_tensor", "torch.as_tensor(np.sort(returns)[:WORST].mean())"),
    "sum": ("tensor", "torch.tensor(np.minimum(returns, 0).sum())"),
    "float": ("tensor", "torch.tensor(worst)"),
}


def test_numbers_computed_from_data_are_dead_terms(gradaudit_cli):
    """A numpy scalar, and a Python float that changes every iteration, are data, not literals."""
    for kind, (op, expression) in NUMPY_PENALTIES.items():
        result = gradaudit_cli("run", "numpy_penalty.py", "--", "--penalty", kind)
        (finding,) = result.findings("GA101")
        assert finding["subject"] == "LAM * penalty", kind
        assert finding["location"]["line"] == fixture_line("numpy_penalty.py", "GA101-here")
        break_line = fixture_line("numpy_penalty.py", f"GA101-{kind}")
        assert (
            f"built from data that has no autograd history ({op} `{expression}` at numpy_penalty.py:{break_line})"
            in finding["message"]
        )


def test_literals_constants_and_predicted_penalties_are_clean(gradaudit_cli):
    for kind in ("predicted", "constant", "literal"):
        assert gradaudit_cli("run", "numpy_penalty.py", "--", "--penalty", kind).findings() == [], kind


def test_a_helper_called_with_different_constants_is_not_fed_by_data():
    import math

    import torch

    import gradaudit

    margin = math.log(3)  # computed, not written: constant because it is the same every iteration

    def as_tensor(value):
        return torch.tensor(value)

    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([w], lr=0.1)
    with gradaudit.audit() as audit:
        for _ in range(3):
            loss = (w * 2).sum() + as_tensor(margin) + as_tensor(2 * margin)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert audit.findings == []


def test_reentrant_checkpoint_hides_parameters_but_is_not_a_dead_term(gradaudit_cli):
    result = gradaudit_cli("run", "reentrant_checkpoint.py")
    assert result.findings("GA101") == [] and result.findings("GA202") == []
    terms = {t["name"]: t for t in result.report["terms"]}
    reconstruction = terms["(reconstruction - obs).pow(2).mean()"]
    assert reconstruction["reach_unknown"] and reconstruction["groups_reached"] == []
    assert "reentrant activation checkpointing" in reconstruction["grads_skipped"]
    assert terms["value_head(obs).pow(2).mean()"]["grad_norms"]["value_head"] > 0
    assert any("reentrant activation checkpointing" in note for note in result.report["notes"])


def test_dead_term_next_to_a_reentrant_checkpoint_is_still_reported(gradaudit_cli):
    result = gradaudit_cli("run", "reentrant_checkpoint.py", "--", "--bug")
    (finding,) = result.findings("GA101")
    assert finding["subject"] == "0.1 * delta.pow(2).mean()"
    assert "reaches no trainable parameter" in finding["message"]
    assert finding["location"] == {
        "file": "reentrant_checkpoint.py",
        "line": fixture_line("reentrant_checkpoint.py", "GA101-here"),
    }
