from tests.conftest import fixture_line


def test_zero_entropy_coefficient_is_info(gradaudit_cli):
    result = gradaudit_cli("run", "entropy_bonus.py", "--", "--ent-coef", "0")
    assert result.exit_code == 0
    (finding,) = result.findings("GA102")
    assert finding["severity"] == "info"
    assert finding["subject"] == "ent_coef * entropy_loss"
    assert "zero coefficient" in finding["message"]
    assert finding["location"]["line"] == fixture_line("entropy_bonus.py", "GA102-here")


def test_nonzero_entropy_coefficient_is_clean(gradaudit_cli):
    result = gradaudit_cli("run", "entropy_bonus.py")
    assert result.findings("GA102") == []
    assert result.at_least_warning() == []  # GA306 informs: a near-uniform policy's entropy gradient is tiny
