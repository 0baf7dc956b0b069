"""Sparse and complex gradients are measured without breaking or warning; every hook's own failure is counted."""

import contextlib
import copy
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import gradaudit
from gradaudit.capture import recorder as recorder_module
from gradaudit.capture.provenance import ProvenanceMode
from tests.conftest import FIXTURES


def _sparse_steps(embedding: nn.Embedding, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(4)
    optimizer = torch.optim.SparseAdam(list(embedding.parameters()), lr=1e-2)
    grads = []
    for _ in range(steps):
        tokens = torch.tensor([[1, 2, 2], [7, 1, 3]])  # repeated rows: an uncoalesced gradient
        loss = embedding(tokens).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        grads.append(embedding.weight.grad.clone())
        optimizer.step()
    return grads


def test_sparse_gradients_train_as_without_audit_and_are_measured():
    torch.manual_seed(0)
    plain = nn.Embedding(10, 3, sparse=True)
    audited = copy.deepcopy(plain)
    _sparse_steps(plain)
    with gradaudit.audit() as audit:
        grads = _sparse_steps(audited)
    assert torch.equal(plain.weight, audited.weight)
    accumulated = [e for e in audit.trace.events if e.kind == "accumulate"]
    assert [e.norm for e in accumulated] == pytest.approx(
        [float(g.coalesce().values().double().norm()) for g in grads], rel=1e-6
    )  # the norm of the summed rows, not of the duplicated entries
    assert audit.trace.window.internal_errors == 0


def test_complex_gradients_are_measured_by_magnitude():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, dtype=torch.complex64)
    with gradaudit.audit() as audit:
        layer(torch.randn(4, 3, dtype=torch.complex64)).abs().sum().backward()
    norms = {e.param: e.norm for e in audit.trace.events if e.kind == "accumulate"}
    assert math.isclose(norms["layer.weight"], float(layer.weight.grad.abs().double().norm()), rel_tol=1e-6)
    assert audit.trace.window.internal_errors == 0


def test_sparse_and_complex_training_prints_nothing_on_stderr():
    """In a fresh process: a cast warning is printed once per process, so an earlier test could hide it."""
    result = subprocess.run(
        [sys.executable, "-m", "gradaudit", "run", "sparse_complex.py", "--quiet"],
        cwd=FIXTURES,
        env={**os.environ, "PYTHONPATH": str(FIXTURES.parent.parent)},  # the gradaudit under test
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""


def test_an_error_inside_a_hook_is_counted_never_raised(monkeypatch):
    """Failures injected beneath every hook: module calls, backward, autograd node hooks, zero_grad, both step hooks."""

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    for helper in ("user_frame", "norm", "here"):
        monkeypatch.setattr(recorder_module, helper, broken)
    torch.manual_seed(0)
    plain = nn.Linear(3, 1)
    audited = copy.deepcopy(plain)
    for model, audit in ((plain, contextlib.nullcontext()), (audited, gradaudit.audit())):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1)
        with audit:
            for _ in range(2):
                optimizer.zero_grad()
                model(torch.randn(4, 3)).pow(2).sum().backward()
                optimizer.step()
    assert torch.equal(plain.weight, audited.weight)
    assert audit.trace.window.internal_errors >= 6


def test_op_observation_errors_count_as_internal_errors(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(ProvenanceMode, "_observe", broken)
    model = nn.Linear(3, 1)
    with gradaudit.audit() as audit:
        model(torch.randn(4, 3)).pow(2).sum().backward()
    assert audit.recorder.internal_errors == 0
    assert audit.recorder.internal_errors_total() == audit.recorder.mode.errors > 0
    assert audit.trace.window.internal_errors == audit.recorder.mode.errors


def test_in_place_init_through_a_view_of_a_parameter_is_no_internal_error():
    """`nn.init.orthogonal_` copies into a view of a parameter under no_grad (stable-baselines3 initialises every
    policy so): torch refuses to say whether that view has a history, and gradaudit must not count it an error."""
    with gradaudit.audit() as audit:
        layer = nn.Linear(3, 3)
        nn.init.orthogonal_(layer.weight)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        loss = layer(torch.ones(2, 3)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert audit.recorder.internal_errors_total() == 0
    assert audit.trace.window.internal_errors == 0


def test_each_backward_records_only_the_parameters_it_reaches():
    """Accumulator hooks stay on from one backward to the next: a parameter an earlier backward reached is recorded
    again only when a later one reaches it."""
    shared, head = nn.Linear(3, 3), nn.Linear(3, 1)
    with gradaudit.audit() as audit:
        for _ in range(2):
            head(shared(torch.randn(4, 3))).sum().backward()
            shared(torch.randn(4, 3)).pow(2).sum().backward()
    reached = [
        sorted(e.param for e in audit.trace.events if e.kind == "accumulate" and e.backward == b.index)
        for b in audit.trace.backwards
    ]
    both = ["head.bias", "head.weight", "shared.bias", "shared.weight"]
    assert reached == [both, ["shared.bias", "shared.weight"], both, ["shared.bias", "shared.weight"]]
