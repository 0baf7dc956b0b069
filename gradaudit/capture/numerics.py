"""Numerics of single ops, measured on their inputs as the op runs: clamp saturation, exp inputs, NaN/Inf births,
and which branch a max/min over a clamped value and its unclamped twin selects.

Measured before the op executes, so in-place variants (`clamp_`, `exp_`) are seen on their real inputs.
"""

from __future__ import annotations

import cmath
import functools
import math
import operator
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from gradaudit.capture.tensormap import TensorMap

CLAMPS = frozenset({"clamp", "clip", "clamp_", "clip_", "clamp_min", "clamp_max", "clamp_min_", "clamp_max_"})
HARDTANH = frozenset({"hardtanh", "hardtanh_"})
GATES = frozenset({"relu", "relu_", "relu6"})
EXPS = frozenset({"exp", "exp_"})
MEASURED = CLAMPS | HARDTANH | GATES | EXPS
NONFINITE_SOURCES = frozenset(
    {
        "log", "log_", "log2", "log10", "log1p", "sqrt", "rsqrt", "reciprocal", "div", "div_", "divide",
        "true_divide", "__truediv__", "__rtruediv__", "__itruediv__", "pow", "pow_", "__pow__", "__rpow__",
        "exp", "exp_", "expm1", "acos", "asin", "atanh", "acosh", "lgamma", "digamma", "erfinv", "tan",
        "logit", "xlogy",
    }
)  # fmt: skip
"""Ops that turn finite inputs into NaN or Inf (domain edges, overflow, division by zero)."""
ELEMENTWISE = frozenset(
    {
        "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__", "rsub",
        "subtract", "mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply", "div", "div_", "__truediv__",
        "__rtruediv__", "__itruediv__", "true_divide", "divide", "neg", "neg_", "__neg__", "negative", "pow", "pow_",
        "__pow__", "__rpow__", "square", "abs", "abs_", "__abs__", "exp", "exp_", "log", "log_", "log1p", "expm1",
        "sqrt", "tanh", "sigmoid", "float", "double", "half", "to", "type_as", "clone", "contiguous",
    }
)  # fmt: skip
"""Ops whose output element i depends only on input element i (after broadcasting)."""
SELECTIONS = {"max": "max", "min": "min", "maximum": "max", "minimum": "min", "fmax": "max", "fmin": "min"}
"""Elementwise max/min of two tensors: the gradient goes to the selected operand only (split on ties)."""


@dataclass
class ClampStats:
    lower: float | None
    upper: float | None
    elements: int
    below: float
    above: float
    gate: bool
    saturated: torch.Tensor | None = None
    """The elements outside the bounds of a clamp (not a gate) that has any; handed to `SaturationTracker.start`."""


@dataclass
class ExpStats:
    dtype: str
    max_input: float
    max_output: float | None
    overflow: int
    elements: int


def _argument(args: tuple, kwargs: dict, position: int, *names: str) -> Any:
    if len(args) > position:
        return args[position]
    return next((kwargs[n] for n in names if n in kwargs), None)


def _bound(value: Any, reduce: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(getattr(value.detach(), reduce)())
    return float(value)


def _bounds(op: str, args: tuple, kwargs: dict) -> tuple[Any, Any]:
    if op in GATES:
        return 0.0, (6.0 if op == "relu6" else None)
    if op in HARDTANH:
        return _argument(args, kwargs, 1, "min_val"), _argument(args, kwargs, 2, "max_val")
    if op.startswith("clamp_min"):
        return _argument(args, kwargs, 1, "min"), None
    if op.startswith("clamp_max"):
        return None, _argument(args, kwargs, 1, "max")
    return _argument(args, kwargs, 1, "min"), _argument(args, kwargs, 2, "max")


def measure(op: str, args: tuple, kwargs: dict) -> ClampStats | ExpStats | None:
    """Statistics of the op's first input, when the op is one whose saturation or overflow kills gradients."""
    x = _argument(args, kwargs, 0, "input", "self")
    if not isinstance(x, torch.Tensor) or not x.requires_grad or x.numel() == 0 or not x.is_floating_point():
        return None
    x = x.detach()
    if op in EXPS:
        return _exp_stats(x)
    lower, upper = _bounds(op, args, kwargs)
    if op in HARDTANH:
        lower, upper = -1.0 if lower is None else lower, 1.0 if upper is None else upper
    n = x.numel()
    outside = [x < lower if lower is not None else None, x > upper if upper is not None else None]
    below, above = (float(mask.sum()) / n if mask is not None else 0.0 for mask in outside)
    gate = op in GATES
    stats = ClampStats(_bound(lower, "min"), _bound(upper, "max"), n, below, above, gate)
    if not gate and below + above > 0:
        stats.saturated = functools.reduce(operator.or_, [mask for mask in outside if mask is not None])
    return stats


def _exp_stats(x: torch.Tensor) -> ExpStats:
    """The largest finite input and how many finite inputs overflow. When the largest input is finite (no NaN, no
    +Inf) it is the largest finite one, and only an input above the overflow point needs the elements counted."""
    overflow_at = math.log(torch.finfo(x.dtype).max)
    max_input = float(x.max())
    if math.isfinite(max_input):
        overflow = int((x > overflow_at).sum()) if max_input > overflow_at else 0
    else:
        finite = x[torch.isfinite(x)]
        max_input = float(finite.max()) if finite.numel() else -math.inf
        overflow = int((finite > overflow_at).sum())
    max_output = math.exp(max_input) if max_input <= overflow_at else None
    return ExpStats(str(x.dtype).removeprefix("torch."), max_input, max_output, overflow, x.numel())


@dataclass
class _ZeroGrad:
    """Elements of a tensor that pass no gradient back (every path from them runs through a saturated clamp
    element), and for each clamp behind the tensor, the elements it saturated on their path."""

    zero: torch.Tensor
    by_clamp: dict[Hashable, torch.Tensor] = field(default_factory=dict)


class SaturationTracker:
    """Follows the elements a clamp saturated through elementwise ops to a max/min that picks between the clamped
    branch and an unclamped twin (PPO's ratio and value clipping), and measures how often it picks a dead element."""

    def __init__(self) -> None:
        self._state = TensorMap()

    def __bool__(self) -> bool:
        return len(self._state) > 0

    def start(
        self, output: torch.Tensor, clamp: Hashable, saturated: torch.Tensor | None, inputs: list[torch.Tensor]
    ) -> None:
        """A clamp's output: dead where the clamp saturated (None: nowhere) and where its input already was."""
        state = _ZeroGrad(torch.zeros((), dtype=torch.bool, device=output.device).expand(output.shape))
        if saturated is not None and (own := _broadcast(saturated, output)) is not None:
            state = _ZeroGrad(own, {clamp: own})
        upstream = self._state.get(inputs[0]) if inputs else None
        if upstream is not None and (zero := _broadcast(upstream.zero, output)) is not None:
            state.zero = state.zero | zero
            state.by_clamp.update(_aligned(upstream.by_clamp, output))
        if state.by_clamp:
            self._state[output] = state

    def follow(self, op: str, args: tuple, kwargs: dict, output: torch.Tensor) -> dict[Hashable, float]:
        """Carries dead elements through an elementwise op; at a max/min of two graph operands returns, per clamp
        behind them, the share of output elements whose selected operand is dead because of that clamp."""
        if op in SELECTIONS:
            other = args[1] if len(args) > 1 else kwargs.get("other")
            if len(args) and isinstance(args[0], torch.Tensor) and isinstance(other, torch.Tensor):
                return self._select(SELECTIONS[op], args[0], other, output)
        graph_inputs = [*_graph_tensors(args), *_graph_tensors(kwargs.values())] if op in ELEMENTWISE else []
        state = self._carried(graph_inputs, output)
        if state is not None:
            self._state[output] = state
        elif output in self._state:  # an in-place op rewrote a tracked tensor
            del self._state[output]
        return {}

    def _carried(self, graph_inputs: list[torch.Tensor], output: torch.Tensor) -> _ZeroGrad | None:
        """An output element is dead when it is dead in every input that carries a graph."""
        states = [self._state.get(t) for t in graph_inputs]
        if not states or any(s is None for s in states):
            return None
        zeros = [_broadcast(s.zero, output) for s in states]
        if any(z is None for z in zeros):
            return None
        state = _ZeroGrad(functools.reduce(operator.and_, zeros))
        for s in states:
            for clamp, mask in _aligned(s.by_clamp, output):
                state.by_clamp[clamp] = state.by_clamp[clamp] | mask if clamp in state.by_clamp else mask
        return state

    def _select(self, kind: str, a: torch.Tensor, b: torch.Tensor, output: torch.Tensor) -> dict[Hashable, float]:
        if not (a.requires_grad and b.requires_grad):
            return {}  # a hinge against a constant, not a twin: the clamp keeps the bare-clamp rule
        sides = [self._state.get(a), self._state.get(b)]
        if sides == [None, None]:
            return {}
        a, b = a.detach(), b.detach()
        picks = [a > b, b > a] if kind == "max" else [a < b, b < a]
        tie = ~(picks[0] | picks[1])
        tracked = [side for side, state in enumerate(sides) if state is not None]
        dead = {side: _dead(sides[side], output) for side in tracked}
        # The gradient reaches a dead element only: on a tie both operands share it, so both must be dead. A side
        # without dead elements adds nothing, and is left out.
        lost_where = [picks[side] & dead[side] for side in tracked] + (
            [tie & dead[0] & dead[1]] if len(dead) == 2 else []
        )
        lost = _broadcast(functools.reduce(operator.or_, lost_where), output)
        picked = {side: _broadcast(picks[side] | tie, output) for side in tracked}
        if lost is None or None in picked.values():
            return {}
        caused: dict[Hashable, torch.Tensor] = {}
        for side in tracked:
            for clamp, behind in _aligned(sides[side].by_clamp, output):
                here = lost & picked[side] & behind
                caused[clamp] = caused[clamp] | here if clamp in caused else here
        return {clamp: float(mask.sum()) / max(output.numel(), 1) for clamp, mask in caused.items()}


def _graph_tensors(values: Any) -> list[torch.Tensor]:
    return [v for v in values if isinstance(v, torch.Tensor) and v.requires_grad]


def _aligned(by_clamp: dict[Hashable, torch.Tensor], like: torch.Tensor) -> list[tuple[Hashable, torch.Tensor]]:
    return [(clamp, m) for clamp, mask in by_clamp.items() if (m := _broadcast(mask, like)) is not None]


def _dead(state: _ZeroGrad | None, like: torch.Tensor) -> torch.Tensor:
    found = _broadcast(state.zero, like) if state is not None else None
    return found if found is not None else torch.zeros((), dtype=torch.bool, device=like.device)


def _broadcast(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """The mask in `like`'s shape and device, or None when the op was not elementwise after all (the mask does not
    broadcast to that shape)."""
    shape, target = mask.shape, like.shape
    if len(shape) > len(target) or any(m != 1 and m != t for m, t in zip(reversed(shape), reversed(target))):
        return None
    return mask.to(like.device).expand(target)


def nonfinite_birth(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(born, has_nan) as 0-d tensors, left unread on an accelerator so that no device synchronises per op. On the
    CPU, where reading costs no synchronisation, finite dense outputs (nearly every op) are settled by one sum each."""
    if all(t.is_cpu and t.layout == torch.strided for t in outputs) and all(_finite_sum(t) for t in outputs):
        return _FALSE, _FALSE
    with torch.no_grad():
        inputs_finite = torch.stack([torch.isfinite(t).all() for t in inputs if t.is_floating_point()] or [_TRUE])
        outputs_finite = torch.stack([torch.isfinite(t).all() for t in outputs])
        has_nan = torch.stack([torch.isnan(t).any() for t in outputs]).any()
        born = inputs_finite.all().to(outputs_finite.device) & ~outputs_finite.all()
    return born, has_nan


def _finite_sum(tensor: torch.Tensor) -> bool:
    """Whether the elements' sum is finite, which they all are then (a NaN or Inf among them makes it NaN or Inf);
    a sum that overflows says nothing, and the caller looks at every element. A fifth of `isfinite().all()`'s cost."""
    return cmath.isfinite(tensor.detach().sum().item())


_TRUE, _FALSE = torch.tensor(True), torch.tensor(False)
