from tests.conftest import fixture_line


def test_log_of_negative_gives_a_nonfinite_loss(gradaudit_cli):
    result = gradaudit_cli("run", "nan_loss.py", "--", "--bug")
    (finding,) = result.findings("GA305")
    assert finding["subject"] == "loss"
    assert finding["location"]["line"] == fixture_line("nan_loss.py", "GA305-here")


def test_nonfinite_gradient_is_reported_on_its_group():
    import torch

    import gradaudit

    scale = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([scale], lr=0.1)
    with gradaudit.audit() as audit:
        loss = torch.sqrt(scale).sum()  # d/dx sqrt(x) at 0 is inf
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert ("GA305", "scale") in {(f.rule, f.subject) for f in audit.findings}


def test_softplus_is_clean(gradaudit_cli):
    assert gradaudit_cli("run", "nan_loss.py").findings() == []
