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
