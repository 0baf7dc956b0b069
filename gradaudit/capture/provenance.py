"""Op provenance: which user line produced each graph node, and where each constant lost (or never had) a history.

A `TorchFunctionMode` sees every torch call made while the audit is on. It keeps two maps:
- graph node -> `OpRecord` (the op, its line and source text, which arguments were constants, any constant factor);
- constant tensor -> `Break` (detach, no_grad, from data, .item() round trip, literal), inherited through later ops,
so that a dead loss term can be traced back to the line that cut its gradient.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from gradaudit.capture.source import call_argument_text, expression_of, location_of, user_frame
from gradaudit.trace import Break, Location

_DETACHING = {torch.Tensor.detach, torch.detach, torch.Tensor.detach_}
_FROM_DATA = {torch.as_tensor, torch.tensor, torch.from_numpy, torch.Tensor.new_tensor, torch.asarray}
_TO_PYTHON = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__}
_REGRESSION_LOSSES = {F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss}
_HARMLESS_KINDS = ("literal", "factory")
_CAUSE_PRIORITY = ("detach", "no_grad", "item", "from_data", "unknown")
_MULTIPLY = {"mul", "__mul__", "__rmul__", "multiply", "mul_", "__imul__"}
_DIVIDE = {"div", "__truediv__", "true_divide", "divide", "div_", "__itruediv__"}
_MAX_RECORDS = 200_000


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


@dataclass
class RegressionCall:
    op: str
    location: Location | None
    target_expression: str
    target_node: Any


def op_name(func: Callable) -> str:
    return getattr(func, "__name__", str(func))


def _tensors(values: Any) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


class ProvenanceMode(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.records: OrderedDict[int, tuple[Any, OpRecord]] = OrderedDict()
        self.constants: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.named_constants: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.python_values: dict[float, Break] = {}
        self.regression_calls: list[RegressionCall] = []
        self.paused = False
        self.errors = 0

    def record_for(self, node: Any) -> OpRecord | None:
        entry = self.records.get(id(node))
        return entry[1] if entry is not None and entry[0] is node else None

    def break_for(self, tensor: torch.Tensor) -> Break | None:
        return self.constants.get(tensor)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not self.paused:
            try:
                self._observe(func, args, kwargs, result)
            except Exception:  # noqa: BLE001 - observing must never break the user's program
                self.errors += 1
        return result

    def _observe(self, func, args, kwargs, result) -> None:
        if func in _TO_PYTHON:
            self._observe_python_value(args[0], result)
            return
        outputs = (
            [result]
            if isinstance(result, torch.Tensor)
            else list(_tensors(result if isinstance(result, (list, tuple)) else ()))
        )
        if not outputs:
            return
        tracked = [o for o in outputs if o.requires_grad and o.grad_fn is not None]
        if tracked:
            self._record_graph_op(func, args, kwargs, tracked)
        elif all(not o.requires_grad for o in outputs):
            origin = self._constant_origin(func, args, kwargs)
            if origin is not None:
                for output in outputs:
                    self.constants[output] = origin

    def _record_graph_op(self, func, args, kwargs, outputs) -> None:
        frame = user_frame()
        record = OpRecord(op_name(func), location_of(frame), expression_of(frame))
        for index, arg in enumerate(args):
            if isinstance(arg, torch.Tensor) and not arg.requires_grad:
                record.constant_args[index] = self.constants.get(arg) or Break("unknown", "", None)
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
            target = args[1] if len(args) > 1 else kwargs.get("target")
            if isinstance(target, torch.Tensor) and target.grad_fn is not None:
                text = call_argument_text(record.expression, 1, "target")
                self.regression_calls.append(RegressionCall(record.op, record.location, text, target.grad_fn))

    @staticmethod
    def _factor(op: str, index: int, value: float) -> float | None:
        if op in _MULTIPLY:
            return value
        if op in _DIVIDE and index == 1 and value != 0:
            return 1.0 / value
        return None

    def _constant_origin(self, func, args, kwargs) -> Break | None:
        inputs = list(_tensors(list(args) + list(kwargs.values())))
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
                return self.python_values.get(float(data)) or self._break_here("literal", func)
            return self._break_here("from_data", func)
        inherited = [self.constants.get(t) or Break("unknown", "", None) for t in inputs if not t.requires_grad]
        if not inputs:
            return self._break_here("factory", func)
        causes = sorted(
            (b for b in inherited if b.kind not in _HARMLESS_KINDS), key=lambda b: _CAUSE_PRIORITY.index(b.kind)
        )
        return causes[0] if causes else (inherited[0] if inherited else None)

    def _observe_python_value(self, tensor: Any, value: Any) -> None:
        if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
            return
        if isinstance(value, numbers.Number) and math.isfinite(value):
            self.python_values[float(value)] = self._break_here("item", torch.Tensor.item)

    def _break_here(self, kind: str, func: Callable) -> Break:
        frame = user_frame()
        return Break(kind, op_name(func), location_of(frame), expression_of(frame))
