"""The recorder: installs every patch and hook, records what happens to each gradient, and builds the Trace.

Everything it installs is removed by `uninstall()`; nothing is stored on the user's modules, tensors or
optimizers (per-run state lives here, keyed by identity, holding references only while the audit runs).
"""

from __future__ import annotations

import functools
import gc
import math
import os
import re
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
import torch.optim.optimizer as optimizer_module
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils.weak import WeakIdKeyDictionary

from gradaudit.capture.chains import ChainTracker
from gradaudit.capture.graph import MAX_TERMS, GraphView, RawTerm, TermGroup, decompose, group_terms, walk
from gradaudit.capture.numerics import ClampStats
from gradaudit.capture.provenance import Measured, NonFiniteCandidate, ProvenanceMode, never_compiled
from gradaudit.capture.source import (
    assigned_name,
    call_argument_text,
    expression_of,
    here,
    location_of,
    name_in_frame,
    user_frame,
)
from gradaudit.trace import (
    Backward,
    Break,
    Chain,
    Clamp,
    Exp,
    GradEvent,
    Location,
    NonFiniteOrigin,
    Optimizer,
    Parameter,
    RegressionTarget,
    Term,
    Trace,
    Window,
)

_MAX_MODULE_INPUTS = 20_000
_COMPILED_MODULE_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks on modules"
_BACKWARDS_WITHOUT_STEP = 20


class StopAudit(BaseException):
    """Raised inside the audited program once the window is complete (BaseException: `except Exception` lets it pass)."""


@dataclass
class _Param:
    tensor: torch.Tensor
    name: str | None = None
    group: str | None = None
    creation_name: str | None = None
    creation_group: str | None = None
    owners: list[int] = field(default_factory=list)
    pending: bool = False
    grad_key: tuple[int, int] | None = None
    snapshot: torch.Tensor | None = None


@dataclass
class _Optimizer:
    optimizer: torch.optim.Optimizer
    index: int
    created_at: Location | None
    name: str | None = None
    steps: int = 0


@dataclass
class _Event:
    seq: int
    kind: str
    param: int
    backward: int | None = None
    optimizer: int | None = None
    norm: float | None = None
    finite: bool = True
    by: str = ""
    location: Location | None = None


@dataclass
class _TermRecord:
    name: str
    location: Location | None
    constant: bool
    param_ids: list[int]
    sq_norms: dict[int, float]
    coefficient: float | None
    break_point: Break | None
    named_by_user: bool
    addends: int = 1
    user_code: str | None = None
    """What program code a backward through the term runs (None: none)."""
    reach_unknown: bool = False
    grads_skipped: str = ""
    from_contributions: bool = False
    """Its gradient is the whole backward's: read from what the real backward accumulates, no extra pass."""

    @property
    def may_reach_parameters(self) -> bool:
        return not self.constant and bool(self.param_ids or self.reach_unknown)


@dataclass
class _BackwardRecord:
    index: int
    location: Location | None
    accumulates: bool
    loss_finite: bool
    terms: list[_TermRecord]
    param_ids: list[int]
    upstream: dict[str, list[int]]
    walk_truncated: bool = False
    reach_unknown: bool = False
    terms_beyond_cap: int = 0


def _guarded(method: Callable) -> Callable:
    """Hooks run inside the user's program: an internal error is counted, never raised (StopAudit passes)."""

    @functools.wraps(method)
    def wrapper(self: Recorder, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception:  # noqa: BLE001
            self.internal_errors += 1
            return None

    return wrapper


def _modules_in_scope(frame: FrameType | None) -> dict[int, tuple[str, str]]:
    """id(parameter) -> (module variable, parameter path) for the modules a frame can see (`self.x` as `x`)."""
    found: dict[int, tuple[str, str]] = {}
    if frame is None:
        return found
    candidates = [*frame.f_globals.items(), *frame.f_locals.items()]
    owner = frame.f_locals.get("self")
    if owner is not None and not isinstance(owner, nn.Module):
        candidates += list(getattr(owner, "__dict__", {}).items())
    for name, value in candidates:
        if isinstance(value, nn.Module) and not name.startswith("_"):
            for pname, p in value.named_parameters():
                found.setdefault(id(p), (name, pname))
    return found


def _hide_compiled_module_warning() -> Callable[[], None]:
    """torch warns at each call of a `torch.compile`d module while global module hooks exist: those are gradaudit's,
    not the program's, so the warning is hidden during the audit. Returns what removes the filter again."""
    warnings.filterwarnings("ignore", message=_COMPILED_MODULE_WARNING, category=UserWarning)
    entry = warnings.filters[0]

    def remove() -> None:  # an "ignore" filter leaves nothing in the warning registries to invalidate
        if entry in warnings.filters:
            warnings.filters.remove(entry)

    return remove


def _output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors with history a module returned (where `register_backward_hook` hooks their grad_fn)."""
    values = output if isinstance(output, (list, tuple)) else [output]
    return [v for v in values if isinstance(v, torch.Tensor) and v.requires_grad and not v.is_leaf]


def _root_name(frame: FrameType | None) -> str:
    """`loss` for `loss.backward()`, `torch.autograd.grad(loss, ...)` and `torch.autograd.backward(loss)`."""
    text = expression_of(frame)
    match = re.match(r"^(.*)\.backward\(.*\)$", text)
    if match and not match.group(1).endswith("autograd"):
        return match.group(1)
    return call_argument_text(text, 0, "outputs") or call_argument_text(text, 0, "tensors") or text or "loss"


class Recorder:
    def __init__(
        self, iterations: int | None = None, term_grads: bool = True, window_cap: int = 20, max_terms: int = MAX_TERMS
    ) -> None:
        self.iterations_wanted = iterations
        """None: the window is the `with` block (API mode), which may use optimizers created before it."""
        self.term_grads = term_grads
        self.max_terms = max_terms
        self.window_cap = window_cap
        self.mode = ProvenanceMode()
        never_compiled(Recorder._before_forward, Recorder._after_forward)
        self.params: dict[int, _Param] = {}
        self.optimizers: dict[int, _Optimizer] = {}
        self.module_groups: dict[int, tuple[nn.Module, str | None]] = {}
        self.module_inputs: deque[tuple[str, Any]] = deque(maxlen=_MAX_MODULE_INPUTS)
        self.user_term_names: dict[int, tuple[Any, str]] = {}
        self.user_constant_names: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.events: list[_Event] = []
        self.backwards: list[_BackwardRecord] = []
        self.regression_targets: list[tuple[Any, list[int]]] = []
        self.chain_tracker = ChainTracker(self.mode)
        self.measured: list[tuple[Measured, int]] = []
        self.nonfinite_origins: list[tuple[NonFiniteCandidate, int]] = []
        self._clock_at_last_step = 0
        self.primary: int | None = None
        self.iterations = 0
        self.stopped_by = "context-exit"
        self.internal_errors = 0
        self._depth = 0
        self._in_backward = False
        self._undo: list[Callable[[], None]] = []

    # ---------------------------------------------------------------- install / uninstall

    def install(self) -> None:
        self._patch(torch.autograd, "backward", self._wrap_backward(torch.autograd.backward, accumulates=True))
        self._patch(torch.autograd, "grad", self._wrap_backward(torch.autograd.grad, accumulates=False))
        self._patch(torch.optim.Optimizer, "zero_grad", self._wrap_zero_grad(torch.optim.Optimizer.zero_grad))
        self._patch(torch.optim.Optimizer, "__init__", self._wrap_optimizer_init(torch.optim.Optimizer.__init__))
        for handle in (
            optimizer_module.register_optimizer_step_pre_hook(self._before_step),
            optimizer_module.register_optimizer_step_post_hook(self._after_step),
            nn.modules.module.register_module_forward_pre_hook(self._before_forward),
            nn.modules.module.register_module_forward_hook(self._after_forward, always_call=True),
        ):
            self._undo.append(handle.remove)
        self._undo.append(_hide_compiled_module_warning())
        if self.iterations_wanted is None:
            for obj in gc.get_objects():
                if issubclass(type(obj), torch.optim.Optimizer):  # type(): no __getattr__ on lazy proxies
                    self._optimizer(obj, None)
        self.mode.__enter__()
        self._undo.append(lambda: self.mode.__exit__(None, None, None))

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _patch(self, owner: Any, attribute: str, replacement: Callable) -> None:
        original = owner.__dict__[attribute]
        setattr(owner, attribute, replacement)
        self._undo.append(lambda: setattr(owner, attribute, original))

    # ---------------------------------------------------------------- naming

    def _param(self, tensor: torch.Tensor) -> _Param:
        record = self.params.get(id(tensor))
        if record is None or record.tensor is not tensor:
            record = self.params[id(tensor)] = _Param(tensor)
        return record

    def _is_parameter(self, tensor: torch.Tensor) -> bool:
        return isinstance(tensor, nn.Parameter) or id(tensor) in self.params

    def _module_group(self, module: nn.Module, frame: FrameType | None) -> str | None:
        known = self.module_groups.get(id(module))
        if known is not None and known[0] is module:
            return known[1]
        named = list(module.named_parameters())
        group = None
        if named:
            existing = [self.params.get(id(p)) for _, p in named]
            if all(e is not None and e.group is not None for e in existing):
                group = existing[0].group
            else:
                group = self._unique_group(self._module_name(module, frame))
                for pname, p in named:
                    record = self._param(p)
                    if record.group is None:
                        record.name, record.group = f"{group}.{pname}", group
        self.module_groups[id(module)] = (module, group)
        return group

    def _module_name(self, module: nn.Module, frame: FrameType | None) -> str:
        name = name_in_frame(module, frame)
        owner = frame.f_locals.get("self") if frame is not None else None
        if name is not None and isinstance(owner, nn.Module) and owner is not module:
            container = name_in_frame(owner, user_frame(frame.f_back)) if frame.f_back else None
            if container is not None:
                self._name_container(owner, container)
                return f"{container}.{name}"
        if name is not None:
            return name
        for parent, group in list(self.module_groups.values()):
            for subname, sub in parent.named_modules():
                if sub is module and group is not None and subname:
                    return f"{group}.{subname}"
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(module).__name__).lower()

    def _name_container(self, container: nn.Module, name: str) -> None:
        """Parameters held directly by a container module (CleanRL's `actor_logstd`) are named from it."""
        for pname, p in container.named_parameters(recurse=False):
            record = self._param(p)
            if record.group is None:
                record.name = record.group = f"{name}.{pname}"

    def _unique_group(self, name: str) -> str:
        taken = {group for _, group in self.module_groups.values()}
        candidate, n = name, 2
        while candidate in taken:
            candidate, n = f"{name}#{n}", n + 1
        return candidate

    # ---------------------------------------------------------------- modules

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling():  # dynamo inlines global hooks: step aside, no graph break
            return
        self._depth += 1
        self.chain_tracker.enter(module)
        if self._depth == 1:
            self._note_module_inputs(module, args)

    @_guarded
    def _note_module_inputs(self, module: nn.Module, args: tuple) -> None:
        group = self._module_group(module, user_frame())
        if group is None or not torch.is_grad_enabled():
            return
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.grad_fn is not None:
                self.module_inputs.append((group, arg.grad_fn))

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        self._depth -= 1
        self._leave_module(module, args, output)

    @_guarded
    def _leave_module(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.chain_tracker.leave(args, output)
        if module._backward_hooks or nn.modules.module._global_backward_hooks:
            with self.mode.quiet():
                for tensor in _output_tensors(output):
                    self.mode.mark_user_code(tensor.grad_fn, f"a backward hook of {type(module).__name__}")

    # ---------------------------------------------------------------- optimizers

    def _optimizer(self, optimizer: torch.optim.Optimizer, frame: FrameType | None) -> _Optimizer:
        record = self.optimizers.get(id(optimizer))
        if record is None or record.optimizer is not optimizer:
            record = _Optimizer(optimizer, len(self.optimizers), location_of(frame) if frame else None)
            self.optimizers[id(optimizer)] = record
        if record.name is None and frame is not None:
            record.name = name_in_frame(optimizer, frame)
        for group in optimizer.param_groups:
            for p in group["params"]:
                owners = self._param(p).owners
                if record.index not in owners:
                    owners.append(record.index)
        self._name_from_scope(optimizer, frame)
        return record

    def _wrap_optimizer_init(self, original: Callable) -> Callable:
        recorder = self

        @functools.wraps(original)
        def __init__(optimizer: torch.optim.Optimizer, params: Any, *args: Any, **kwargs: Any) -> None:
            original(optimizer, params, *args, **kwargs)
            recorder._on_optimizer_created(optimizer)

        return __init__

    @_guarded
    def _on_optimizer_created(self, optimizer: torch.optim.Optimizer) -> None:
        frame = user_frame()
        record = self._optimizer(optimizer, None)
        record.created_at, record.name = location_of(frame), assigned_name(frame)
        self._name_from_scope(optimizer, frame)

    def _name_from_scope(self, optimizer: torch.optim.Optimizer, frame: FrameType | None) -> None:
        """Names parameters that no module call may ever name: from the modules and variables in scope here."""
        unnamed = [
            self._param(p)
            for group in optimizer.param_groups
            for p in group["params"]
            if self._param(p).creation_name is None and self._param(p).name is None
        ]
        if not unnamed or frame is None:
            return
        in_scope = _modules_in_scope(frame)
        for record in unnamed:
            if id(record.tensor) in in_scope:
                record.creation_group, pname = in_scope[id(record.tensor)]
                record.creation_name = f"{record.creation_group}.{pname}"
            else:
                record.creation_name = name_in_frame(record.tensor, frame)

    def _wrap_zero_grad(self, original: Callable) -> Callable:
        recorder = self

        @functools.wraps(original)
        def zero_grad(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            owned = recorder._on_zero_grad(optimizer)
            result = original(optimizer, *args, **kwargs)
            recorder._refresh(owned or [])
            return result

        return zero_grad

    @_guarded
    def _on_zero_grad(self, optimizer: torch.optim.Optimizer) -> list[_Param]:
        frame = user_frame()
        record = self._optimizer(optimizer, frame)
        location = location_of(frame)
        self._checkpoint(location)
        owned = self._owned(record)
        for param in owned:
            if param.pending:
                self._event(
                    "wipe", param, optimizer=record.index, by=f"{self._label(record)}.zero_grad()", location=location
                )
        return owned

    def _owned(self, record: _Optimizer) -> list[_Param]:
        return [self._param(p) for group in record.optimizer.param_groups for p in group["params"]]

    def _label(self, record: _Optimizer) -> str:
        return record.name or f"{type(record.optimizer).__name__}#{record.index}"

    @_guarded
    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        frame = user_frame()
        record = self._optimizer(optimizer, frame)
        self._checkpoint(location_of(frame))
        if record.index == self.primary and self._window_complete():
            raise StopAudit

    def _window_complete(self) -> bool:
        if self.iterations_wanted is None or self.iterations < self.iterations_wanted:
            return False
        if all(o.steps > 0 for o in self.optimizers.values()):
            self.stopped_by = "iterations"
            return True
        if self.iterations >= self.iterations_wanted + self.window_cap:
            self.stopped_by = "cap"
            return True
        return False

    @_guarded
    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        record = self._optimizer(optimizer, user_frame())
        record.steps += 1
        location = here()
        for param in self._owned(record):
            if param.pending and param.tensor.grad is not None:
                self._event(
                    "apply", param, optimizer=record.index, by=f"{self._label(record)}.step()", location=location
                )
                if param.snapshot is not None:
                    param.snapshot = param.tensor.detach().clone()
        if self.primary is None:
            self.primary = record.index
        if record.index == self.primary:
            self.iterations += 1
            self.mode.forget_before(self._clock_at_last_step)
            self.chain_tracker.forget_before(self._clock_at_last_step)
            self._clock_at_last_step = self.mode.clock

    # ---------------------------------------------------------------- gradient state

    def _event(self, kind: str, param: _Param, **fields: Any) -> None:
        self.events.append(_Event(len(self.events), kind, id(param.tensor), **fields))
        if kind == "wipe":
            param.pending = False

    def _checkpoint(self, location: Location | None) -> None:
        """Detects, by their effect, wipes and updates made outside optimizers (Module.zero_grad, p.grad = None, manual SGD)."""
        with self.mode.quiet():
            for param in self.params.values():
                if not param.pending:
                    continue
                grad = param.tensor.grad
                if param.snapshot is not None and not torch.equal(param.tensor.detach(), param.snapshot):
                    self._event("apply", param, by="an update outside any optimizer", location=location)
                    param.snapshot = param.tensor.detach().clone()
                if grad is None:
                    self._event("wipe", param, by="grad set to None outside an optimizer", location=location)
                elif (id(grad), grad._version) != param.grad_key:
                    if not bool(grad.any()):
                        self._event("wipe", param, by="grad zeroed outside an optimizer", location=location)
                    param.grad_key = (id(grad), grad._version)

    def _refresh(self, params: list[_Param]) -> None:
        for param in params:
            grad = param.tensor.grad
            param.grad_key = None if grad is None else (id(grad), grad._version)

    # ---------------------------------------------------------------- backward

    def _wrap_backward(self, original: Callable, accumulates: bool) -> Callable:
        recorder = self

        @functools.wraps(original)
        def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            if recorder._in_backward:
                return original(tensors, *args, **kwargs)
            recorder._in_backward = True
            try:
                hooks, contributions, record_chains = recorder._before_backward(tensors, accumulates) or ([], [], None)
                try:
                    result = original(tensors, *args, **kwargs)
                finally:
                    for handle in hooks:
                        handle.remove()
                    recorder._after_backward(contributions, record_chains)
            finally:
                recorder._in_backward = False
            if recorder.note_backward_without_step():
                raise StopAudit
            return result

        return backward

    @_guarded
    def _before_backward(self, tensors: Any, accumulates: bool) -> tuple[list, list, Any] | None:
        if torch.compiler.is_compiling():  # AOT autograd tracing a compiled region's backward: not the program's
            return None
        frame = user_frame()
        location = location_of(frame)
        given = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        roots = [r for r in given if isinstance(r, torch.Tensor)]
        with self.mode.quiet():
            self._checkpoint(location)
            nodes = [r.grad_fn for r in roots]
            view = walk(nodes, self._is_parameter, self.mode.user_code_for)
            for pid in view.param_ids:
                self._param(view.leaves[pid][1])
            index = len(self.backwards)
            groups = [group for root in roots for group in self._term_groups(root, frame, view, location)]
            terms = [self._term(group, view) for group in groups]
            self._measure_terms(terms, groups, view, accumulates)
            finite = all(bool(torch.isfinite(r.detach()).all()) for r in roots)
            reach_unknown = any(id(node) in view.reach_unknown for node in nodes if node is not None)
            self.backwards.append(
                _BackwardRecord(
                    index,
                    location,
                    accumulates,
                    finite,
                    terms,
                    list(view.param_ids),
                    self._upstream(view),
                    view.truncated,
                    reach_unknown,
                    sum(len(group.parts) for group in groups if group.beyond_cap),
                )
            )
            self._note_regression_targets(view)
            self._note_numerics(view, index, finite)
            handles, record_chains = self.chain_tracker.prepare(view, index)
        if not accumulates:
            return handles, [], record_chains
        contributions: list[tuple[_Param, list]] = []
        leaves = [view.leaves[pid] for pid in view.param_ids]
        if reach_unknown:
            leaves += self._hidden_leaves(view)
        for node, tensor in leaves:
            seen: list = []
            contributions.append((self._param(tensor), seen))
            handles.append(node.register_prehook(functools.partial(self._on_contribution, seen)))
        return handles, [(index, param, seen) for param, seen in contributions], record_chains

    def _on_contribution(self, seen: list, grad_outputs: tuple) -> None:
        grad = grad_outputs[0]
        if grad is not None:
            with self.mode.quiet(), torch.no_grad():
                seen.append((float(grad.double().norm()), bool(torch.isfinite(grad).all())))

    def _hidden_leaves(self, view: GraphView) -> list[tuple[Any, torch.Tensor]]:
        """The known parameters a graph whose reach is unknown may still reach (through a nested backward, or below
        where the walk stopped): their accumulators, so that the real backward shows what it reached."""
        found = []
        for param in self.params.values():
            tensor = param.tensor
            if tensor.requires_grad and tensor.is_leaf and id(tensor) not in view.leaves:
                found.append((get_gradient_edge(tensor).node, tensor))
        return found

    @_guarded
    def _after_backward(self, contributions: list, record_chains: Callable[[], None] | None) -> None:
        if record_chains is not None:
            record_chains()
        self._term_from_contributions(contributions)
        location = self.backwards[-1].location if self.backwards else None
        for index, param, seen in contributions:
            if not seen:
                continue
            norm, finite = seen[0]
            self._event("accumulate", param, backward=index, norm=norm, finite=finite, location=location)
            param.pending = True
            self._refresh([param])
            if not param.owners and param.snapshot is None:
                param.snapshot = param.tensor.detach().clone()

    def _term_groups(
        self, root: torch.Tensor, frame: FrameType | None, view: GraphView, location: Location | None
    ) -> list[TermGroup]:
        return group_terms(
            self._raw_terms(root, frame, view), lambda raw: self._term_location(raw, location), self.max_terms
        )

    def _raw_terms(self, root: torch.Tensor, frame: FrameType | None, view: GraphView) -> list[RawTerm]:
        name = _root_name(frame)
        if root.grad_fn is None:
            return [RawTerm(name, 1.0, None, 0, None, 0, None)]
        return decompose(root.grad_fn, root.output_nr, self.mode.record_for, name, self._user_term_name, view.expanded)

    def _user_term_name(self, node: Any) -> str | None:
        entry = self.user_term_names.get(id(node))
        return entry[1] if entry is not None and entry[0] is node else None

    @staticmethod
    def _term_location(raw: RawTerm, backward_location: Location | None) -> Location | None:
        where = raw.added_by or raw.producer
        return where.location if where is not None else backward_location

    def _term(self, group: TermGroup, view: GraphView) -> _TermRecord:
        first = group.parts[0]
        edges = group.edges
        if not edges:
            origin = first.added_by.constant_args.get(first.operand_index) if first.added_by else None
            return _TermRecord(group.name, group.location, True, [], {}, None, origin, False, len(group.parts))
        return _TermRecord(
            group.name,
            group.location,
            False,
            view.params_reached(*(edge.node for edge in edges)),
            {},
            first.producer.factor if first.producer is not None else None,
            None,
            any(self._user_term_name(edge.node) is not None for edge in edges),
            len(group.parts),
            next((code for edge in edges if (code := view.user_code.get(id(edge.node)))), None),
            any(id(edge.node) in view.reach_unknown for edge in edges),
        )

    def _measure_terms(
        self, terms: list[_TermRecord], groups: list[TermGroup], view: GraphView, accumulates: bool
    ) -> None:
        """Each term's own gradient per parameter, running no program code twice.

        A backward with one term that reaches parameters (however many addends it merges; the others are dead) needs
        no extra pass: its gradient is what the real backward accumulates. Otherwise each term gets an extra pass, unless a backward through it runs program code
        (hooks, Python-defined nodes, checkpoint recomputation): then its gradient is not measured, and it says why.
        """
        if not self.term_grads:
            return
        live = [(term, group) for term, group in zip(terms, groups, strict=True) if term.may_reach_parameters]
        if len(live) == 1:
            live[0][0].from_contributions = accumulates
            return
        for term, group in live:
            if term.user_code is not None:
                term.grads_skipped = f"a backward through it runs {term.user_code}"
            else:
                term.sq_norms = self._term_gradients(group, view, term.param_ids)

    def _term_gradients(self, group: TermGroup, view: GraphView, reached: list[int]) -> dict[int, float]:
        """The term's own gradient per parameter: an extra non-accumulating backward from its graph edges."""
        edges, seeds = [], []
        for part in group.edges:
            metadata = part.node._input_metadata[part.output_nr]
            edges.append(GradientEdge(part.node, part.output_nr))
            seeds.append(torch.full(tuple(metadata.shape), part.scale, dtype=metadata.dtype, device=metadata.device))
        params = [view.leaves[pid][1] for pid in reached]
        grads = torch.autograd.grad(edges, params, grad_outputs=seeds, retain_graph=True, allow_unused=True)
        return {
            pid: 0.0 if g is None else float(g.detach().double().pow(2).sum())
            for pid, g in zip(reached, grads, strict=True)
        }

    def _term_from_contributions(self, contributions: list) -> None:
        """A one-term backward: the term's gradient per parameter is each parameter's contribution."""
        if not contributions:
            return
        term = next((t for t in self.backwards[contributions[0][0]].terms if t.from_contributions), None)
        if term is None:
            return
        for _, param, seen in contributions:
            if seen:
                pid = id(param.tensor)
                term.sq_norms[pid] = seen[0][0] ** 2
                if pid not in term.param_ids:
                    term.param_ids.append(pid)

    def _upstream(self, view: GraphView) -> dict[str, list[int]]:
        upstream: dict[str, set[int]] = {}
        for group, node in self.module_inputs:
            if view.holds(node):
                upstream.setdefault(group, set()).update(view.params_reached(node))
        return {group: sorted(pids) for group, pids in upstream.items()}

    def _note_numerics(self, view: GraphView, backward: int, loss_finite: bool) -> None:
        """Claims the clamps and exps on this graph; for a non-finite loss, finds the op where NaN/Inf was born."""
        self.measured += [(m, backward) for m in self.mode.measured if view.holds(m.node)]
        if loss_finite:
            return
        reaching = [c for c in self.mode.nonfinite if view.holds(c.node)]
        reaching += [
            c for node in view.nodes.values() if (record := self.mode.record_for(node)) for c in record.nonfinite_inputs
        ]
        born = [c for c in reaching if bool(c.born)]
        if born:
            self.nonfinite_origins.append((min(born, key=lambda c: c.clock), backward))

    def _note_regression_targets(self, view: GraphView) -> None:
        remaining = []
        for call in self.mode.regression_calls:
            node = call.target_node
            if view.holds(node):
                reached = view.params_reached(node)
                if reached:
                    self.regression_targets.append((call, reached))
            else:
                remaining.append(call)
        self.mode.regression_calls[:] = remaining[-1000:]

    # ---------------------------------------------------------------- user API

    def name_term(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.grad_fn is not None:
            self.user_term_names[id(tensor.grad_fn)] = (tensor.grad_fn, name)
        else:
            self.mode.named_constants[tensor] = name

    def note_backward_without_step(self) -> bool:
        """A program that never steps an optimizer ends its window after a number of backward calls."""
        if (
            self.iterations_wanted is not None
            and not self.optimizers
            and len(self.backwards) >= _BACKWARDS_WITHOUT_STEP
        ):
            self.stopped_by = "iterations"
            return True
        return False

    # ---------------------------------------------------------------- the Trace

    def build_trace(self, program: str, stopped_by: str | None = None, note: str = "") -> Trace:
        names = self._final_names()
        groups = {pid: self.params[pid].group or self.params[pid].creation_group or names[pid] for pid in names}

        def group_norms(sq_norms: dict[int, float]) -> dict[str, float]:
            totals: dict[str, float] = {}
            for pid, sq in sq_norms.items():
                totals[groups[pid]] = totals.get(groups[pid], 0.0) + sq
            return {g: math.sqrt(v) for g, v in totals.items()}

        def group_list(pids: list[int]) -> list[str]:
            return sorted({groups[pid] for pid in pids})

        optimizers = sorted(self.optimizers.values(), key=lambda o: o.index)
        return Trace(
            program=program,
            window=Window(self.iterations, stopped_by or self.stopped_by, note),
            parameters=[
                Parameter(names[pid], groups[pid], list(p.tensor.shape), p.tensor.requires_grad, sorted(p.owners))
                for pid, p in self.params.items()
            ],
            optimizers=[
                Optimizer(o.index, self._label(o), type(o.optimizer).__name__, o.created_at, o.steps)
                for o in optimizers
            ],
            backwards=[
                Backward(
                    b.index,
                    b.location,
                    b.accumulates,
                    b.loss_finite,
                    [
                        Term(
                            t.name,
                            t.location,
                            t.constant,
                            group_list(t.param_ids),
                            group_norms(t.sq_norms),
                            t.coefficient,
                            t.break_point,
                            t.named_by_user,
                            t.addends,
                            t.grads_skipped,
                            t.reach_unknown,
                        )
                        for t in b.terms
                    ],
                    group_list(b.param_ids),
                    {g: group_list(pids) for g, pids in b.upstream.items()},
                    b.walk_truncated,
                    b.reach_unknown,
                    b.terms_beyond_cap,
                )
                for b in self.backwards
            ],
            events=[
                GradEvent(e.seq, e.kind, names[e.param], e.backward, e.optimizer, e.norm, e.finite, e.by, e.location)
                for e in self.events
            ],
            regression_targets=[
                RegressionTarget(call.op, call.location, call.target_expression, group_list(pids))
                for call, pids in self.regression_targets
            ],
            chains=[
                Chain(self._module_label(c.module, names), c.backward, c.location, c.calls)
                for c in self.chain_tracker.chains
            ],
            clamps=[
                Clamp(
                    m.record.op,
                    m.record.location,
                    m.record.expression,
                    backward,
                    m.stats.lower,
                    m.stats.upper,
                    m.stats.elements,
                    m.stats.below,
                    m.stats.above,
                    m.stats.gate,
                )
                for m, backward in self.measured
                if isinstance(m.stats, ClampStats)
            ],
            exps=[
                Exp(
                    m.record.op,
                    m.record.location,
                    m.record.expression,
                    backward,
                    m.stats.dtype,
                    m.stats.max_input,
                    m.stats.max_output,
                    m.stats.overflow,
                    m.stats.elements,
                )
                for m, backward in self.measured
                if not isinstance(m.stats, ClampStats)
            ],
            nonfinite_origins=[
                NonFiniteOrigin(
                    c.record.op, c.record.location, c.record.expression, backward, "nan" if bool(c.has_nan) else "inf"
                )
                for c, backward in self.nonfinite_origins
            ],
        )

    def _module_label(self, module: nn.Module, names: dict[int, str]) -> str:
        """Its group when it was called at top level, else the dotted prefix its parameters' names share."""
        known = self.module_groups.get(id(module))
        if known is not None and known[0] is module and known[1] is not None:
            return known[1]
        paths = [names[id(p)].split(".")[:-1] for p in module.parameters() if id(p) in names]
        prefix = os.path.commonprefix(paths) if paths else []
        return ".".join(prefix) or re.sub(r"(?<!^)(?=[A-Z])", "_", type(module).__name__).lower()

    def _final_names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        taken: set[str] = set()
        for pid, p in self.params.items():
            base = p.name or p.creation_name or self._fallback_name(p)
            name, n = base, 2
            while name in taken:
                name, n = f"{base}#{n}", n + 1
            taken.add(name)
            names[pid] = name
        return names

    def _fallback_name(self, param: _Param) -> str:
        shape = "x".join(map(str, param.tensor.shape)) or "scalar"
        if param.owners:
            owner = next(o for o in self.optimizers.values() if o.index == param.owners[0])
            return f"{self._label(owner)}:param[{shape}]"
        return f"tensor[{shape}]"
