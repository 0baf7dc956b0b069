from gradaudit.rules import run_rules
from gradaudit.trace import Backward, GradEvent, Location, Parameter, Trace, Window
from tests.conftest import fixture_line

LOSS_LINE = Location("train.py", 12)


def test_encoder_in_actor_optimizer_discards_the_critic_gradient(gradaudit_cli):
    result = gradaudit_cli("run", "encoder_layout.py", "--", "--layout", "encoder-in-actor")
    assert result.exit_code == 1
    (finding,) = result.findings("GA203")
    assert finding["severity"] == "warning"
    assert finding["subject"] == "obs_encoder"
    assert "feeds critic" in finding["message"] and "upstream feature provider" in finding["message"]
    assert "actorvae_optimizer.zero_grad()" in finding["message"]
    assert finding["location"]["line"] == fixture_line("encoder_layout.py", "GA203-here")
    assert result.findings("GA201") == []


def test_encoder_in_no_optimizer_is_an_orphan(gradaudit_cli):
    result = gradaudit_cli("run", "encoder_layout.py", "--", "--layout", "encoder-orphan")
    (finding,) = result.findings("GA201")
    assert finding["subject"] == "obs_encoder"
    tensors = "obs_encoder.0.weight, obs_encoder.0.bias, obs_encoder.2.weight, obs_encoder.2.bias"
    assert f"obs_encoder (4 tensors: {tensors}) receives gradient" in finding["message"]
    assert finding["location"]["line"] == fixture_line("encoder_layout.py", "GA201-here")
    assert result.findings("GA203") == []


def test_encoder_in_critic_optimizer_is_clean(gradaudit_cli):
    result = gradaudit_cli("run", "encoder_layout.py", "--", "--layout", "fixed")
    assert result.exit_code == 0
    assert result.findings() == []


def test_downstream_evaluators_are_not_reported(gradaudit_cli):
    for script in ("sac_actor_critic.py", "gan.py"):
        result = gradaudit_cli("run", script)
        assert result.at_least_warning() == [], script
        assert result.exit_code == 0


def test_temperature_parameter_is_named_from_its_variable(gradaudit_cli):
    result = gradaudit_cli("run", "sac_actor_critic.py")
    groups = {g["group"]: g for g in result.report["groups"]}
    assert groups["log_alpha"]["optimizers"] == ["alpha_optimizer"]


def test_orphan_message_names_the_first_tensors_and_counts_the_rest():
    names = [f"classifier.{layer}.{kind}" for layer in range(6) for kind in ("weight", "bias")]
    trace = Trace(
        program="train.py",
        window=Window(1, "iterations"),
        parameters=[Parameter(name, "classifier", [2], True) for name in names],
        backwards=[Backward(0, LOSS_LINE, True, True, [], ["classifier"])],
        events=[GradEvent(seq, "accumulate", name, backward=0, norm=1.0) for seq, name in enumerate(names)],
    )
    (finding,) = run_rules(trace, select=["GA201"])
    shown = ", ".join(names[:5])
    assert (finding.subject, finding.location) == ("classifier", None)
    assert finding.message.startswith(f"classifier (12 tensors: {shown} and 7 more) receives gradient")


def test_critics_evaluating_the_actor_and_coefficients_trained_by_their_own_loss_are_clean(gradaudit_cli):
    """d3rlpy's CQL shape: the actor loss reaches the critics (Q-function encoders named on their own) and the
    temperature, the critic loss reaches the conservative multiplier; each is trained by its own loss."""
    result = gradaudit_cli("run", "offline_actor_critic.py")
    assert result.findings() == []
    optimizers = {g["group"]: g["optimizers"] for g in result.report["groups"]}
    assert optimizers["log_temp"] == ["temp_optim"] and optimizers["encoder"] == ["critic_optim"]


def test_zero_grad_inside_an_lbfgs_closure_comes_after_the_step_read_the_gradient(gradaudit_cli, tmp_path):
    trace_path = tmp_path / "trace.json"
    result = gradaudit_cli("run", "closure.py", "--save-trace", str(trace_path))
    assert result.findings() == []
    trace = Trace.load(trace_path)
    read = [e for e in trace.events if e.kind == "apply" and e.by == "optimizer.step() (its closure)"]
    assert read and {e.location.line for e in read} == {fixture_line("closure.py", "closure-zero-grad")}


def test_zero_grad_between_accumulated_micro_batches_is_reported(gradaudit_cli):
    result = gradaudit_cli("run", "grad_accumulation.py", "--", "--zero-grad-inside")
    (finding,) = result.findings("GA203")
    assert (finding["severity"], finding["subject"]) == ("info", "model")
    assert "wiped by optimizer.zero_grad()" in finding["message"]
    assert finding["location"]["line"] == fixture_line("grad_accumulation.py", "GA203-here")
