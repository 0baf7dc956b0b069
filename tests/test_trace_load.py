"""Loading saved traces: a faithful round trip, one-line errors for damaged files, and big traces in seconds."""

import copy

import pytest

from gradaudit.trace import (
    Backward,
    Chain,
    ChainCall,
    GradEvent,
    Location,
    Optimizer,
    Parameter,
    Term,
    Trace,
    TraceError,
    Window,
)

HERE = Location("train.py", 12, "main")


def small_trace() -> Trace:
    """Every kind of field a trace holds: nested dataclasses, optionals, lists and dicts."""
    return Trace(
        program="train.py",
        window=Window(2, "iterations"),
        parameters=[Parameter("model.weight", "model", [4, 4], True, [0]), Parameter("head.bias", "head", [1], True)],
        optimizers=[Optimizer(0, "optimizer", "Adam", HERE, steps=2)],
        backwards=[
            Backward(
                0, HERE, True, True, [Term("mse", HERE, False, ["model"], {"model": 0.5})], ["model"], {"model": []}
            )
        ],
        events=[
            GradEvent(0, "accumulate", "model.weight", backward=0, norm=0.5, location=HERE),
            GradEvent(1, "apply", "model.weight", optimizer=0, by="optimizer.step()"),
        ],
        chains=[Chain("cell", 0, None, [ChainCall(True, True, 1.0, 2.0), ChainCall(True, False)])],
    )


def damaged(change) -> dict:
    raw = copy.deepcopy(small_trace().to_dict())
    change(raw)
    return raw


def test_a_saved_trace_loads_back_equal(tmp_path):
    trace = small_trace()
    trace.save(tmp_path / "trace.json")
    assert Trace.load(tmp_path / "trace.json") == trace


def set_(path: tuple, value):
    """A change that puts `value` at `path` inside the trace dict."""

    def change(raw: dict) -> None:
        *outer, last = path
        for key in outer:
            raw = raw[key]
        raw[last] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (set_(("events", 1, "optimizer"), 5), "events[1].optimizer: 5 names no optimizer"),
        (set_(("events", 0, "backward"), -1), "events[0].backward: -1 names no backward pass"),
        (set_(("parameters", 0, "owners"), [-1]), "parameters[0].owners: -1 names no optimizer"),
        (set_(("events", 0, "param"), "ghost.weight"), "events[0].param: 'ghost.weight' names no parameter"),
        (set_(("chains", 0, "backward"), 3), "chains[0].backward: 3 names no backward pass"),
        (set_(("optimizers", 0, "index"), 1), "optimizers[0].index: 1 is not its position, 0"),
        (set_(("parameters", 0, "shape"), "4x4"), 'parameters[0].shape: expected an array, got "4x4"'),
        (set_(("optimizers", 0, "steps"), True), "optimizers[0].steps: expected int, got true"),
        (set_(("events", 0, "location"), "train.py:12"), "events[0].location: expected an object (Location)"),
        (set_(("backwards", 0, "terms", 0, "grad_norms", "model"), "big"), "grad_norms['model']: expected float"),
        (set_(("events",), {"0": {}}), "events: expected an array, got an object"),
        (lambda raw: raw["parameters"][1].pop("name"), "parameters[1]: Parameter lacks name"),
    ],
)
def test_damage_is_one_trace_error_that_says_where(change, message):
    with pytest.raises(TraceError, match="damaged gradaudit trace") as error:
        Trace.from_dict(damaged(change))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_deeply_nested_json_is_a_trace_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(TraceError, match="nested too deeply"):
        Trace.load(path)


def test_a_million_events_load():
    """Type hints are resolved once per dataclass, not once per object (a 1M-event trace used to take minutes)."""
    raw = small_trace().to_dict()
    event = raw["events"][0]
    raw["events"] = [event] * 1_000_000
    trace = Trace.from_dict(raw)
    assert len(trace.events) == 1_000_000 and trace.events[-1].location == HERE
