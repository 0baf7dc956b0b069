from tests.conftest import fixture_line


def test_encoder_in_two_optimizers(gradaudit_cli):
    result = gradaudit_cli("run", "two_optimizers.py", "--", "--bug")
    (finding,) = result.findings("GA204")
    assert finding["subject"] == "encoder"
    assert "critic_optimizer" in finding["message"] and "actor_optimizer" in finding["message"]
    assert finding["location"]["line"] == fixture_line("two_optimizers.py", "GA204-here")


def test_encoder_in_one_optimizer_is_clean(gradaudit_cli):
    assert gradaudit_cli("run", "two_optimizers.py").findings() == []
