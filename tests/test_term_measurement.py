"""Loss decomposition and per-term gradients: bounded, exact, and never running the program's code twice."""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import torch.utils.checkpoint as checkpoint
from torch import nn

import gradaudit
from gradaudit.capture.provenance import MAX_WRAPPED_RUN
from tests.conftest import FIXTURES


def _one_step(loss_of: Callable[[gradaudit.capture.Audit], torch.Tensor], **options) -> gradaudit.capture.Audit:
    with gradaudit.audit(**options) as audit:
        loss = loss_of(audit)
        loss.backward()
    return audit


def _terms(audit: gradaudit.capture.Audit) -> dict:
    (backward,) = audit.trace.backwards
    return {term.name: term for term in backward.terms}


def test_one_term_loss_is_measured_from_the_backward_itself():
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    x = torch.randn(8, 4)
    expected = torch.autograd.grad(net(x).pow(2).mean(), list(net.parameters()))
    audit = _one_step(lambda a: net(x).pow(2).mean())
    (term,) = _terms(audit).values()
    assert term.grads_skipped == ""
    assert term.grad_norms["net"] == pytest.approx(math.sqrt(sum(float(g.pow(2).sum()) for g in expected)))


def _grad_norm(loss: torch.Tensor, module: nn.Module) -> float:
    grads = torch.autograd.grad(loss, list(module.parameters()), retain_graph=True)
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))


@pytest.mark.parametrize("call", ["plain", "gradient", "inputs"])
def test_terms_are_measured_alone_where_they_share_parameters_and_from_the_backward_elsewhere(call):
    """`policy` and `entropy` share `scale`; `policy` alone reaches `actor` and `value` alone `critic`: those two
    are read from what the backward accumulates. A gradient given to backward() scales what it accumulates, never
    a term's own gradient; `inputs` leave the other parameters without theirs: both are measured by passes."""
    torch.manual_seed(0)
    actor, critic, scale = nn.Linear(3, 1), nn.Linear(3, 1), nn.Linear(1, 1)
    x, one = torch.randn(8, 3), torch.ones(4, 1)

    def terms_of() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        spread = scale(one).exp().mean()
        return (actor(x) * spread).pow(2).mean(), 0.5 * critic(x).pow(2).mean(), 0.01 * spread.log()

    policy, value, entropy = terms_of()
    expected = {
        "policy": {"actor": _grad_norm(policy, actor), "scale": _grad_norm(policy, scale)},
        "value": {"critic": _grad_norm(value, critic)},
        "entropy": {"scale": _grad_norm(entropy, scale)},
    }
    with gradaudit.audit() as audit:
        policy, value, entropy = terms_of()
        loss = audit.term("policy", policy) + audit.term("value", value) - audit.term("entropy", entropy)
        if call == "plain":
            loss.backward()
        elif call == "gradient":
            loss.backward(torch.tensor(4.0))
        else:
            loss.backward(inputs=[*actor.parameters(), *scale.parameters()])
    terms = _terms(audit)
    for name, norms in expected.items():
        assert terms[name].grad_norms == pytest.approx(norms), name


def test_a_dead_term_on_parameters_it_alone_reaches_reads_exactly_zero():
    torch.manual_seed(0)
    actor, critic = nn.Linear(3, 1), nn.Linear(3, 1)
    x = torch.randn(8, 3)
    audit = _one_step(lambda a: actor(x).pow(2).mean() + 0.0 * critic(x).pow(2).mean())
    terms = _terms(audit)
    assert terms["0.0 * critic(x).pow(2).mean()"].grad_norms == {"critic": 0.0}
    (finding,) = [f for f in audit.findings if f.rule == "GA102"]
    assert finding.subject == "0.0 * critic(x).pow(2).mean()"


class _Doubling(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        _Doubling.calls += 1
        return 2 * grad


def test_one_term_through_a_custom_function_is_measured_without_running_it_again():
    _Doubling.calls = 0
    net = nn.Linear(4, 3)
    audit = _one_step(lambda a: _Doubling.apply(net(torch.randn(8, 4))).pow(2).mean())
    (term,) = _terms(audit).values()
    assert term.grad_norms["net"] > 0 and _Doubling.calls == 1


def _with_module_hook(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    net.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    return net(x.clone().requires_grad_())


def _checkpointed(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return checkpoint.checkpoint(net, x.requires_grad_(), use_reentrant=False)


def _hooked(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = net(x)
    out.register_hook(lambda g: g)
    return out


def _retained(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = net(x)
    out.retain_grad()
    return out


def _parameter_hook(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    net.weight.register_hook(lambda g: g)
    return net(x)


@pytest.mark.parametrize(
    ("through", "reason"),
    [
        (lambda net, x: _Doubling.apply(net(x)), "the custom autograd.Function _Doubling"),
        (_with_module_hook, "a module backward hook"),
        (_checkpointed, "saved-tensor hooks (activation checkpointing) around"),
        (_hooked, "a gradient hook at"),
        (_retained, "retain_grad() at"),
        (_parameter_hook, "a gradient hook on a parameter"),
    ],
    ids=["custom-function", "module-hook", "nonreentrant-checkpoint", "tensor-hook", "retain-grad", "param-hook"],
)
def test_terms_whose_backward_runs_program_code_are_not_measured_alone(through, reason):
    torch.manual_seed(0)
    net, other = nn.Linear(4, 3), nn.Linear(4, 3)
    x = torch.randn(8, 4)
    audit = _one_step(
        lambda a: a.term("hooked", through(net, x).pow(2).mean()) + a.term("plain", other(x).pow(2).mean())
    )
    terms = _terms(audit)
    assert reason in terms["hooked"].grads_skipped and terms["hooked"].grad_norms == {}
    assert terms["hooked"].groups_reached == ["net"]
    assert terms["plain"].grads_skipped == "" and terms["plain"].grad_norms["other"] > 0
    assert any(reason in note for note in gradaudit.report.build_report(audit.trace, [])["notes"])


def test_loss_summed_over_a_loop_is_one_term_measured_in_one_pass():
    torch.manual_seed(0)
    net, regulariser = nn.Linear(4, 1), nn.Linear(4, 1)
    batches = torch.randn(1000, 2, 4)

    def loss_of(audit: gradaudit.capture.Audit) -> torch.Tensor:
        loss = torch.zeros(())
        for batch in batches:
            step_loss = net(batch).pow(2).mean()
            loss = loss + step_loss
        return loss + 0.1 * regulariser(batches[0]).abs().mean()

    audit = _one_step(loss_of)
    terms = {name: term for name, term in _terms(audit).items() if not term.constant}
    assert list(terms) == ["step_loss", "0.1 * regulariser(batches[0]).abs().mean()"]
    assert terms["step_loss"].addends == 1000
    total = sum(net(batch).pow(2).mean() for batch in batches)
    expected = torch.autograd.grad(total, list(net.parameters()))
    assert terms["step_loss"].grad_norms["net"] == pytest.approx(
        math.sqrt(sum(float(g.pow(2).sum()) for g in expected))
    )


def test_an_addend_reached_along_many_paths_is_one_term_with_the_summed_scale():
    torch.manual_seed(0)
    net, other = nn.Linear(3, 1), nn.Linear(3, 1)
    inputs = torch.randn(4, 3)

    def loss_of(audit: gradaudit.capture.Audit) -> torch.Tensor:
        x = net(inputs).sum()
        for _ in range(16):
            x = x + x  # 65,536 paths to net(inputs).sum()
        return x + 0.5 * other(inputs).sum()

    terms = _terms(_one_step(loss_of))
    assert list(terms) == ["x", "0.5 * other(inputs).sum()"]
    assert terms["x"].addends == 1
    expected = torch.autograd.grad(net(inputs).sum(), list(net.parameters()))
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in expected))
    assert terms["x"].grad_norms["net"] == pytest.approx(65536 * norm)


def test_terms_beyond_the_cap_are_merged_into_one_and_said():
    nets = [nn.Linear(2, 1) for _ in range(10)]
    x = torch.randn(4, 2)

    def loss_of(audit: gradaudit.capture.Audit) -> torch.Tensor:
        loss = audit.term("head0", nets[0](x).pow(2).mean())
        for i, net in enumerate(nets[1:], start=1):
            loss = loss + audit.term(f"head{i}", net(x).pow(2).mean())
        return loss

    audit = _one_step(loss_of, max_terms=4)
    (backward,) = audit.trace.backwards
    assert [t.name for t in backward.terms] == ["head0", "head1", "head2", "7 more terms"]
    assert backward.terms_beyond_cap == 7 and backward.terms[-1].addends == 7
    assert len(backward.terms[-1].groups_reached) == 7
    notes = gradaudit.report.build_report(audit.trace, [])["notes"]
    assert any("7 addends are merged into `7 more terms`" in note for note in notes)


def _eight_megabyte_stack() -> None:
    resource.setrlimit(resource.RLIMIT_STACK, (8 << 20, resource.getrlimit(resource.RLIMIT_STACK)[1]))


def _run(command: list[str], **options) -> subprocess.CompletedProcess:
    """In a child with an 8 MB stack: PyTorch frees a chain of graph nodes that have Python wrappers recursively on
    the C stack, and 50,000 of them overflow it (a segfault, no message); three steps of a 150,000-op chain did under
    `gradaudit run` until it raised the stack limit while the program runs."""
    return subprocess.run(command, capture_output=True, text=True, preexec_fn=_eight_megabyte_stack, **options)


@pytest.mark.skipif(sys.platform != "linux", reason="sets the stack limit of the child process")
def test_a_chain_deeper_than_the_walk_completes_under_gradaudit_run(tmp_path):
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "gradaudit", "run", "deep_chain.py", "--json", str(report), "--", "150000", "3"]
    done = _run(command, cwd=FIXTURES)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "done" in done.stdout
    result = json.loads(report.read_text())
    assert any("deeper or larger than gradaudit walks" in note for note in result["notes"])
    assert result["findings"] == []


@pytest.mark.skipif(sys.platform != "linux", reason="sets the stack limit of the child process")
def test_walking_a_deep_graph_built_before_the_audit_leaves_it_safe_to_free():
    program = """
import torch, gradaudit
weight = torch.nn.Parameter(torch.ones(3))
x = weight * 1.0
for _ in range(60_000):
    x = x * 1.0001
loss = x.sum()
with gradaudit.audit() as audit:
    loss.backward()
assert audit.trace.backwards[0].walk_truncated
del loss, x
print("freed")
"""
    done = _run([sys.executable, "-c", program])
    assert (done.returncode, done.stdout.strip()) == (0, "freed"), done.stderr[-2000:]


def test_recorded_nodes_never_form_a_run_longer_than_the_limit():
    """Each op the provenance mode records keeps its node's Python wrapper alive: along a chain, it leaves one node
    in every MAX_WRAPPED_RUN unrecorded, so that freeing the chain never recurses deeper than that."""
    weight = nn.Parameter(torch.ones(3))
    with gradaudit.audit() as audit:
        x = weight * 1.0
        for _ in range(3 * MAX_WRAPPED_RUN):
            x = x * 1.0001
        mode = audit.recorder.mode
        node, run, longest = x.grad_fn, 0, 0
        while node is not None and not hasattr(node, "variable"):
            run = run + 1 if mode.record_for(node) is not None else 0
            longest = max(longest, run)
            node = node.next_functions[0][0]
    assert longest == MAX_WRAPPED_RUN


def test_traces_written_before_the_skip_and_limit_fields_still_load():
    net = nn.Linear(2, 1)
    saved = _one_step(lambda a: net(torch.randn(3, 2)).sum()).trace.to_dict()
    for backward in saved["backwards"]:
        for key in ("walk_truncated", "reach_unknown", "terms_beyond_cap"):
            del backward[key]
        for term in backward["terms"]:
            for key in ("addends", "grads_skipped", "reach_unknown"):
                del term[key]
    (backward,) = gradaudit.trace.Trace.from_dict(saved).backwards
    assert (backward.walk_truncated, backward.terms_beyond_cap, backward.terms[0].grads_skipped) == (False, 0, "")
