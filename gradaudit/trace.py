"""The Trace: plain, JSON-able data about what one audited window of training did to every gradient.

Capture writes it, rules read it. Nothing here imports torch, so a saved trace can be re-linted anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

TRACE_VERSION = 3
READABLE_VERSIONS = (2, 3)
"""Version 2 traces lack the run's arguments, the torch version and the graphs; they load with those left empty."""
RAW_GRAPH_CAP = 1500
"""Default largest autograd graph kept node by node for the HTML report (dot takes minutes on much larger ones)."""


class TraceError(ValueError):
    """A trace file that cannot be read back."""


@dataclass(frozen=True)
class Location:
    file: str
    line: int
    function: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Parameter:
    """One trainable tensor. `group` is the module call it belongs to (the unit findings speak of)."""

    name: str
    group: str
    shape: list[int]
    requires_grad: bool
    owners: list[int] = field(default_factory=list)
    """Indices of the optimizers whose param_groups hold it."""


@dataclass
class Optimizer:
    index: int
    name: str
    kind: str
    created_at: Location | None
    steps: int = 0


@dataclass
class Break:
    """Where a constant entered the loss: the op that cut (or never had) an autograd history."""

    kind: str
    """detach | no_grad | from_data | item | literal | unknown"""
    op: str
    location: Location | None
    expression: str = ""


@dataclass
class Term:
    """An addend of a backward root's top-level sum."""

    name: str
    location: Location | None
    """The line that added it to the loss."""
    constant: bool
    """No autograd path at all (a tensor without grad_fn)."""
    groups_reached: list[str]
    grad_norms: dict[str, float] = field(default_factory=dict)
    """Gradient norm of this term alone, per parameter group; empty when not measured."""
    coefficient: float | None = None
    """The constant factor the term was multiplied by, where it was one."""
    break_point: Break | None = None
    named_by_user: bool = False
    addends: int = 1
    """How many addends it stands for: repeated ones (same name, same line, e.g. a loss summed in a loop) are one
    term, and so are all the addends beyond the cap on terms (`more terms`)."""
    grads_skipped: str = ""
    """Why its own gradient was not measured (a backward through it runs program code that must run only once)."""
    reach_unknown: bool = False
    """Its graph holds a node whose backward may reach parameters its edges do not show (reentrant checkpointing, a
    custom autograd.Function), or the walk stopped in it: `groups_reached` may be incomplete."""


@dataclass
class Backward:
    index: int
    location: Location | None
    accumulates: bool
    """False for torch.autograd.grad, which returns gradients instead of accumulating them."""
    loss_finite: bool
    terms: list[Term]
    groups_reached: list[str]
    upstream: dict[str, list[str]] = field(default_factory=dict)
    """For each module group called in this graph: the groups whose outputs feed its inputs."""
    walk_truncated: bool = False
    """The graph was deeper or larger than the walk's limits: reach below the limit is unknown."""
    reach_unknown: bool = False
    """Some of what it reaches is unknown to the walk; the accumulated gradients were watched on every known
    parameter instead."""
    terms_beyond_cap: int = 0
    """Addends beyond the cap on terms, merged into its last term."""

    def term_matrix(self) -> tuple[list[str], dict[str, dict[str, float]]]:
        """Term x parameter-group gradient norms: (the groups, as columns; term name -> group -> norm)."""
        groups = sorted({g for term in self.terms for g in term.grad_norms})
        return groups, {term.name: dict(term.grad_norms) for term in self.terms if term.grad_norms}


@dataclass
class GradEvent:
    """One thing that happened to a parameter's .grad, in program order (`seq`)."""

    seq: int
    kind: str
    """accumulate | wipe | apply"""
    param: str
    backward: int | None = None
    optimizer: int | None = None
    norm: float | None = None
    finite: bool = True
    by: str = ""
    """What did it, in words: 'critic_opt.zero_grad()', 'set to None', 'manual update'."""
    location: Location | None = None


@dataclass
class RegressionTarget:
    """A regression loss whose target argument carried gradient, and what each side of the loss reached."""

    op: str
    location: Location | None
    target_expression: str
    groups_reached: list[str]
    """Groups the target reaches."""
    prediction_expression: str = ""
    """The other operand (`input` in torch's signature)."""
    prediction_groups: list[str] = field(default_factory=list)
    shared_groups: list[str] = field(default_factory=list)
    """Groups holding parameters that both sides reach: the loss moves the target toward the prediction there."""


@dataclass
class ChainCall:
    """One call of a repeatedly applied module, in forward order."""

    carried: bool
    """Its output was part of this backward's graph (False: computed under no_grad or detached away)."""
    linked: bool
    """Gradient flows from this call's output into the next call's input (always False for the last call)."""
    output_norm: float | None = None
    """Norm of the gradient at the call's output during the backward, read before any clipping."""
    param_norm: float | None = None
    """Norm of this call's own contribution to the module's parameter gradient."""


@dataclass
class Chain:
    """A module whose output feeds its own next call (unrolled sampler, RNN cell, fixed-point loop), per backward."""

    module: str
    backward: int
    location: Location | None
    """The call site of the last call."""
    calls: list[ChainCall]

    def carried_run(self) -> list[int]:
        """Indices of the longest run of gradient-linked calls: the steps the gradient really travels through."""
        best: list[int] = []
        run: list[int] = []
        for index, call in enumerate(self.calls):
            if call.carried:
                run.append(index)
                if len(run) > len(best):
                    best = list(run)
            if not (call.carried and call.linked):
                run = []
        return best

    def step_amplifications(self) -> list[float]:
        """Gradient norm at call k over that at call k+1 along the run (backward travels from the last call)."""
        norms = [self.calls[i].output_norm for i in self.carried_run()]
        return [a / b for a, b in zip(norms[:-1], norms[1:], strict=True) if a is not None and b]

    def amplification(self) -> float | None:
        """End-to-end: gradient norm at the first gradient-carrying call's output over that at the last one's."""
        run = self.carried_run()
        if len(run) < 2:
            return None
        first, last = self.calls[run[0]].output_norm, self.calls[run[-1]].output_norm
        return first / last if first is not None and last else None

    def per_step(self) -> float | None:
        """Geometric mean of the per-step amplification."""
        total, steps = self.amplification(), len(self.carried_run()) - 1
        return total ** (1 / steps) if total is not None and total > 0 and steps > 0 else None

    def param_shares(self) -> list[float | None]:
        """Each call's share of the gradient reaching the module's parameters (contribution norms, summing to 1)."""
        norms = [c.param_norm or 0.0 for c in self.calls]
        total = sum(norms)
        return [n / total if total and c.carried else None for n, c in zip(norms, self.calls, strict=True)]


@dataclass
class Selection:
    """A max/min that picks, element by element, between a clamped branch and an unclamped twin (PPO's clipping)."""

    op: str
    location: Location | None
    expression: str
    zero_share: float
    """Fraction of its output elements for which it picks an element the clamp saturated: no gradient flows."""


@dataclass
class Clamp:
    """A clamp-like op on a backward's graph: elements outside its bounds get zero gradient."""

    op: str
    location: Location | None
    expression: str
    backward: int
    lower: float | None
    upper: float | None
    """Bounds; a tensor bound is recorded as its smallest (lower) or largest (upper) element."""
    elements: int
    below: float
    """Fraction of elements under the lower bound."""
    above: float
    """Fraction of elements over the upper bound."""
    gate: bool = False
    """A ReLU-style gate (relu, relu6): listed for reference; an inactive hinge is often a satisfied constraint."""
    selection: Selection | None = None
    """The max/min downstream that picks between this clamp's branch and an unclamped twin, if any."""
    groups_reached: list[str] = field(default_factory=list)
    """The parameter groups behind the clamp's input: what stops learning where its gradient is zero."""

    @property
    def saturated(self) -> float:
        return self.below + self.above


@dataclass
class Exp:
    """An exp on a backward's graph: its gradient is its output, so large outputs mean huge gradients."""

    op: str
    location: Location | None
    expression: str
    backward: int
    dtype: str
    max_input: float
    """Largest finite input element."""
    max_output: float | None
    """Largest finite output element (None when all outputs overflowed)."""
    overflow: int
    """Elements whose finite input gave an infinite output."""
    elements: int


@dataclass
class NonFiniteOrigin:
    """The first op, in program order, that turned finite inputs into a NaN or Inf (forward pass)."""

    op: str
    location: Location | None
    expression: str
    backward: int
    kind: str
    """nan | inf"""


@dataclass
class FlowNode:
    """A node of the module-level gradient-flow graph; `id` is made of names, so it is the same in every run."""

    id: str
    kind: str
    """term | group | optimizer"""
    label: str
    cluster: str = ""
    """The module path a group sits under (`policy.mlp_extractor` for `policy.mlp_extractor.value_net`)."""
    detail: str = ""
    """One more line: a group's tensor count, a constant term's break, an optimizer's kind and steps."""
    location: Location | None = None


@dataclass
class FlowEdge:
    source: str
    target: str
    kind: str
    """gradient (term -> group it reaches) | input (group -> group feeding its input: gradient goes on into it)
    | member (group -> optimizer holding it)"""
    norm: float | None = None
    """gradient edges: the term's own gradient norm on the group (last pass at the location); None: not measured."""
    fate: str = ""
    """gradient edges: applied | wiped | pending | returned (torch.autograd.grad); `by` says by what."""
    by: str = ""
    """`critic_opt.step()`, `actor_opt.zero_grad() at train.py:36`."""


@dataclass
class FlowGraph:
    """Where the terms of the backward passes at one location send gradient, and which optimizers apply it.

    `backward` None: the groups no backward reached, with their optimizers."""

    backward: Location | None
    passes: int
    nodes: list[FlowNode] = field(default_factory=list)
    edges: list[FlowEdge] = field(default_factory=list)


@dataclass
class RawNode:
    op: str
    """The autograd node's class (`MulBackward0`, `AccumulateGrad`)."""
    param: str | None = None
    """For a parameter's AccumulateGrad: the parameter's name."""


@dataclass
class RawGraph:
    """The autograd graph of the first backward at a location; nodes by discovery order from the root."""

    backward: Location | None
    node_count: int
    nodes: list[RawNode] = field(default_factory=list)
    """Empty when node_count is over the cap the audit ran with."""
    edges: list[list[int]] = field(default_factory=list)
    """[node, next node] pairs: gradient flows from the first to the second."""


@dataclass
class Window:
    iterations: int
    stopped_by: str
    """iterations | cap (gradaudit stopped the program) | program-end (it returned or exited) | exception |
    interrupted (Ctrl-C) | context-exit (the `with gradaudit.audit()` block ended)"""
    note: str = ""
    """How the program ended when that was not plain (sys.exit(3), os._exit, an exception), and the exit status."""
    internal_errors: int = 0
    """Errors inside gradaudit's own hooks during the window: when non-zero, the audit is partial."""


@dataclass
class Watch:
    """Whole-run watching: the first window in full, then one light sample every `every` iterations (a full one after
    a warning sign), and each group's gradient norm in each sample."""

    every: int
    """Iterations from one light sample to the next (the latest chosen, when `automatic`)."""
    automatic: bool = False
    """`every` chosen as the run went, so that light samples add at most `budget` to the plain iterations' time."""
    budget: float = 0.06
    """6 %: with the checks that stay on between samples (a NaN read per backward, the step hooks: about 4 % of a
    1 ms step), watching keeps within 10 % of the unwatched run."""
    iterations: list[int] = field(default_factory=list)
    """The first iteration (from 1) of each sample."""
    full: list[bool] = field(default_factory=list)
    """Whether each sample was a full audit (else light)."""
    every_per_sample: list[int] = field(default_factory=list)
    """The `every` in force when each sample was taken (the next light sample came that many iterations later)."""
    group_norms: dict[str, list[float | None]] = field(default_factory=dict)
    """Per group, its gradient norm in each sample (None: it received none)."""
    iteration_seconds: float | None = None
    """Mean wall time of an unaudited iteration (the program's own time between two of its steps)."""
    sample_seconds: float | None = None
    """Mean wall time a light sample added to its iteration (recording, the trace and the rules)."""
    cost: float | None = None
    """Estimated time of the run with light samples every `every` over its time without them (1.05: 5 % more)."""


@dataclass
class Trace:
    program: str
    window: Window
    parameters: list[Parameter] = field(default_factory=list)
    optimizers: list[Optimizer] = field(default_factory=list)
    backwards: list[Backward] = field(default_factory=list)
    events: list[GradEvent] = field(default_factory=list)
    regression_targets: list[RegressionTarget] = field(default_factory=list)
    chains: list[Chain] = field(default_factory=list)
    clamps: list[Clamp] = field(default_factory=list)
    exps: list[Exp] = field(default_factory=list)
    nonfinite_origins: list[NonFiniteOrigin] = field(default_factory=list)
    version: int = TRACE_VERSION
    arguments: list[str] = field(default_factory=list)
    """The program's command-line arguments."""
    torch_version: str = ""
    flow_graphs: list[FlowGraph] = field(default_factory=list)
    raw_graphs: list[RawGraph] = field(default_factory=list)
    light: bool = False
    """Audited in light mode: no op provenance, per-term gradients, chains or numerics were recorded."""
    watch: Watch | None = None

    def parameter(self, name: str) -> Parameter:
        return self.derived(_parameters_by_name)[name]

    def groups(self) -> dict[str, list[Parameter]]:
        return self.derived(_grouped)

    def derived(self, make: Callable[[Trace], T]) -> T:
        """What `make` derives from this Trace, made once for all who ask (the replay of the gradient timeline, which
        several rules and the flow graphs read; parameters by name and by group, looked up for each finding): a
        Trace is not changed once built."""
        made = self._derived
        if make not in made:
            made[make] = make(self)
        return made[make]

    @functools.cached_property
    def _derived(self) -> dict[Callable[[Trace], Any], Any]:
        return {}

    def optimizer_label(self, index: int) -> str:
        return self.optimizers[index].name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        try:
            with collector_paused():
                raw = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise TraceError(f"no trace file at {path}") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TraceError(f"{path} is not a readable trace JSON file ({exc})") from exc
        except RecursionError:
            raise TraceError(f"{path} is not a gradaudit trace (its JSON is nested too deeply to read)") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "trace") -> Trace:
        """Checks every value against the field types and every cross-reference; damage is a one-line TraceError."""
        if not isinstance(raw, dict) or "version" not in raw:
            raise TraceError(f"{source} is not a gradaudit trace (no version field)")
        if raw["version"] not in READABLE_VERSIONS:
            readable = " and ".join(map(str, READABLE_VERSIONS))
            raise TraceError(
                f"{source} is a gradaudit trace of version {raw['version']!r}; this gradaudit reads versions {readable}"
            )
        try:
            with collector_paused():
                trace = _converter(cls)(raw)
            _check_references(trace)
        except _Damage as exc:
            raise TraceError(f"{source} is a damaged gradaudit trace ({exc})") from None
        return trace


def _parameters_by_name(trace: Trace) -> dict[str, Parameter]:
    return {p.name: p for p in trace.parameters}


def _grouped(trace: Trace) -> dict[str, list[Parameter]]:
    grouped: dict[str, list[Parameter]] = {}
    for p in trace.parameters:
        grouped.setdefault(p.group, []).append(p)
    return grouped


T = TypeVar("T")


def by_site(items: Iterable[T], site: Callable[[T], Hashable]) -> list[list[T]]:
    """The items grouped by call site (across backward passes), in order of first appearance."""
    grouped: dict[Hashable, list[T]] = {}
    for item in items:
        grouped.setdefault(site(item), []).append(item)
    return list(grouped.values())


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pauses the cyclic garbage collector while a trace is built (loaded, or recorded) and read, or a graph walked:
    millions of new objects make it run over and over (40% of the load time) and there is no cycle among them to
    find."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _Damage(Exception):
    """A value that does not fit the trace's schema, and where it sits (`events[3].optimizer`)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.steps: list[str] = []

    def inside(self, step: str) -> _Damage:
        """Adds the enclosing field (`.name`) or item (`[3]`) while the error travels outward."""
        self.steps.append(step)
        return self

    def __str__(self) -> str:
        where = "".join(reversed(self.steps)).removeprefix(".")
        return f"{where}: {self.problem}" if where else self.problem


Converter = Callable[[Any], Any]

_JSON_TYPES: dict[type, tuple[type, ...]] = {int: (int,), float: (float, int), str: (str,), bool: (bool,)}
"""The JSON values each scalar field accepts (exact types: a boolean is not an int here)."""


@functools.cache
def _converter(kind: Any) -> Converter:
    """The function that checks a JSON value against a field type and rebuilds it; made once per type."""
    if dataclasses.is_dataclass(kind):
        return _dataclass_converter(kind)
    origin, args = get_origin(kind), get_args(kind)
    if origin is list:
        return _list_converter(_converter(args[0]))
    if origin is dict:
        return _dict_converter(_converter(args[1]))
    if type(None) in args:
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _optional_converter(_converter(inner))
    if kind in _JSON_TYPES:
        return _scalar_converter(kind)
    raise TypeError(f"no trace converter for the type {kind!r}")


def _describe(raw: Any) -> str:
    if isinstance(raw, dict | list):
        return "an object" if isinstance(raw, dict) else "an array"
    text = json.dumps(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def _dataclass_converter(kind: type) -> Converter:
    hints = get_type_hints(kind)
    fields = [(field.name, _converter(hints[field.name])) for field in dataclasses.fields(kind)]

    def convert(raw: Any) -> Any:
        if type(raw) is not dict:
            raise _Damage(f"expected an object ({kind.__name__}), got {_describe(raw)}")
        values = {}
        for name, field_converter in fields:
            if name in raw:
                try:
                    values[name] = field_converter(raw[name])
                except _Damage as exc:
                    raise exc.inside(f".{name}") from None
        try:
            return kind(**values)
        except TypeError:
            missing = [name for name, _ in fields if name not in raw]
            raise _Damage(f"{kind.__name__} lacks {', '.join(missing)}") from None

    return convert


def _list_converter(item: Converter) -> Converter:
    def convert(raw: Any) -> list[Any]:
        if type(raw) is not list:
            raise _Damage(f"expected an array, got {_describe(raw)}")
        built = []
        for index, value in enumerate(raw):
            try:
                built.append(item(value))
            except _Damage as exc:
                raise exc.inside(f"[{index}]") from None
        return built

    return convert


def _dict_converter(value_converter: Converter) -> Converter:
    def convert(raw: Any) -> dict[str, Any]:
        if type(raw) is not dict:
            raise _Damage(f"expected an object, got {_describe(raw)}")
        built = {}
        for key, value in raw.items():
            try:
                built[key] = value_converter(value)
            except _Damage as exc:
                raise exc.inside(f"[{key!r}]") from None
        return built

    return convert


def _optional_converter(inner: Converter) -> Converter:
    def convert(raw: Any) -> Any:
        return None if raw is None else inner(raw)

    return convert


def _scalar_converter(kind: type) -> Converter:
    accepted = _JSON_TYPES[kind]

    def convert(raw: Any) -> Any:
        if type(raw) not in accepted:
            raise _Damage(f"expected {kind.__name__}, got {_describe(raw)}")
        return raw

    return convert


def _check_references(trace: Trace) -> None:
    """The indices and names that rules look up must point at something: checked once, after loading."""
    optimizers, backwards = range(len(trace.optimizers)), range(len(trace.backwards))
    parameters = {p.name for p in trace.parameters}
    for table in ("optimizers", "backwards"):
        for position, item in enumerate(getattr(trace, table)):
            if item.index != position:
                raise _Damage(f"{item.index!r} is not its position, {position}").inside(f"{table}[{position}].index")
    for position, parameter in enumerate(trace.parameters):
        for owner in parameter.owners:
            _refer(owner, optimizers, "optimizer", "parameters", position, "owners")
    for position, event in enumerate(trace.events):
        _refer(event.param, parameters, "parameter", "events", position, "param")
        _refer(event.optimizer, optimizers, "optimizer", "events", position, "optimizer")
        _refer(event.backward, backwards, "backward pass", "events", position, "backward")
    for table in ("chains", "clamps", "exps", "nonfinite_origins"):
        for position, item in enumerate(getattr(trace, table)):
            _refer(item.backward, backwards, "backward pass", table, position, "backward")


def _refer(value: Any, known: range | set[str], what: str, table: str, position: int, name: str) -> None:
    """`value` (None: refers to nothing) must be in `known`; the path is formatted only when it is not."""
    if value is not None and value not in known:
        raise _Damage(f"{value!r} names no {what} in the trace").inside(f"{table}[{position}].{name}")
