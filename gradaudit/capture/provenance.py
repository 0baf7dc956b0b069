"""Op provenance: which user line produced each graph node, and where each constant lost (or never had) a history.

A `TorchFunctionMode` sees every torch call made while the audit is on. It keeps two maps:
- graph node -> `OpRecord` (the op, its line and source text, which arguments were constants, any constant factor);
- constant tensor -> `Break` (detach, no_grad, from data, .item() round trip, literal), inherited through later ops,
so that a dead loss term can be traced back to the line that cut its gradient.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CodeType
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from gradaudit.capture.numerics import (
    GATES,
    MEASURED,
    NONFINITE_SOURCES,
    ClampStats,
    ExpStats,
    SaturationTracker,
    measure,
    nonfinite_birth,
)
from gradaudit.capture.source import call_argument_text, called_by_user, expression_of, location_of, user_frame
from gradaudit.capture.tensormap import TensorMap
from gradaudit.trace import Break, Location, Selection

_DETACHING = {torch.Tensor.detach, torch.detach, torch.Tensor.detach_}
_FROM_DATA = {torch.as_tensor, torch.tensor, torch.from_numpy, torch.Tensor.new_tensor, torch.asarray}
_TO_PYTHON = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__}
_REGRESSION_LOSSES = {F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss}
_HARMLESS_KINDS = ("literal", "factory")
_CAUSE_PRIORITY = ("detach", "no_grad", "item", "from_data", "unknown")
_MULTIPLY = {"mul", "__mul__", "__rmul__", "multiply", "mul_", "__imul__"}
_DIVIDE = {"div", "__truediv__", "true_divide", "divide", "div_", "__itruediv__"}
_MAX_RECORDS = 200_000
_MAX_PENDING = 20_000
_MAX_NONFINITE_SOURCES = 8
MAX_WRAPPED_RUN = 4_096
"""Longest chain of consecutive graph nodes the mode records: a recorded node keeps a Python wrapper, and PyTorch
frees a chain of wrapped nodes recursively on the C stack; one node in each run is left unrecorded."""
_HOOK_REGISTRATIONS = {torch.Tensor.register_hook: "a gradient hook", torch.Tensor.retain_grad: "retain_grad()"}
_UNKNOWN = Break("unknown", "", None)
"""A constant whose origin was not seen (made before the audit, or by gradaudit's own reads)."""
_MAX_SITES = 16_384


@dataclass
class OpRecord:
    op: str
    location: Location | None
    expression: str
    constant_args: dict[int, Break | None] = field(default_factory=dict)
    """Positional index -> Break for tensor arguments without history (None: a Python scalar)."""
    factor: float | None = None
    """A one-element constant operand's value (for `coef * term`)."""
    constant_names: dict[int, str] = field(default_factory=dict)
    """Constant arguments the user named with `audit.term(...)`."""
    nonfinite_inputs: list[NonFiniteCandidate] = field(default_factory=list)
    """Ops that may have put NaN/Inf into the constant data this op read."""


@dataclass
class RegressionCall:
    """A symmetric regression loss (mse, l1, smooth_l1, huber) whose two operands both carry a graph."""

    op: str
    location: Location | None
    target_expression: str
    target_node: Any
    """The `target` argument by torch's signature; for these losses the order says nothing about intent."""
    prediction_expression: str
    prediction_node: Any


@dataclass(eq=False)
class Measured:
    """A clamp or exp on a graph, with its input statistics; claimed by the backward whose graph holds `node`."""

    node: Any
    record: OpRecord
    stats: ClampStats | ExpStats
    clock: int
    selection: Selection | None = None
    """For a clamp: the max/min downstream that picks between it and an unclamped twin (the worst seen)."""


@dataclass
class NonFiniteCandidate:
    """An op that may have turned finite inputs into NaN/Inf; its flags are read only when a loss is non-finite."""

    born: torch.Tensor
    has_nan: torch.Tensor
    node: Any
    """The output's graph node; None for an op without history (its output reaches losses as data)."""
    record: OpRecord
    clock: int


Lineage = dict[int, tuple[int, int]]
"""id(module) -> (how many calls of that module fed this tensor, the index of the latest one)."""


def _has_history(tensor: torch.Tensor) -> bool:
    """Whether autograd records the tensor's history (read without making a grad_fn wrapper). A view made under
    no_grad whose base was then modified in place with grad on has none that can be read: torch raises on it."""
    try:
        return tensor.requires_grad and not tensor.is_leaf
    except RuntimeError:
        return False


def op_name(func: Callable) -> str:
    return getattr(func, "__name__", None) or str(func)


def never_compiled(*functions: Callable) -> None:
    """While a compiled region runs, dynamo compiles as graphs of their own the Python frames that the torch code it
    skips calls into (a global module hook, this mode's handler under `module.compile()`), which changes the numbers:
    gradaudit's run as plain Python instead, and so does what they call. Dynamo tracing into them from a compiled
    frame is unaffected (they step aside there: `torch.compiler.is_compiling()`)."""
    try:
        from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy
    except ImportError:  # a torch without dynamo's frame strategies
        return
    for function in functions:
        set_code_exec_strategy(function.__code__, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP))


_TOP_SAVED_TENSOR_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _saved_tensor_hooks_active() -> bool:
    """Whether ops run now save their tensors through hooks (non-reentrant checkpointing, offloading): unpacking
    them in a backward runs those hooks (and a checkpoint's forward again)."""
    return _TOP_SAVED_TENSOR_HOOKS is not None and _TOP_SAVED_TENSOR_HOOKS(True) is not None


def _tensors(values: Any) -> list[torch.Tensor]:
    """The tensors among `values`, and inside the lists and tuples among them."""
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found += [v for v in value if isinstance(v, torch.Tensor)]
    return found


class _Quiet:
    """Keeps a mode from observing for a while. Where it is on top of this thread's mode stack, it steps off the
    stack (and back on at the end), so that torch dispatches nothing to it at all: every call dispatched to a paused
    mode still costs a Python call, and gradaudit's own reads make hundreds per step. Elsewhere it is paused."""

    __slots__ = ("_mode", "_off_stack", "_was_paused")

    def __init__(self, mode: ProvenanceMode) -> None:
        self._mode = mode

    def __enter__(self) -> None:
        depth = torch._C._len_torch_function_stack()
        self._off_stack = depth > 0 and torch._C._get_function_stack_at(depth - 1) is self._mode
        if self._off_stack:
            torch._C._pop_torch_function_stack()
        else:
            self._was_paused, self._mode.paused = self._mode.paused, True

    def __exit__(self, *exc_info: object) -> None:
        if self._off_stack:
            torch._C._push_on_torch_function_stack(self._mode)
        else:
            self._mode.paused = self._was_paused


class ProvenanceMode(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        never_compiled(ProvenanceMode.__torch_function__)
        self.records: OrderedDict[int, tuple[Any, OpRecord]] = OrderedDict()
        self.constants = TensorMap()
        self.named_constants = TensorMap()
        self.python_values: dict[float, Break] = {}
        self.numbers_seen: dict[tuple[CodeType, int, CodeType | None, int], numbers.Number] = {}
        """The first number each call site (and its caller's) turned into a tensor: if it changes, data feeds it."""
        self.regression_calls: list[RegressionCall] = []
        self.lineage = TensorMap()
        self.measured: deque[Measured] = deque(maxlen=_MAX_PENDING)
        self.nonfinite: deque[NonFiniteCandidate] = deque(maxlen=_MAX_PENDING)
        """Candidates on graphs, found by their node."""
        self.saturation = SaturationTracker()
        self.nonfinite_from = TensorMap()
        """Constant tensor -> the candidates its data came through, so that NaN data reaching a loss is traced."""
        self.clock = 0
        """Ops observed so far: pending records older than the previous iteration are dropped by it."""
        self.last_sequence_nr = -1
        """Largest autograd sequence number seen: nodes a module call creates have larger ones."""
        self.paused = False
        self.errors = 0
        self.user_code: OrderedDict[int, tuple[Any, str]] = OrderedDict()
        """Graph node -> the program code a backward through it runs (hooks, saved-tensor hooks), in words."""
        self.wrapped_run = TensorMap()
        """Tensor -> length of the run of recorded nodes that ends at its grad_fn (see MAX_WRAPPED_RUN)."""
        self._sites: dict[tuple[CodeType, int], tuple[Location | None, str]] = {}

    def quiet(self) -> _Quiet:
        """gradaudit's own torch calls are not the program's: keep them out of provenance (`with mode.quiet(): ...`)."""
        return _Quiet(self)

    def user_site(self) -> tuple[Location | None, str]:
        """The user's line running now and the expression it evaluates, shared by every op made at that point of the
        code during the audit (read once per call site: every recorded op has one). Its path is relative to the
        working directory of the site's first op (reading it again would cost a system call per op)."""
        frame = user_frame(sys._getframe(1))
        if frame is None:
            return None, ""
        key = (frame.f_code, frame.f_lasti)
        site = self._sites.get(key)
        if site is None:
            if len(self._sites) >= _MAX_SITES:
                self._sites.clear()
            site = self._sites[key] = (location_of(frame), expression_of(frame))
        return site

    def record_for(self, node: Any) -> OpRecord | None:
        entry = self.records.get(id(node))
        return entry[1] if entry is not None and entry[0] is node else None

    def break_for(self, tensor: torch.Tensor) -> Break | None:
        return self.constants.get(tensor)

    def user_code_for(self, node: Any) -> str | None:
        entry = self.user_code.get(id(node))
        return entry[1] if entry is not None and entry[0] is node else None

    def mark_user_code(self, node: Any, what: str) -> None:
        """Notes that a backward through `node` runs program code: measuring a term through it would run it again."""
        if node is not None and self.user_code_for(node) is None:
            self.user_code[id(node)] = (node, what)
            while len(self.user_code) > _MAX_RECORDS:
                self.user_code.popitem(last=False)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.paused or torch.compiler.is_compiling():  # compiling: dynamo traces this method, so step aside
            return func(*args, **(kwargs or {}))  # (no graph break, the same graph)
        kwargs = kwargs or {}
        name = op_name(func)
        if func in _HOOK_REGISTRATIONS:
            self._note_hook_registration(func, args)
        stats = None
        if name in MEASURED and torch.is_grad_enabled() and (name not in GATES or called_by_user()):
            try:
                stats = measure(name, args, kwargs)
            except Exception:  # noqa: BLE001 - observing must never break the user's program
                self.errors += 1
        result = func(*args, **kwargs)
        try:
            self._observe(func, name, args, kwargs, result, stats)
        except Exception:  # noqa: BLE001
            self.errors += 1
        return result

    def _note_hook_registration(self, func, args) -> None:
        tensor = args[0] if args else None
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad and not tensor.is_leaf:
            where = self.user_site()[0]
            self.mark_user_code(tensor.grad_fn, f"{_HOOK_REGISTRATIONS[func]}{f' at {where}' if where else ''}")

    def _observe(self, func, name, args, kwargs, result, stats) -> None:
        self.clock += 1
        if func in _TO_PYTHON:
            self._observe_python_value(args[0], result)
            return
        outputs = (
            [result]
            if isinstance(result, torch.Tensor)
            else _tensors(result if isinstance(result, (list, tuple)) else ())
        )
        if not outputs:
            return
        tracked = [o for o in outputs if _has_history(o)]
        inputs = _tensors((*args, *kwargs.values()) if kwargs else args)
        if self.lineage:
            self._inherit_lineage(inputs, outputs)
        sources = self._nonfinite_sources(inputs) if self.nonfinite_from else []
        if tracked and not self._within_wrapped_run(inputs, tracked):
            tracked = []
        record = None
        if tracked:
            record = self._record_graph_op(func, name, args, kwargs, tracked)
            record.nonfinite_inputs = sources
            if _saved_tensor_hooks_active():
                what = f"saved-tensor hooks (activation checkpointing) around {record.location or record.op}"
                for output in tracked:
                    self.mark_user_code(output.grad_fn, what)
            measured = Measured(tracked[0].grad_fn, record, stats, self.clock) if stats is not None else None
            if measured is not None:
                self.measured.append(measured)
            self._follow_saturation(name, args, kwargs, inputs, tracked[0], record, measured)
        elif all(not o.requires_grad for o in outputs):
            origin = self._constant_origin(func, args, kwargs, inputs)
            if origin is not None:
                for output in outputs:
                    self.constants[output] = origin
        if name in NONFINITE_SOURCES:
            born, has_nan = nonfinite_birth(inputs, outputs)
            if record is None:
                record = OpRecord(name, *self.user_site())
            candidate = NonFiniteCandidate(born, has_nan, tracked[0].grad_fn if tracked else None, record, self.clock)
            if tracked:
                self.nonfinite.append(candidate)
            sources = [candidate, *sources][:_MAX_NONFINITE_SOURCES]
        if sources and not tracked:
            for output in outputs:
                self.nonfinite_from[output] = sources

    def _follow_saturation(
        self,
        name: str,
        args: tuple,
        kwargs: dict,
        inputs: list[torch.Tensor],
        output: torch.Tensor,
        record: OpRecord,
        measured: Measured | None,
    ) -> None:
        """Starts at a clamp, follows its saturated elements through elementwise ops, and at a max/min between a
        clamped branch and its twin, notes on each clamp the share of elements where the pick has no gradient."""
        if measured is not None and isinstance(measured.stats, ClampStats) and not measured.stats.gate:
            saturated, measured.stats.saturated = measured.stats.saturated, None
            self.saturation.start(output, measured, saturated, inputs)
        elif self.saturation:
            for clamp, share in self.saturation.follow(name, args, kwargs, output).items():
                if clamp.selection is None or share > clamp.selection.zero_share:
                    clamp.selection = Selection(name, record.location, record.expression, share)

    def _within_wrapped_run(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> bool:
        """Whether recording these outputs keeps every run of recorded nodes within MAX_WRAPPED_RUN."""
        longest = 0
        for tensor in inputs:
            longest = max(longest, self.wrapped_run.get(tensor, 0))
        run = longest + 1
        if run > MAX_WRAPPED_RUN:
            return False
        for output in outputs:
            self.wrapped_run[output] = run
        return True

    def _nonfinite_sources(self, inputs: list[torch.Tensor]) -> list[NonFiniteCandidate]:
        found = [c for tensor in inputs for c in self.nonfinite_from.get(tensor, ())]
        return list({id(c): c for c in found}.values())[:_MAX_NONFINITE_SOURCES]

    def lineage_of(self, tensors: list[torch.Tensor]) -> Lineage:
        """The module calls that fed these tensors, merged: for each module its longest feeding chain."""
        merged: Lineage | None = None
        for tensor in tensors:
            found = self.lineage.get(tensor)
            if found is None or found is merged:
                continue
            if merged is None:
                merged = found
                continue
            merged = dict(merged)
            for module, entry in found.items():
                if module not in merged or merged[module][0] < entry[0]:
                    merged[module] = entry
        return merged or {}

    def _inherit_lineage(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        inherited = self.lineage_of(inputs)
        if inherited:
            for output in outputs:
                self.lineage[output] = inherited

    def forget_before(self, clock: int) -> None:
        """Drops pending records made before `clock` (the previous iteration): their graphs are gone."""
        for pending in (self.measured, self.nonfinite):
            while pending and pending[0].clock < clock:
                pending.popleft()

    def _record_graph_op(self, func, name, args, kwargs, outputs) -> OpRecord:
        record = OpRecord(name, *self.user_site())
        self.last_sequence_nr = max(self.last_sequence_nr, outputs[-1].grad_fn._sequence_nr())
        for index, arg in enumerate(args):
            if isinstance(arg, torch.Tensor) and not arg.requires_grad:
                record.constant_args[index] = self.constants.get(arg) or _UNKNOWN
                if arg in self.named_constants:
                    record.constant_names[index] = self.named_constants[arg]
                if arg.numel() == 1:
                    record.factor = self._factor(record.op, index, float(arg.detach().reshape(()).item()))
            elif isinstance(arg, numbers.Number) and not isinstance(arg, bool):
                record.constant_args[index] = None
                record.factor = self._factor(record.op, index, float(arg))
        for output in outputs:
            self.records[id(output.grad_fn)] = (output.grad_fn, record)
        while len(self.records) > _MAX_RECORDS:
            self.records.popitem(last=False)
        if func in _REGRESSION_LOSSES:
            self._note_regression_call(record, args, kwargs)
        return record

    def _note_regression_call(self, record: OpRecord, args: tuple, kwargs: dict) -> None:
        """Keeps both operands' nodes: a target that carries gradient matters only where both sides share parameters
        (`F.mse_loss(returns, values)` with detached returns is as clean as `F.mse_loss(values, returns)`)."""
        prediction = args[0] if args else kwargs.get("input")
        target = args[1] if len(args) > 1 else kwargs.get("target")
        if not all(isinstance(t, torch.Tensor) and t.grad_fn is not None for t in (prediction, target)):
            return
        self.regression_calls.append(
            RegressionCall(
                record.op,
                record.location,
                call_argument_text(record.expression, 1, "target"),
                target.grad_fn,
                call_argument_text(record.expression, 0, "input"),
                prediction.grad_fn,
            )
        )

    @staticmethod
    def _factor(op: str, index: int, value: float) -> float | None:
        if op in _MULTIPLY:
            return value
        if op in _DIVIDE and index == 1 and value != 0:
            return 1.0 / value
        return None

    def _constant_origin(self, func, args, kwargs, inputs: list[torch.Tensor]) -> Break | None:
        if func in _DETACHING and inputs and inputs[0].requires_grad:
            return self._break_here("detach", func)
        if not torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            return self._break_here("no_grad", func)
        if func in _FROM_DATA:
            data_args = args[1:] if func is torch.Tensor.new_tensor else args
            data = data_args[0] if data_args else kwargs.get("data")
            if isinstance(data, torch.Tensor):
                return self.constants.get(data)
            if isinstance(data, numbers.Number):
                return self._number_origin(data, func)
            return self._break_here("from_data", func)
        inherited = [self.constants.get(t) or _UNKNOWN for t in inputs if not t.requires_grad]
        if not inputs:
            return self._break_here("factory", func)
        causes = sorted(
            (b for b in inherited if b.kind not in _HARMLESS_KINDS), key=lambda b: _CAUSE_PRIORITY.index(b.kind)
        )
        return causes[0] if causes else (inherited[0] if inherited else None)

    def _number_origin(self, value: numbers.Number, func: Callable) -> Break:
        """A number turned into a tensor is a literal only when it is written in the calling code or is the same
        every time that line runs; a numpy scalar (np.float64 is a float) or a number that changes is data."""
        if type(value).__module__ == "numpy":
            return self._break_here("from_data", func)
        from_graph = self.python_values.get(float(value))
        if from_graph is not None:
            return from_graph
        frame = user_frame()
        caller = frame.f_back if frame is not None else None
        if frame is None or any(value in f.f_code.co_consts for f in (frame, caller) if f is not None):
            return self._break_here("literal", func)  # written here, or passed by a helper's caller
        site = (frame.f_code, frame.f_lasti, caller.f_code if caller else None, caller.f_lasti if caller else -1)
        first = self.numbers_seen.setdefault(site, value)
        same = first == value or (first != first and value != value)  # NaN is the same NaN
        return self._break_here("literal" if same else "from_data", func)

    def _observe_python_value(self, tensor: Any, value: Any) -> None:
        if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
            return
        if isinstance(value, numbers.Number) and math.isfinite(value):
            self.python_values[float(value)] = self._break_here("item", torch.Tensor.item)

    def _break_here(self, kind: str, func: Callable) -> Break:
        return Break(kind, op_name(func), *self.user_site())
