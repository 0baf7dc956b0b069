"""Numerics of single ops, measured on their inputs as the op runs: clamp saturation, exp inputs, NaN/Inf births.

Measured before the op executes, so in-place variants (`clamp_`, `exp_`) are seen on their real inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

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


@dataclass
class ClampStats:
    lower: float | None
    upper: float | None
    elements: int
    below: float
    above: float
    gate: bool


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
    below = float((x < lower).sum()) / n if lower is not None else 0.0
    above = float((x > upper).sum()) / n if upper is not None else 0.0
    return ClampStats(_bound(lower, "min"), _bound(upper, "max"), n, below, above, op in GATES)


def _exp_stats(x: torch.Tensor) -> ExpStats:
    finite = x[torch.isfinite(x)]
    max_input = float(finite.max()) if finite.numel() else -math.inf
    overflow_at = math.log(torch.finfo(x.dtype).max)
    overflow = int((finite > overflow_at).sum())
    max_output = math.exp(max_input) if max_input <= overflow_at else None
    return ExpStats(str(x.dtype).removeprefix("torch."), max_input, max_output, overflow, x.numel())


def nonfinite_birth(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(born, has_nan) as 0-d tensors, left unread so that no device synchronises per op."""
    with torch.no_grad():
        inputs_finite = torch.stack([torch.isfinite(t).all() for t in inputs if t.is_floating_point()] or [_TRUE])
        outputs_finite = torch.stack([torch.isfinite(t).all() for t in outputs])
        has_nan = torch.stack([torch.isnan(t).any() for t in outputs]).any()
        born = inputs_finite.all().to(outputs_finite.device) & ~outputs_finite.all()
    return born, has_nan


_TRUE = torch.tensor(True)
