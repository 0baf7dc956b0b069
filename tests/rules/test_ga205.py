from tests.conftest import fixture_line


def test_missing_zero_grad_reapplies_gradients(gradaudit_cli):
    result = gradaudit_cli("run", "zero_grad_missing.py", "--", "--bug")
    (finding,) = result.findings("GA205")
    assert finding["subject"] == "model"
    assert finding["location"]["line"] == fixture_line("zero_grad_missing.py", "GA205-here")


def test_zero_grad_each_step_is_clean(gradaudit_cli):
    assert gradaudit_cli("run", "zero_grad_missing.py").findings() == []


def test_gradient_accumulation_is_clean(gradaudit_cli):
    assert gradaudit_cli("run", "grad_accumulation.py").findings() == []
