"""Scale: a million-node graph is audited whole, the walk keeps the reach it always computed, a cut walk says so in
one line, and nothing of the program's graphs outlives the audit."""

from __future__ import annotations

import gc
import io
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradaudit
from gradaudit.capture.graph import MAX_WALK_DEPTH, walk
from gradaudit.report import build_report, console


def _wide(params: list[nn.Parameter], nodes: int) -> torch.Tensor:
    """`nodes` autograd nodes side by side, made in one C++ call: broadcasting each scalar parameter to shape (1,)
    gives every output its own ExpandBackward0 node (a Python loop of a million ops takes seconds)."""
    outputs = torch.broadcast_tensors(*(params * (nodes // len(params))), torch.zeros(1))
    return torch.stack(outputs[:-1])


def _line_of(text: str) -> int:
    source = Path(__file__).read_text().splitlines()
    return next(number for number, line in enumerate(source, 1) if text in line and "_line_of" not in line)


def test_a_million_node_graph_is_walked_whole_and_its_findings_are_right():
    """The graph is built before the audit (its million ops unrecorded): the audit walks all of it (the raw-graph
    capture counts its nodes), reaches the parameters behind it and none behind a term with no parameter."""
    body = nn.ParameterList(nn.Parameter(torch.ones(())) for _ in range(10))
    head = nn.Linear(2, 1)
    optimizer = torch.optim.SGD([*body, *head.parameters()], lr=1e-3)
    stray = torch.ones(3, requires_grad=True)
    features = _wide(list(body), 1_000_000)
    with gradaudit.audit(raw_graph=True) as audit:
        loss = features.sum() + (stray * 2.0).sum()
        optimizer.zero_grad()  # the audit first sees the optimizer here
        loss.backward()
        optimizer.step()
    (backward,) = audit.trace.backwards
    assert not backward.walk_truncated and audit.trace.window.internal_errors == 0
    # the expands; stack, sum, 10 accumulators; stray: mul, sum, accumulator; the add
    assert [graph.node_count for graph in audit.trace.raw_graphs] == [1_000_000 + 16]
    assert {term.name: term.groups_reached for term in backward.terms} == {
        "features.sum()": ["body"],
        "(stray * 2.0).sum()": [],
    }
    assert all(p.grad == 100_000 for p in body) and head.weight.grad is None
    found = {(f.rule, f.subject, f.location.line if f.location else None) for f in audit.findings}
    assert found == {
        ("GA101", "(stray * 2.0).sum()", _line_of("loss = features.sum() + (stray * 2.0).sum()")),
        ("GA202", "head", _line_of("# the audit first sees the optimizer here")),
    }


def _reference_reach(root: torch.autograd.graph.Node, parameters: set[int]) -> dict[int, set[int]]:
    """id(node) -> ids of the parameters below it, by plain recursion over next_functions (small graphs only)."""
    found: dict[int, set[int]] = {}

    def visit(node: torch.autograd.graph.Node) -> set[int]:
        if id(node) not in found:
            reached = {id(node.variable)} & parameters if hasattr(node, "variable") else set()
            for child, _ in node.next_functions:
                if child is not None:
                    reached |= visit(child)
            found[id(node)] = reached
        return found[id(node)]

    visit(root)
    return found


class _Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205 - torch's signature
        return x * 2

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205 - torch's signature
        return grad * 2


def test_the_walk_gives_every_node_the_parameters_below_it():
    """Shared subgraphs, a leaf that is no parameter, a custom Function and a hooked parameter: each node's reach is
    what a plain recursion finds; user code and unknown reach climb to the root."""
    torch.manual_seed(0)
    a, b, c, hooked = (nn.Parameter(torch.randn(3)) for _ in range(4))
    hooked.register_hook(lambda grad: grad)
    data = torch.randn(3, requires_grad=True)
    shared = (a * b).tanh()
    left = shared * c + data
    right = _Twice.apply(shared.exp()) * hooked
    loss = (left * right).sum() + shared.sum() + (data * 3).sum()
    parameters = {id(p) for p in (a, b, c, hooked)}
    view = walk([loss.grad_fn], lambda tensor: id(tensor) in parameters, {})
    reference = _reference_reach(loss.grad_fn, parameters)
    assert view.nodes.keys() == reference.keys() and not view.truncated
    assert {key: set(view.params_reached(node)) for key, node in view.nodes.items()} == reference
    assert set(view.param_ids) == parameters and {id(view.leaves[pid][1]) for pid in view.param_ids} == parameters
    assert view.user_code[id(loss.grad_fn)] == "the custom autograd.Function _Twice"
    assert view.user_code[id(_accumulator(hooked))] == "a gradient hook on a parameter"
    assert id(loss.grad_fn) in view.reach_unknown and id(shared.grad_fn) not in view.reach_unknown


def _accumulator(tensor: torch.Tensor) -> torch.autograd.graph.Node:
    return torch.autograd.graph.get_gradient_edge(tensor).node


def test_a_chain_deeper_than_the_limit_is_walked_to_the_limit():
    """The walk stops MAX_WALK_DEPTH nodes below the root: one node beyond is held, unexpanded, with unknown reach."""
    weight = nn.Parameter(torch.ones(()))
    x = weight * 1.0
    for _ in range(MAX_WALK_DEPTH + 10):
        x = x * 1.0
    view = walk([x.grad_fn], lambda tensor: tensor is weight, {})
    assert len(view.nodes) == MAX_WALK_DEPTH + 1 and len(view.frontier) == 1
    assert id(x.grad_fn) in view.reach_unknown and view.param_ids == []


def test_a_walk_cut_by_the_node_limit_says_so_in_one_line():
    params = [nn.Parameter(torch.ones(())) for _ in range(10)]
    optimizer = torch.optim.SGD(params, lr=0.1)
    with gradaudit.audit(max_nodes=1_000) as audit:
        loss = _wide(params, 5_000).sum()
        optimizer.zero_grad()
        loss.backward()  # past the node limit
        optimizer.step()
    assert audit.trace.backwards[0].walk_truncated and audit.findings == []
    shown = io.StringIO()
    console.render(build_report(audit.trace, audit.findings), shown, width=1_000)
    said = [line for line in shown.getvalue().splitlines() if "--max-nodes" in line]
    assert len(said) == 1 and said[0].startswith("note: the backward at ")
    assert f"test_large_graph.py:{_line_of('loss.backward()  # past the node limit')}" in said[0]


def test_nothing_of_the_graphs_outlives_the_audit():
    """Tensors saved in graph nodes die with the program's last reference, though the audit object lives on: a
    graph kept for a second backward (retain_graph) and one never backwarded, through a module, a named term, a
    regression loss, clamp and exp."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    target_net = nn.Linear(4, 1)
    optimizer = torch.optim.SGD([*net.parameters(), *target_net.parameters()], lr=0.1)
    with gradaudit.audit() as audit:
        for _ in range(2):
            batch, unused_batch = torch.randn(5, 4), torch.randn(3, 4)
            hidden = net(batch)
            prediction = hidden.exp().clamp(max=10)
            loss = audit.term("fit", F.mse_loss(prediction, target_net(batch))) + 1e-3 * hidden.pow(2).mean()
            unused = net(unused_batch).sum()
            saved = [weakref.ref(tensor) for tensor in (batch, unused_batch, hidden, prediction)]
            optimizer.zero_grad()
            loss.backward(retain_graph=True)
            optimizer.step()
    assert audit.trace.window.internal_errors == 0
    del batch, unused_batch, hidden, prediction, loss, unused
    gc.collect()
    assert [ref() is None for ref in saved] == [True] * 4
