from gradaudit.rules import ga206_target_grad
from gradaudit.trace import Location, RegressionTarget, Trace, Window
from tests.conftest import fixture_line

SITE = Location("sac.py", 12, "update")


def regression(shared, target="td_target", prediction="q(obs)"):
    return RegressionTarget("mse_loss", SITE, target, ["q"], prediction, ["q"] if shared else ["critic"], shared)


def test_target_sharing_parameters_with_the_prediction_is_reported():
    trace = Trace("sac.py", Window(3, "iterations"), regression_targets=[regression(["q"])])
    (finding,) = ga206_target_grad.RULE.run(trace)
    assert (finding.rule, finding.subject, finding.location) == ("GA206", "td_target", SITE)
    assert "both sides of mse_loss reach q: `q(obs)` and `td_target`" in finding.message


def test_target_reaching_other_parameters_only_is_clean():
    trace = Trace("sac.py", Window(3, "iterations"), regression_targets=[regression([])])
    assert ga206_target_grad.RULE.run(trace) == []


def test_undetached_td_target(gradaudit_cli):
    result = gradaudit_cli("run", "dqn.py", "--", "--bug")
    (finding,) = result.findings("GA206")
    assert finding["subject"] == "td_target"
    assert "q_net" in finding["message"]
    assert finding["location"]["line"] == fixture_line("dqn.py", "GA206-here")


def test_target_network_under_no_grad_is_clean(gradaudit_cli):
    assert gradaudit_cli("run", "dqn.py").findings() == []


def test_residual_gradient_td_update_names_both_sides(gradaudit_cli):
    result = gradaudit_cli("run", "value_regression.py", "--", "--mode", "residual")
    (finding,) = result.findings("GA206")
    assert finding["subject"] == "r + GAMMA * q_value(s2, a2)"
    assert "both sides of mse_loss reach q" in finding["message"]
    assert "`q_value(s, a)` and `r + GAMMA * q_value(s2, a2)`" in finding["message"]
    assert finding["location"]["line"] == fixture_line("value_regression.py", "GA206-here")
    assert result.codes() == ["GA206"]


def test_loss_module_is_seen_through_its_functional_call(gradaudit_cli):
    result = gradaudit_cli("run", "value_regression.py", "--", "--mode", "residual-module")
    (finding,) = result.findings("GA206")
    assert finding["subject"] == "target"
    assert "both sides of smooth_l1_loss reach q" in finding["message"]
    assert finding["location"]["line"] == fixture_line("value_regression.py", "GA206-module")


def test_returns_first_with_detached_returns_is_clean(gradaudit_cli):
    """stable-baselines3 writes `F.mse_loss(rollout_data.returns, values_pred)`: the prediction comes second."""
    for mode in ("critic", "td"):
        result = gradaudit_cli("run", "value_regression.py", "--", "--mode", mode)
        assert result.findings() == [], mode
