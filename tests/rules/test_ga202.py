from tests.conftest import fixture_line


def test_unused_head_in_optimizer(gradaudit_cli):
    result = gradaudit_cli("run", "unused_head.py", "--", "--bug")
    (finding,) = result.findings("GA202")
    assert finding["subject"] == "value_head"
    tensors = "value_head.0.weight, value_head.0.bias, value_head.2.weight, value_head.2.bias"
    assert finding["message"].startswith(f"value_head (4 tensors: {tensors}) is held by Adam 'optimizer'")
    assert "optimizer" in finding["message"] and "stepped" in finding["message"]
    assert finding["location"]["line"] == fixture_line("unused_head.py", "GA202-here")


def test_used_head_is_clean(gradaudit_cli):
    assert gradaudit_cli("run", "unused_head.py").findings() == []


def test_frozen_backbone_and_target_network_are_silent(gradaudit_cli):
    for script in ("frozen_backbone.py", "dqn.py"):
        result = gradaudit_cli("run", script)
        assert result.findings() == [], script


def test_parameters_reached_only_through_a_reentrant_checkpoint_are_reached(gradaudit_cli):
    """The walk cannot see past the checkpoint: the real backward's accumulations show the encoder is trained."""
    result = gradaudit_cli("run", "reentrant_checkpoint.py")
    assert result.findings("GA202") == []
    encoder = next(g for g in result.report["groups"] if g["group"] == "encoder")
    assert encoder["grad_norm"] > 0
