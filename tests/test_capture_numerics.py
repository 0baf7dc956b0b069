"""Capture of per-op numerics: which clamps and gates are listed, in-place ops, and where a NaN was born."""

import torch
import torch.nn.functional as F
from torch import nn

import gradaudit
from gradaudit.trace import Trace


def _one_step(loss_of) -> Trace:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradaudit.audit() as audit:
        loss = loss_of(model(torch.randn(64, 4)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return audit.trace


def test_gates_written_in_the_loss_are_listed_but_activation_modules_are_not():
    trace = _one_step(lambda h: F.relu(h - 5).mean() + h.clamp(-0.1, 0.1).mean())
    listed = {(c.op, c.expression, c.gate) for c in trace.clamps}
    assert listed == {("relu", "F.relu(h - 5)", True), ("clamp", "h.clamp(-0.1, 0.1)", False)}


def test_an_in_place_clamp_is_measured_on_its_input():
    def loss_of(h):
        shifted = h + 10  # every element above the bound
        return shifted.clamp_(max=1.0).mean() + h.mean()

    (clamp,) = _one_step(loss_of).clamps
    assert (clamp.op, clamp.upper, clamp.above, clamp.below) == ("clamp_", 1.0, 1.0, 0.0)


def test_exp_records_its_largest_input_and_float32_overflow():
    (exp,) = _one_step(lambda h: torch.exp(h * 0 + torch.tensor([1.0, 5.0, 95.0, 0.0])).mean()).exps
    assert (exp.max_input, exp.overflow, exp.dtype, exp.max_output) == (95.0, 64, "float32", None)  # 64 rows hold 95


def test_exp_of_nan_and_infinite_inputs_records_the_largest_finite_input():
    inputs = torch.tensor([1.0, float("nan"), 95.0, float("inf")])
    (exp,) = _one_step(lambda h: torch.exp(h * 0 + inputs).nan_to_num().mean()).exps
    assert (exp.max_input, exp.overflow, exp.max_output) == (95.0, 64, None)
    (exp,) = _one_step(lambda h: torch.exp(h * 0 - float("inf")).mean()).exps
    assert (exp.max_input, exp.overflow, exp.max_output) == (-float("inf"), 0, 0.0)


def test_finite_outputs_whose_sum_overflows_are_no_origin():
    def loss_of(h):
        large = h * 0 + 3e38  # finite, and so is every quotient below: only their sum overflows
        scaled = large / 1.0
        return torch.log(scaled - 3.2e38).mean() + h.mean()  # NaN: the origin

    (origin,) = _one_step(loss_of).nonfinite_origins
    assert (origin.op, origin.expression, origin.kind) == ("log", "torch.log(scaled - 3.2e38)", "nan")


def test_the_first_op_to_produce_nan_from_finite_inputs_is_the_origin():
    def loss_of(h):
        ratio = h / h.abs().clamp_min(1e-6)  # finite
        logged = torch.log(ratio - 2)  # NaN: the origin
        return (logged.sqrt() * 2).mean()  # sqrt(NaN) is NaN, but its input was not finite

    (origin,) = _one_step(loss_of).nonfinite_origins
    assert (origin.op, origin.expression, origin.kind) == ("log", "torch.log(ratio - 2)", "nan")


def test_nan_data_reaching_the_loss_is_traced_to_its_op_and_unrelated_nans_are_not():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradaudit.audit() as audit:
        for step in range(2):
            stale = torch.sqrt(torch.tensor([-1.0]))  # NaN that never reaches a loss
            target = torch.log(torch.ones(8, 1) - 2 * step) * 3  # step 1: log(-1), NaN data reaching the loss
            loss = F.mse_loss(model(torch.randn(8, 4)), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert stale.isnan().all()
    (origin,) = audit.trace.nonfinite_origins
    assert (origin.op, origin.expression, origin.backward) == ("log", "torch.log(torch.ones(8, 1) - 2 * step)", 1)


def _value_clip_step(clipped_of) -> list:
    """A critic whose values all sit 1.0 above their old values; returns 10 above: the clip saturates everywhere."""
    torch.manual_seed(0)
    critic = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(critic.parameters(), lr=0.1)
    obs = torch.randn(64, 4)
    with torch.no_grad():
        old = critic(obs).squeeze(-1) - 1.0
    returns = old + torch.where(torch.arange(64) < 48, 10.0, -10.0)
    with gradaudit.audit() as audit:
        values = critic(obs).squeeze(-1)
        loss = torch.max((values - returns) ** 2, clipped_of(values, old, returns)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [c for c in audit.trace.clamps if not c.gate]


def test_a_max_between_a_clamped_branch_and_its_twin_measures_the_dead_elements_it_selects():
    (clamp,) = _value_clip_step(lambda v, old, r: (old + torch.clamp(v - old, -0.2, 0.2) - r) ** 2)
    assert clamp.saturated == 1.0 and clamp.groups_reached == ["critic"]
    # Returns 10 above: the clipped value (old + 0.2) is further from them, so the max selects the dead branch;
    # returns 10 below: the unclipped value (old + 1) is further, and its gradient flows.
    assert clamp.selection.op == "max" and clamp.selection.zero_share == 0.75
    assert clamp.selection.expression.startswith("torch.max((values - returns) ** 2")


def test_an_element_fed_by_a_live_path_besides_the_clamp_is_not_dead():
    (clamp,) = _value_clip_step(lambda v, old, r: (old + torch.clamp(v - old, -0.2, 0.2) + 0 * v - r) ** 2)
    assert clamp.saturated == 1.0 and clamp.selection is None
    (clamp,) = _value_clip_step(lambda v, old, r: ((old + torch.clamp(v - old, -0.2, 0.2)).add_(0 * v) - r) ** 2)
    assert clamp.saturated == 1.0 and clamp.selection is None  # the same, written in place


def test_a_hinge_against_a_constant_is_not_a_twin():
    def hinged(v, old, r):
        return torch.max((old + torch.clamp(v - old, -0.2, 0.2) - r) ** 2, torch.full_like(r, 50.0))

    (clamp,) = _value_clip_step(hinged)
    assert clamp.saturated == 1.0 and clamp.selection is None


def test_dead_elements_pass_through_a_later_clamp_that_does_not_bind():
    """PPO with a log-ratio guard: the ratio clip binds nowhere, the guard everywhere; both branches are dead."""

    def guarded_ratio_clip(v, old, r):
        ratio = torch.clamp(v - old, -0.2, 0.2).exp()
        return torch.max(-r * ratio, -r * torch.clamp(ratio, 0.0, 10.0))

    clamps = _value_clip_step(lambda v, old, r: guarded_ratio_clip(v, old, r) - (v - r) ** 2)
    guard, ratio_clip = sorted(clamps, key=lambda c: c.upper)
    assert guard.saturated == 1.0 and ratio_clip.saturated == 0.0
    assert ratio_clip.selection is None
    assert guard.selection.zero_share == 1.0  # whichever branch the max selects, the guard killed its gradient
