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
