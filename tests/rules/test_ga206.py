from tests.conftest import fixture_line


def test_undetached_td_target(gradaudit_cli):
    result = gradaudit_cli("run", "dqn.py", "--", "--bug")
    (finding,) = result.findings("GA206")
    assert finding["subject"] == "td_target"
    assert "q_net" in finding["message"]
    assert finding["location"]["line"] == fixture_line("dqn.py", "GA206-here")


def test_target_network_under_no_grad_is_clean(gradaudit_cli):
    assert gradaudit_cli("run", "dqn.py").findings() == []
