"""The report schema on a hand-made trace: chains, the term x group matrix, clamps and exps; JSON and console views."""

import io
import json

import pytest

from gradaudit.report import REPORT_VERSION, build_report, console, json_report
from gradaudit.trace import (
    Backward,
    Chain,
    ChainCall,
    Clamp,
    Exp,
    GradEvent,
    Location,
    Optimizer,
    Parameter,
    Term,
    Trace,
    Window,
)

LOSS_LINE = Location("train.py", 40)
SAMPLER_LINE = Location("train.py", 31)
CLAMP_LINE = Location("train.py", 35)
EXP_LINE = Location("train.py", 36)


def sampler_chain(backward: int, norms: list[float]) -> Chain:
    """A chain whose first call ran under no_grad, then len(norms) linked gradient-carrying calls."""
    calls = [ChainCall(carried=False, linked=False)]
    calls += [
        ChainCall(carried=True, linked=i < len(norms) - 1, output_norm=norm, param_norm=norm)
        for i, norm in enumerate(norms)
    ]
    return Chain("velocity_net", backward, SAMPLER_LINE, calls)


def backward_pass(index: int, q_loss_norms: dict[str, float]) -> Backward:
    terms = [
        Term("q_loss", Location("train.py", 38), False, sorted(q_loss_norms), q_loss_norms),
        Term("bc_loss", Location("train.py", 39), False, ["velocity_net"], {"velocity_net": 2.5e-4}),
        Term("reward", Location("train.py", 39), True, []),
    ]
    return Backward(index, LOSS_LINE, True, True, terms, ["critic", "velocity_net"])


def clamp(backward: int, below: float, above: float) -> Clamp:
    return Clamp("clamp", CLAMP_LINE, "torch.clamp(ratio, 0.8, 1.2)", backward, 0.8, 1.2, 256, below, above)


def exp(backward: int, max_input: float, max_output: float | None, overflow: int) -> Exp:
    return Exp("exp", EXP_LINE, "logits[mask].exp()", backward, "float16", max_input, max_output, overflow, 64)


def hand_made_trace() -> Trace:
    """Two backward passes at one line, each with a sampler chain, clamps and exps; one infinite gradient norm."""
    return Trace(
        program="train.py",
        window=Window(2, "iterations"),
        parameters=[
            Parameter("velocity_net.weight", "velocity_net", [4, 4], True, [0]),
            Parameter("critic.weight", "critic", [1, 4], True, [0]),
        ],
        optimizers=[Optimizer(0, "optimizer", "Adam", LOSS_LINE, 2)],
        backwards=[
            backward_pass(0, {"velocity_net": 3.0}),
            backward_pass(1, {"velocity_net": 5.0, "critic": 0.5}),
        ],
        events=[
            GradEvent(0, "accumulate", "velocity_net.weight", backward=1, norm=5.0),
            GradEvent(1, "accumulate", "critic.weight", backward=1, norm=float("inf")),
        ],
        chains=[sampler_chain(0, [8.0, 4.0, 2.0, 1.0]), sampler_chain(1, [27.0, 9.0, 3.0, 1.0])],
        clamps=[
            clamp(0, 0.1, 0.1),
            clamp(1, 0.0, 0.9),
            Clamp("relu", CLAMP_LINE, "critic(x)", 1, 0.0, None, 128, 0.5, 0.0, gate=True),
        ],
        exps=[exp(0, 12.0, None, 5), exp(1, 3.0, 20.1, 0)],
    )


def test_chains_keep_the_worst_pass_and_the_range():
    trace = hand_made_trace()
    (row,) = build_report(trace, [])["chains"]
    assert row["module"] == "velocity_net" and row["location"] == {"file": "train.py", "line": 31}
    assert (row["backwards"], row["calls"], row["carried"]) == (2, 5, 4)
    assert row["amplification"] == pytest.approx(27.0) and row["min_amplification"] == pytest.approx(8.0)
    assert row["per_step"] == pytest.approx(3.0)
    assert row["output_norms"] == [None, 27.0, 9.0, 3.0, 1.0]
    assert row["param_shares"][0] is None and sum(row["param_shares"][1:]) == pytest.approx(1.0)
    assert row["first_share"] == pytest.approx(27 / 40)


def test_matrix_uses_the_last_pass_at_each_backward_location():
    trace = hand_made_trace()
    (entry,) = build_report(trace, [])["matrix"]
    assert entry["backward"] == {"file": "train.py", "line": 40}
    assert entry["groups"] == ["critic", "velocity_net"]
    assert entry["rows"] == [
        {"term": "q_loss", "location": {"file": "train.py", "line": 38}, "norms": {"velocity_net": 5.0, "critic": 0.5}},
        {"term": "bc_loss", "location": {"file": "train.py", "line": 39}, "norms": {"velocity_net": 2.5e-4}},
    ]


def test_clamps_and_exps_are_aggregated_per_op_and_location():
    trace = hand_made_trace()
    report = build_report(trace, [])
    clamp_row, gate_row = report["clamps"]
    assert clamp_row == {
        "op": "clamp",
        "expression": "torch.clamp(ratio, 0.8, 1.2)",
        "location": {"file": "train.py", "line": 35},
        "backwards": 2,
        "lower": 0.8,
        "upper": 1.2,
        "elements": 256,
        "saturated": 0.9,
        "below": 0.0,
        "above": 0.9,
        "gate": False,
        "selected_dead": None,
        "selected_by": None,
    }
    assert gate_row["op"] == "relu" and gate_row["gate"] and gate_row["upper"] is None
    (exp_row,) = report["exps"]
    assert exp_row == {
        "op": "exp",
        "expression": "logits[mask].exp()",
        "location": {"file": "train.py", "line": 36},
        "backwards": 2,
        "dtype": "float16",
        "max_input": 12.0,
        "max_output": 20.1,
        "overflow": 5,
    }


def test_json_is_strict_and_round_trips():
    trace = hand_made_trace()
    report = build_report(trace, [])
    stream = io.StringIO()
    json_report.render(report, stream)

    def reject(constant: str) -> None:
        raise AssertionError(f"{constant} in the JSON report")

    loaded = json.loads(stream.getvalue(), parse_constant=reject)
    assert loaded == report and loaded["version"] == REPORT_VERSION == 2
    assert {g["group"]: g["grad_norm"] for g in loaded["groups"]} == {"velocity_net": 5.0, "critic": "inf"}


def test_empty_trace_has_empty_sections():
    report = build_report(Trace(program="train.py", window=Window(1, "iterations")), [])
    assert report["chains"] == report["matrix"] == report["clamps"] == report["exps"] == []


def render(report: dict) -> str:
    stream = io.StringIO()
    console.render(report, stream)
    return stream.getvalue()


def cells(text: str, first: str) -> list[str]:
    """The cells of the table row that starts with `first`."""
    row = next(line for line in text.splitlines() if line.startswith(f"│ {first} "))
    return [cell.strip() for cell in row.split("│")[1:-1]]


def test_console_shows_chains_matrix_and_numerics(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # wide enough that no cell wraps
    trace = hand_made_trace()
    text = render(build_report(trace, []))
    assert "chains: gradient growth" in text
    assert "27x (min 8x)" in text and "3x" in text and "67.5%" in text and "train.py:31" in text
    assert "term × group gradient norms, backward at train.py:40" in text
    assert cells(text, "q_loss") == ["q_loss", "0.5", "5"]  # columns: term, critic, velocity_net
    assert cells(text, "bc_loss") == ["bc_loss", "-", "0.00025"]
    assert "clamps and exp" in text
    assert "90% of 256 elements at a bound (0% below 0.8, 90% above 1.2)" in text
    assert "relu (gate)" in text and "50% below 0)" in text
    assert "logits[mask].exp()" in text and "max input 12, max output 20.1" in text and "5 overflowed" in text
    assert text == render(build_report(trace, []))


def test_console_leaves_out_empty_sections():
    text = render(build_report(Trace(program="train.py", window=Window(1, "iterations")), []))
    assert "chains" not in text and "term × group" not in text and "clamps and exp" not in text


def test_a_clamp_inside_a_max_shows_the_share_the_max_selects():
    import dataclasses
    import io

    from gradaudit.report import console
    from gradaudit.trace import Location, Selection

    trace = hand_made_trace()
    picked = Selection("max", Location("train.py", 40), "torch.max(unclipped, clipped)", 0.75)
    trace.clamps = [dataclasses.replace(c, selection=picked) if c.op == "clamp" else c for c in trace.clamps]
    report = build_report(trace, [])
    row = report["clamps"][0]
    assert (row["selected_dead"], row["selected_by"]) == (0.75, {"file": "train.py", "line": 40})
    out = io.StringIO()
    console.render(report, out, width=400)
    assert "the max/min at train.py:40 selects 75% of them" in out.getvalue()
