"""The recorder: installs every patch and hook, records what happens to each gradient, and builds the Trace.

Everything it installs is removed by `uninstall()`; nothing is stored on the user's modules, tensors or
optimizers (per-run state lives here, keyed by identity, holding references only while the audit runs).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import math
import os
import re
import sys
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
import torch.optim.optimizer as optimizer_module
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils.weak import WeakIdKeyDictionary

from gradaudit.capture.chains import ChainTracker
from gradaudit.capture.graph import (
    MAX_TERMS,
    MAX_WALK_NODES,
    GraphView,
    RawTerm,
    TermGroup,
    decompose,
    group_terms,
    walk,
)
from gradaudit.capture.magnitude import (
    all_finite,
    all_zero,
    norm,
    norm_unread,
    read_all,
    same_values,
    squared_norm,
)
from gradaudit.capture.names import attribute_path, attribute_paths, frames_on_stack, instance_attributes
from gradaudit.capture.numerics import ClampStats
from gradaudit.capture.provenance import Measured, NonFiniteCandidate, ProvenanceMode, never_compiled
from gradaudit.capture.rawgraph import RawGraphRecorder
from gradaudit.capture.source import (
    assigned_name,
    call_argument_text,
    expression_of,
    here,
    location_of,
    package_path,
    user_frame,
)
from gradaudit.capture.watching import ChainProbe, Pace
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
    Watch,
    Window,
    collector_paused,
)

_MAX_MODULE_INPUTS = 20_000
_COMPILED_MODULE_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks on modules"
_BACKWARDS_WITHOUT_STEP = 20
_NORM_JUMP = 100.0
"""Watching: a group whose gradient norm grew by more than this since the last sample gets a full audit next."""


class StopAudit(BaseException):
    """Raised inside the audited program once the window is complete (BaseException: `except Exception` lets it pass)."""


class InstallError(RuntimeError):
    """The audit could not be started; nothing of it was left installed."""


_INSTALLED: weakref.WeakSet[Recorder] = weakref.WeakSet()


def _uninstall_all() -> None:
    """A forked child (hogwild worker, DataLoader worker) runs unaudited: it drops everything the parent installed."""
    for recorder in list(_INSTALLED):
        recorder.uninstall()


@functools.cache
def _uninstall_in_forked_children() -> None:
    """Registered once per process, at the first install (importing gradaudit changes nothing)."""
    os.register_at_fork(after_in_child=_uninstall_all)


def _take_off_stack(mode: ProvenanceMode) -> bool:
    """Takes the mode off this thread's stack wherever it sits (a `with torch.device(...)` entered during the audit
    sits above it); False when it is not there: torch pops a mode while its own `__torch_function__` runs (a
    backward called through `Tensor.backward`), and a mode on another thread's stack cannot be reached."""
    if not any(entry is mode for entry in torch.overrides._get_current_function_mode_stack()):
        return False
    above = []
    while (top := torch.overrides._pop_mode()) is not mode:
        above.append(top)
    for entry in reversed(above):
        torch.overrides._push_mode(entry)
    return True


@dataclass(slots=True)
class _Param:
    tensor: torch.Tensor
    name: str | None = None
    group: str | None = None
    creation_name: str | None = None
    creation_group: str | None = None
    owners: list[int] = field(default_factory=list)
    pending: bool = False
    grad_id: int = 0
    """The .grad last seen (its id; 0: none) and its version: kept as two numbers, not a tuple made per read."""
    grad_version: int = -1
    snapshot: torch.Tensor | None = None
    awaited: bool = False
    """A recorded backward reaches it: the first gradient its accumulator receives is its contribution."""
    contribution: torch.Tensor | None = None
    """That contribution's norm (unread)."""

    def saw(self, grad: torch.Tensor) -> bool:
        return id(grad) == self.grad_id and grad._version == self.grad_version

    def see(self, grad: torch.Tensor | None) -> None:
        if grad is None:
            self.grad_id, self.grad_version = 0, -1
        else:
            self.grad_id, self.grad_version = id(grad), grad._version


@dataclass
class _Optimizer:
    optimizer: torch.optim.Optimizer
    index: int
    created_at: Location | None
    name: str | None = None
    assigned: str | None = None
    """The name it was assigned to when created (`optimizer` for `self.optimizer = Adam(...)`)."""
    named: bool = False
    """Its name and its parameters' were looked for where it was first used."""
    steps: int = 0
    stepped_elsewhere: bool = False
    """Stepped by another thread (not counted in `steps`, which are the audited thread's)."""


@dataclass(slots=True)
class _Events:
    """Consecutive events of one kind and one cause, a parameter each: a step over 10,000 tensors is one record."""

    seq: int
    """That of the first; the others follow it."""
    kind: str
    params: list[int]
    backward: int | None = None
    optimizer: int | None = None
    by: str = ""
    location: Location | None = None
    norms: list[float] | None = None
    """Accumulations: each contribution's norm (None: not measured), and whether it was finite."""
    finite: list[bool] | None = None

    def extends(
        self, kind: str, backward: int | None, optimizer: int | None, by: str, location: Location | None
    ) -> bool:
        return (kind, backward, optimizer, by, location) == (
            self.kind,
            self.backward,
            self.optimizer,
            self.by,
            self.location,
        )


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
    alone: list[int] = field(default_factory=list)
    """Parameters no other term reaches: their gradient from this term is what the real backward accumulates."""

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
    """Hooks run inside the user's program, its autograd and its optimizers: an internal error is counted, never
    raised (StopAudit passes)."""

    @functools.wraps(method)
    def wrapper(self: Recorder, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception:  # noqa: BLE001
            self.internal_errors += 1
            return None

    return wrapper


def _one_optimizer(a: Any, b: Any) -> bool:
    """Whether two optimizer objects are views of one optimizer: the same parameter-group list (or the same group
    dicts) and the same state object."""
    try:
        groups_a, groups_b = a.param_groups, b.param_groups
        same_groups = groups_a is groups_b or (
            len(groups_a) == len(groups_b) > 0 and all(x is y for x, y in zip(groups_a, groups_b, strict=True))
        )
        return same_groups and a.state is b.state
    except Exception:  # noqa: BLE001 - a wrapper whose attributes cannot be read is not this optimizer
        return False


def _takes_closure_first(optimizer: torch.optim.Optimizer) -> bool:
    try:
        names = list(inspect.signature(type(optimizer).step).parameters)
    except (TypeError, ValueError):
        return False
    return names[1:2] == ["closure"]


def _modules_in_scope(frame: FrameType) -> list[nn.Module]:
    """The modules a frame can see: its variables, and the attributes of a `self` that is no module."""
    values = [*frame.f_globals.values(), *frame.f_locals.values()]
    owner = frame.f_locals.get("self")
    if owner is not None and not isinstance(owner, nn.Module):
        values += instance_attributes(owner).values()
    modules = {id(value): value for value in values if issubclass(type(value), nn.Module)}
    return list(modules.values())


def _names_are_final(frame: FrameType) -> bool:
    """Whether the names a frame gives are those the user types: the user's own code, outside a module's methods
    (in a module's constructor, `self.optimizer` is `policy.optimizer` once the module is assigned)."""
    return package_path(frame.f_code.co_filename) is None and not isinstance(frame.f_locals.get("self"), nn.Module)


def group_norms(trace: Trace) -> dict[str, float]:
    """Each group's gradient norm over a sample: the root of the summed squares of every accumulation's norm."""
    groups = {p.name: p.group for p in trace.parameters}
    totals: dict[str, float] = {}
    for event in trace.events:
        if event.kind == "accumulate" and event.norm is not None:
            group = groups[event.param]
            totals[group] = totals.get(group, 0.0) + event.norm**2
    return {group: math.sqrt(total) for group, total in totals.items()}


def _both(first: Callable[[], None] | None, second: Callable[[], None] | None) -> Callable[[], None] | None:
    """One callable that calls both (either may be None)."""
    if first is None or second is None:
        return first or second

    def call() -> None:
        first()
        second()

    return call


def _class_name(obj: object) -> str:
    """What names an object nothing in the program names: its class (`ActorCriticPolicy`)."""
    return type(obj).__name__


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
    """Records one audited window of training.

    The window (CLI mode, `iterations` set) is counted in iterations. An iteration ends when an optimizer steps a
    second time since the last iteration ended (the optimizers that stepped in between are that iteration's), or
    as soon as every optimizer of the previous iteration has stepped again. So a calibration optimizer that steps
    once, or one that stops stepping, belongs to one iteration and cannot hold the window open. The window is
    complete once `iterations` iterations ended and every optimizer seen has stepped (in any thread), or, capped,
    after `window_cap` more iterations, or once backward calls go on without an optimizer step for `window_cap`
    times the most backward calls seen between two steps (`_BACKWARDS_WITHOUT_STEP` before the first step; a
    program that has no optimizer at all ends its window after `_BACKWARDS_WITHOUT_STEP` backward calls).

    The program is then stopped, once, by raising `StopAudit` at its next forward, backward, zero_grad or optimizer
    step. A program that swallows it (a bare `except:`) is let go: everything is uninstalled, it runs on unaudited,
    `stop_swallowed` is set, and the window gathered so far is what gets reported.

    Only the process and thread that installed the recorder are audited. Hooks called in other threads pass
    through, unrecorded and never stopped: an optimizer they step counts as stepped for the window (but not in the
    Trace), and a gradient they leave on a parameter that an audited step then applies is recorded as received,
    so that what other threads train is never reported as untrained. A forked child uninstalls everything.
    """

    def __init__(
        self,
        iterations: int | None = None,
        term_grads: bool = True,
        window_cap: int = 20,
        max_terms: int = MAX_TERMS,
        light: bool = False,
        max_nodes: int = MAX_WALK_NODES,
        watch: Watch | None = None,
    ) -> None:
        self.iterations_wanted = iterations
        self.max_nodes = max_nodes
        self.watch = watch
        """Whole-run watching (CLI mode): the window is audited in full, then one iteration in `watch.every` in light
        mode (`Pace` sets it), and the iteration after a warning sign in full: a non-finite loss or gradient, a
        gradient-norm jump, or a chain whose amplification grew (`ChainProbe`). Each audited stretch (a sample)
        ends in a Trace handed to `on_sample`; the program is never stopped."""
        self.on_sample: Callable[[Trace, int], None] | None = None
        """Called with each sample's Trace and the number (from 1) of its first iteration."""
        self.iterations_before_sample = 0
        self.first_nonfinite_loss: int | None = None
        """The first iteration whose loss was non-finite, seen by the check every backward gets while idle."""
        self._idle = False
        self._next_full = False
        self._last_group_norms: dict[str, float] = {}
        self._was_nonfinite = False
        self._last_stepper: int | None = None
        self._pace: int | None = None
        """Watching: the optimizer whose step ended the last sample; its steps count the idle iterations."""
        """None: the window is the `with` block (API mode), which may use optimizers created before it."""
        self.pacer = None if watch is None else Pace(watch)
        self._sample_first = 0
        """Watching: the first iteration (from 1) of the last sample; the next light one is due `watch.every` after."""
        self.light = light
        """Lifecycle, membership and reachability only: no op provenance (the mode is never entered), no per-term
        gradients, no chain hooks, no numerics. Loss terms are split by the graph alone."""
        self.term_grads = term_grads and not light
        self._term_grads_wanted = term_grads
        self.max_terms = max_terms
        self.window_cap = window_cap
        self.mode = ProvenanceMode()
        never_compiled(Recorder._before_forward, Recorder._after_forward)
        self.params: dict[int, _Param] = {}
        self.optimizers: dict[int, _Optimizer] = {}
        self.module_groups: dict[int, tuple[nn.Module, str | None]] = {}
        self.outer_frames: frozenset[int] = frozenset()
        """The frames that were running when the audit started: names are looked for below them."""
        self.module_inputs: deque[tuple[tuple[str, ...], Any]] = deque(maxlen=_MAX_MODULE_INPUTS)
        """(every parameter group of a top-level module call, the graph node of one of its inputs)."""
        self.user_term_names: dict[int, tuple[Any, str]] = {}
        self.user_constant_names: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.events: list[_Events] = []
        self.backwards: list[_BackwardRecord] = []
        self.regression_targets: list[tuple[Any, list[int], list[int]]] = []
        """(call, parameters the target reaches, parameters the prediction reaches)."""
        self.chain_tracker = ChainTracker(self.mode)
        self.chain_probe = ChainProbe(self.mode)
        self.raw_graphs = RawGraphRecorder()
        self.measured: list[tuple[Measured, int, list[int]]] = []
        """(clamp or exp, the backward whose graph holds it, the parameters behind a clamp)."""
        self.nonfinite_origins: list[tuple[NonFiniteCandidate, int]] = []
        self._clock_at_last_step = 0
        self._step_started: dict[int, int] = {}
        """Optimizer index -> the event count when its step() began, while that step runs (a closure may run)."""
        self.iterations = 0
        self.stopped_by = "context-exit"
        self.internal_errors = 0
        self.stop_swallowed = False
        """The program caught the StopAudit raised at the end of the window and went on, unaudited."""
        self.foreign_backwards = 0
        """Backward calls made in other threads of the audited process (not recorded)."""
        self.on_backward: Callable[[list[int] | None, Location | None], None] | None = None
        """Called after each recorded backward that accumulated without raising: the ids of the parameters its graph
        reaches (None where the reach is unknown) and where it was called."""
        self._optimizer_aliases: dict[int, tuple[Any, _Optimizer]] = {}
        self._stepped_this_iteration: set[int] = set()
        self._stepped_last_iteration: set[int] = set()
        self._backwards_at_last_step = 0
        self._most_backwards_between_steps = 0
        self._window_done = False
        self._stop: StopAudit | None = None
        self._steps_open = 0
        self._paused_before_step = False
        self._closures_open = 0
        self._depth = 0
        self._in_backward = False
        self._installed = False
        self._mode_on_stack = False
        self._mode_shelved = False
        self._module_hooks: list[Any] = []
        self._mode_aside_at: int | None = None
        self._step_set_mode_aside = False
        """Where the mode sat on the stack while an optimizer step has it off (None: it is not off)."""
        self._pid = 0
        self._thread = 0
        self._undo: list[Callable[[], None]] = []
        self._accumulators: dict[int, tuple[Any, Any]] = {}
        """id(gradient accumulator) -> (the node, held so that its hook lives on; the hook's handle)."""

    # ---------------------------------------------------------------- install / uninstall

    def install(self) -> None:
        """Installs every patch and hook, or, when any step fails, none (the error says why)."""
        self.outer_frames = frames_on_stack()
        try:
            self._install()
        except BaseException as exc:
            self.uninstall()
            if not isinstance(exc, Exception):
                raise
            raise InstallError(f"gradaudit could not start the audit ({type(exc).__name__}: {exc})") from exc

    def _install(self) -> None:
        self._installed, self._pid, self._thread = True, os.getpid(), threading.get_ident()
        _INSTALLED.add(self)
        self._undo.append(lambda: _INSTALLED.discard(self))
        _uninstall_in_forked_children()
        self._patch(torch.autograd, "backward", functools.partial(self._wrap_backward, accumulates=True))
        self._patch(torch.autograd, "grad", functools.partial(self._wrap_backward, accumulates=False))
        self._patch(torch.optim.Optimizer, "zero_grad", self._wrap_zero_grad)
        self._patch(torch.optim.Optimizer, "__init__", self._wrap_optimizer_init)
        for register, hook in (
            (optimizer_module.register_optimizer_step_pre_hook, self._before_step),
            (optimizer_module.register_optimizer_step_post_hook, self._after_step),
        ):
            self._undo.append(register(hook).remove)
        self._undo.append(self._unhook_modules)
        self._hook_modules()
        self._undo.append(_hide_compiled_module_warning())
        self._undo.append(self._release_accumulators)
        if not self.light:
            self.mode.__enter__()
            self._mode_on_stack = True

    def _hook_modules(self) -> None:
        if not self._module_hooks:  # one at a time: a failed install removes those made
            self._module_hooks.append(nn.modules.module.register_module_forward_pre_hook(self._before_forward))
            self._module_hooks.append(
                nn.modules.module.register_module_forward_hook(self._after_forward, always_call=True)
            )

    def _unhook_modules(self) -> None:
        while self._module_hooks:
            self._module_hooks.pop().remove()

    @_guarded
    def _adopt_live_optimizers(self) -> None:
        """API mode: optimizers created before the `with` block are found at the end, and only when a parameter
        that received gradient is in no optimizer seen (those that zero_grad or step during the block are seen
        then): scanning the heap costs tens of milliseconds. A half-constructed optimizer, kept alive by a
        traceback, has no parameter groups yet and is left out."""
        received = {pid for batch in self.events if batch.kind == "accumulate" for pid in batch.params}
        if self.iterations_wanted is not None or all(self.params[pid].owners for pid in received):
            return
        for obj in gc.get_objects():
            if not issubclass(type(obj), torch.optim.Optimizer):  # type(): no __getattr__ on lazy proxies
                continue
            try:
                groups = obj.param_groups
            except Exception:  # noqa: BLE001 - a wrapper whose __getattr__ fails before its __init__ ran
                continue
            if isinstance(groups, list) and all(isinstance(g, dict) and "params" in g for g in groups):
                self._optimizer(obj, None)

    def uninstall(self) -> None:
        """Removes everything installed; callable more than once, from any hook but a step's. A provenance mode
        that cannot be reached now stays on the stack, inert, until the next call (the end of the audit)."""
        self._installed = False
        if self._mode_aside_at is not None:  # a step that raised (StopAudit) left it off the stack
            self._mode_aside_at, self._mode_on_stack = None, False
        if self._mode_on_stack:
            self.mode.paused = True
            self._mode_on_stack = not _take_off_stack(self.mode)
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception:  # noqa: BLE001 - every other step must still run
                self.internal_errors += 1

    def release_graphs(self) -> None:
        """Once the trace is built: drops every reference to the program's graph nodes (op records, hooks, named
        terms, module inputs, chain calls; the nodes of measured ops, non-finite origins and regressions, whose
        figures stay for a trace built again), so that an audit kept after its block keeps no autograd graph, nor
        the tensors its nodes saved, alive."""
        mode = self.mode
        for live in (
            mode.records,
            mode.user_code,
            mode.regression_calls,
            mode.measured,
            mode.nonfinite,
            self.chain_tracker.calls,
            self.user_term_names,
            self.module_inputs,
        ):
            live.clear()
        for measured, _, _ in self.measured:
            measured.node = None
        for candidate, _ in self.nonfinite_origins:
            candidate.node = None
        for call, _, _ in self.regression_targets:
            call.target_node = call.prediction_node = None

    def _patch(self, owner: Any, attribute: str, make: Callable[[Callable], Callable]) -> None:
        original = owner.__dict__[attribute]
        setattr(owner, attribute, make(original))
        self._undo.append(lambda: setattr(owner, attribute, original))

    def internal_errors_total(self) -> int:
        """Errors inside gradaudit's own hooks and op observation: a non-zero count means the audit is partial."""
        return self.internal_errors + self.mode.errors + self.chain_probe.errors

    # ---------------------------------------------------------------- who is audited

    def _audited_thread(self) -> bool:
        return self._installed and threading.get_ident() == self._thread and os.getpid() == self._pid

    def _foreign_thread(self) -> bool:
        """A hook called in another thread of the audited process: it passes through, unrecorded, never stopped."""
        return self._installed and threading.get_ident() != self._thread and os.getpid() == self._pid

    def _recording(self) -> bool:
        return self._audited_thread() and self._stop is None and not self._idle

    def _admit(self, inside_step: bool = False) -> bool:
        """Whether this entry into a hook is to be recorded. Raises StopAudit once the window is complete, and once
        only: at the next entry the program has either let it go by (still unwinding: a `finally`, an `__exit__`)
        or swallowed it, and then it is uninstalled (from a step's hook, whose hook table is being iterated, that is
        left to the next forward, backward or zero_grad, or to the end of the audit)."""
        if not self._audited_thread() or self._idle:
            return False
        if self._stop is not None:
            if not self.stop_swallowed and not self._stop_unwinding():
                self.stop_swallowed = True
            if self.stop_swallowed and not inside_step:
                self.uninstall()
            return False
        if self._window_done and not self._in_backward:
            self._raise_stop()
        if not inside_step:
            self._close_abandoned_steps()
        return True

    def _stop_unwinding(self) -> bool:
        """Whether the stop is the exception being handled here, or the cause of it (`except: raise Other`)."""
        exc = sys.exc_info()[1]
        while exc is not None and exc is not self._stop:
            exc = exc.__context__
        return exc is not None

    def _raise_stop(self) -> None:
        self._stop = StopAudit()
        raise self._stop

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

    def _name(self, obj: object, frame: FrameType | None) -> str | None:
        return attribute_path(obj, frame, self.outer_frames)

    def _module_name(self, module: nn.Module, frame: FrameType | None) -> str:
        name = self._name(module, frame)
        owner = frame.f_locals.get("self") if frame is not None else None
        if name is not None and isinstance(owner, nn.Module) and owner is not module:
            container = self._name(owner, frame)
            if container is not None:
                self._name_container(owner, container)
        if name is not None:
            return name
        for parent, group in list(self.module_groups.values()):
            for subname, sub in parent.named_modules():
                if sub is module and group is not None and subname:
                    return f"{group}.{subname}"
        return _class_name(module)

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
        if not self._admit():
            return
        self._depth += 1
        self._enter_module(module, args)

    @_guarded
    def _enter_module(self, module: nn.Module, args: tuple) -> None:
        if not self.light:
            self.chain_tracker.enter(module)
        if self._depth == 1:
            self._note_module_inputs(module, args)

    @_guarded
    def _note_module_inputs(self, module: nn.Module, args: tuple) -> None:
        group = self._module_group(module, user_frame())
        if group is None or not torch.is_grad_enabled():
            return
        nodes = [arg.grad_fn for arg in args if isinstance(arg, torch.Tensor) and arg.grad_fn is not None]
        if nodes:
            # A submodule named on its own earlier (d3rlpy's Q-function encoder) is fed by the same inputs.
            groups = tuple({self._param(p).group or group: None for p in module.parameters()})
            self.module_inputs.extend((groups, node) for node in nodes)

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        if not self._recording():
            return
        self._depth = max(self._depth - 1, 0)  # watching: a sample may start inside a call (hooked after it began)
        self._leave_module(module, args, output)

    @_guarded
    def _leave_module(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.light:
            self.chain_tracker.leave(args, output)
        self.chain_probe.leave(module, output)
        if module._backward_hooks or nn.modules.module._global_backward_hooks:
            with self.mode.quiet():
                for tensor in _output_tensors(output):
                    self.mode.mark_user_code(tensor.grad_fn, f"a backward hook of {type(module).__name__}")

    # ---------------------------------------------------------------- optimizers

    def _optimizer(self, optimizer: torch.optim.Optimizer, frame: FrameType | None) -> _Optimizer:
        record = self._lookup_optimizer(optimizer) or self._optimizer_it_wraps(optimizer)
        if record is None:
            record = _Optimizer(optimizer, len(self.optimizers), location_of(frame) if frame else None)
            self.optimizers[id(optimizer)] = record
        for group in optimizer.param_groups:
            for p in group["params"]:
                owners = self._param(p).owners
                if record.index not in owners:
                    owners.append(record.index)
        if frame is not None and not record.named:
            record.named = True
            record.name = record.name or self._name(optimizer, frame)
            self._name_from_scope(optimizer, frame)
        return record

    def _lookup_optimizer(self, optimizer: torch.optim.Optimizer) -> _Optimizer | None:
        """The record already made for this object (a read only: safe from any thread)."""
        record = self.optimizers.get(id(optimizer))
        if record is not None and record.optimizer is optimizer:
            return record
        alias = self._optimizer_aliases.get(id(optimizer))
        return alias[1] if alias is not None and alias[0] is optimizer else None

    def _optimizer_it_wraps(self, optimizer: torch.optim.Optimizer) -> _Optimizer | None:
        """Two objects over the same parameter groups and the same state are one optimizer: Lightning's
        LightningOptimizer and accelerate's AcceleratedOptimizer wrap a torch optimizer and share both. The record
        keeps speaking of the wrapped one (the class a wrapper imitates is a base of the wrapper's)."""
        for record in list(self.optimizers.values()):
            if not _one_optimizer(record.optimizer, optimizer):
                continue
            wrapper = record.optimizer
            if isinstance(wrapper, type(optimizer)) and type(wrapper) is not type(optimizer):
                del self.optimizers[id(wrapper)]
                record.optimizer, self.optimizers[id(optimizer)] = optimizer, record
            else:
                wrapper = optimizer
            self._optimizer_aliases[id(wrapper)] = (wrapper, record)
            return record
        return None

    def _wrap_optimizer_init(self, original: Callable) -> Callable:
        recorder = self

        @functools.wraps(original)
        def __init__(*args: Any, **kwargs: Any) -> None:
            original(*args, **kwargs)
            if args and recorder._recording():
                recorder._on_optimizer_created(args[0])

        return __init__

    @_guarded
    def _on_optimizer_created(self, optimizer: torch.optim.Optimizer) -> None:
        """Named now when the user's own code creates it (`critic_opt = Adam(...)`); one created in a library or in
        a module's constructor (`self.optimizer = ...` in a policy) is named where it is first used, once the
        program can reach it (`policy.optimizer`)."""
        frame = user_frame()
        record = self._optimizer(optimizer, None)
        record.created_at, record.assigned = location_of(frame), assigned_name(frame)
        if frame is not None and _names_are_final(frame):
            record.name = record.assigned
            self._name_from_scope(optimizer, frame)

    def _name_from_scope(self, optimizer: torch.optim.Optimizer, frame: FrameType) -> None:
        """Names parameters that no module call may ever name: from the modules and variables in scope here."""
        unnamed = {
            id(p): self._param(p)
            for group in optimizer.param_groups
            for p in group["params"]
            if self._param(p).creation_name is None and self._param(p).name is None
        }
        if not unnamed:
            return
        for module in _modules_in_scope(frame):
            held = [(pname, unnamed.pop(id(p))) for pname, p in module.named_parameters() if id(p) in unnamed]
            if held:
                group = self._name(module, frame) or _class_name(module)
                for pname, record in held:
                    record.creation_group, record.creation_name = group, f"{group}.{pname}"
        records = list(unnamed.values())
        names = attribute_paths([record.tensor for record in records], frame, self.outer_frames)
        for record, name in zip(records, names, strict=True):
            record.creation_name = name

    def _wrap_zero_grad(self, original: Callable) -> Callable:
        recorder = self

        @functools.wraps(original)
        def zero_grad(*args: Any, **kwargs: Any) -> Any:
            if not args or not recorder._admit():
                return original(*args, **kwargs)
            owned = recorder._on_zero_grad(args[0])
            with recorder._unobserved():
                result = original(*args, **kwargs)
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
        read_by_step = self._accumulated_during_step(record.index)
        applied_by, wiped_by = f"{self._label(record)}.step() (its closure)", f"{self._label(record)}.zero_grad()"
        for param in owned:
            if param.pending:
                if id(param.tensor) in read_by_step:
                    self._events("apply", [param], optimizer=record.index, by=applied_by, location=location)
                self._events("wipe", [param], optimizer=record.index, by=wiped_by, location=location)
        return owned

    def _accumulated_during_step(self, optimizer: int) -> set[int]:
        """Parameters a backward filled since this optimizer's step() began: a zero_grad() inside the step (an
        L-BFGS closure re-evaluating the loss) comes after the step has read those gradients."""
        started = self._step_started.get(optimizer)
        found: set[int] = set()
        if started is None:
            return found
        for batch in reversed(self.events):
            if batch.kind == "accumulate":
                found.update(batch.params[max(started - batch.seq, 0) :])
            if batch.seq <= started:
                break
        return found

    def _owned(self, record: _Optimizer) -> list[_Param]:
        return [self._param(p) for group in record.optimizer.param_groups for p in group["params"]]

    def _label(self, record: _Optimizer) -> str:
        return record.name or record.assigned or f"{_class_name(record.optimizer)}#{record.index}"

    @_guarded
    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._foreign_thread():
            self._note_foreign_step(optimizer)
            return None
        if not self._admit(inside_step=True):
            return None
        self._pause_for_step()
        frame = user_frame()
        record = self._optimizer(optimizer, frame)
        self._checkpoint(location_of(frame))
        self._step_started[record.index] = self._events_so_far()
        if self.foreign_backwards:
            self._note_gradients_from_other_threads(record)
        if record.index in self._stepped_this_iteration:
            self._end_iteration()
            if self._window_done:
                self._raise_stop()
        if not self._idle:  # watching: a sample closed just now, and this step belongs to the idle iteration after it
            self._stepped_this_iteration.add(record.index)
        return self._observed_closure(optimizer, args, kwargs)

    @_guarded
    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._idle and self._audited_thread():
            self._idle_step(optimizer)
            return
        if not self._recording():
            return
        try:
            self._note_step(optimizer)
        finally:
            self._resume_after_step()

    @_guarded
    def _note_step(self, optimizer: torch.optim.Optimizer) -> None:
        record = self._optimizer(optimizer, user_frame())
        record.steps += 1
        self._last_stepper = record.index
        self._step_started.pop(record.index, None)
        applied = [param for param in self._owned(record) if param.pending and param.tensor.grad is not None]
        self._events("apply", applied, optimizer=record.index, by=f"{self._label(record)}.step()", location=here())
        for param in applied:
            if param.snapshot is not None:
                param.snapshot = param.tensor.detach().clone()
        between, self._backwards_at_last_step = len(self.backwards) - self._backwards_at_last_step, len(self.backwards)
        self._most_backwards_between_steps = max(self._most_backwards_between_steps, between)
        if self._stepped_last_iteration and self._stepped_this_iteration >= self._stepped_last_iteration:
            self._end_iteration()
        self._update_window()

    def _note_foreign_step(self, optimizer: torch.optim.Optimizer) -> None:
        record = self._lookup_optimizer(optimizer)
        if record is not None:
            record.stepped_elsewhere = True

    def _note_gradients_from_other_threads(self, record: _Optimizer) -> None:
        """A backward in another thread is not recorded, but what it leaves is: a parameter this step is about to
        apply, whose non-zero .grad changed since gradaudit last saw it, received gradient."""
        for param in self._owned(record):
            grad = param.tensor.grad
            if param.pending or grad is None or param.saw(grad) or all_zero(grad):
                continue
            self._events("accumulate", [param], by="a backward in another thread", norms=[norm(grad)], finite=[True])
            param.pending = True
            self._refresh([param])

    # ---------------------------------------------------------------- the window

    def _end_iteration(self) -> None:
        self.iterations += 1
        self._stepped_last_iteration, self._stepped_this_iteration = self._stepped_this_iteration, set()
        self.mode.forget_before(self._clock_at_last_step)
        self.chain_tracker.forget_before(self._clock_at_last_step)
        self._clock_at_last_step = self.mode.clock
        self._update_window()

    @_guarded
    def _update_window(self) -> None:
        """Decides whether the window is complete (see the class docstring); the stop comes at the next entry.
        Watching, a sample after the first window is one iteration, and a complete one is closed, not stopped."""
        wanted = self.iterations_wanted
        if wanted is None or self._window_done or self._idle:
            return
        if self.watch is not None and self.iterations_before_sample and self.iterations >= 1:
            self._close_sample()
            return
        self._decide_window(wanted)
        if self.watch is not None and self._window_done:
            self._close_sample()

    def _decide_window(self, wanted: int) -> None:
        if not self.optimizers:
            if len(self.backwards) >= _BACKWARDS_WITHOUT_STEP:
                self._window_done, self.stopped_by = True, "iterations"
            return
        stepped = any(o.steps for o in self.optimizers.values())
        per_step = max(self._most_backwards_between_steps, 1) if stepped else _BACKWARDS_WITHOUT_STEP
        if self.iterations >= wanted and all(o.steps or o.stepped_elsewhere for o in self.optimizers.values()):
            self._window_done, self.stopped_by = True, "iterations"
        elif self.iterations >= wanted + self.window_cap:
            self._window_done, self.stopped_by = True, "cap"
        elif len(self.backwards) - self._backwards_at_last_step >= self.window_cap * per_step:
            self._window_done, self.stopped_by = True, "cap"

    # ---------------------------------------------------------------- whole-run watching

    def _close_sample(self) -> None:
        """Hands the sample's Trace over, decides whether the next sample is a full audit and when the next light
        one is due (its cost counted up to here: the trace is built and the rules run), and goes idle."""
        trace = self.build_trace("")
        norms = group_norms(trace)
        jumped = any(
            norm > _NORM_JUMP * self._last_group_norms[group]
            for group, norm in norms.items()
            if self._last_group_norms.get(group)
        )
        nonfinite = any(not b.loss_finite for b in trace.backwards) or any(
            e.kind == "accumulate" and not e.finite for e in trace.events
        )
        if not trace.light:
            self.chain_probe.learn([chain.module for chain in self.chain_tracker.chains])
        chain_warns = self.chain_probe.warns(full=not trace.light)
        # a full audit answers the signs it saw itself; a NaN that stays gets light samples from then on
        self._next_full = trace.light and (jumped or chain_warns or (nonfinite and not self._was_nonfinite))
        self._was_nonfinite = nonfinite
        self._pace = self._last_stepper
        self._last_group_norms = norms or self._last_group_norms
        first = self.iterations_before_sample + 1
        if self.on_sample is not None:
            self.on_sample(trace, first)
        self.iterations_before_sample += max(self.iterations, 1)
        self._sample_first = first
        self.pacer.sample_ended(light=trace.light, iterations=max(self.iterations, 1))
        self._reset_sample()
        if self._next_full:
            self._start_sample()
        else:
            self._idle = True
            self.mode.paused = self._paused_before_step = True
            self._withdraw()

    def _reset_sample(self) -> None:
        """Forgets what the closed sample recorded; names, modules and optimizers stay known."""
        self.events, self.backwards, self.measured, self.nonfinite_origins = [], [], [], []
        self.regression_targets = []
        self.chain_tracker.chains.clear()
        self.module_inputs.clear()
        self.iterations = self._backwards_at_last_step = self._depth = 0
        self._window_done, self.stopped_by = False, "context-exit"  # a watched program is never stopped
        self._step_started.clear()
        self._stepped_this_iteration = set()
        for param in self.params.values():
            param.pending, param.snapshot = False, None
        for record in self.optimizers.values():
            record.steps = 0
        self._release_accumulators()  # an idle backward runs no hook of gradaudit's

    def _idle_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Counts idle iterations by the steps of the optimizer whose step ended the last sample (an iteration
        boundary); after one, starts the next sample (light, or full after a warning sign) when it is due."""
        record = self._lookup_optimizer(optimizer)
        if record is None or record.index != self._pace:
            return
        self.iterations_before_sample += 1
        self.pacer.plain_iteration_ended()
        if self._next_full or self.iterations_before_sample + 1 >= self._sample_first + self.pacer.watch.every:
            self._start_sample()

    def _start_sample(self) -> None:
        """The next iteration is audited: in full after a warning sign (when provenance can be had), else light."""
        self._return(provenance=self._next_full)
        self.light = not (self._next_full and self._mode_on_stack)
        self.term_grads = self._term_grads_wanted and not self.light
        self.mode.paused = self._paused_before_step = self.light
        self._idle = self._next_full = False
        self.pacer.sample_started()

    def _withdraw(self) -> None:
        """Watching, between samples: the module hooks and the provenance mode come off, where even idle they would
        cost every module call the slow path of `Module.__call__` and every torch call a Python dispatch (together
        a third more time on small steps). The mode only when it is the only one on the stack: a mode the program
        entered since must find the stack as it left it."""
        self._unhook_modules()
        stack = list(torch.overrides._get_current_function_mode_stack())
        if self._mode_aside_at == 0 and not stack:  # closed inside a step, which has the mode aside: it stays off
            self._mode_aside_at = None
            self._mode_on_stack, self._mode_shelved = False, True
        elif self._mode_on_stack and stack == [self.mode]:
            torch.overrides._pop_mode()
            self._mode_on_stack, self._mode_shelved = False, True

    def _return(self, provenance: bool) -> None:
        """A sample starts: the module hooks come back, and the mode for a full audit when the stack is empty (else
        the audit stays light)."""
        self._hook_modules()
        if provenance and self._mode_shelved and not torch.overrides._get_current_function_mode_stack():
            self.mode.__enter__()
            self._mode_on_stack, self._mode_shelved = True, False

    def _check_idle_loss(self, roots: Any) -> None:
        """While idle, every backward's loss is still checked for NaN/Inf (a full audit follows at once)."""
        if isinstance(roots, torch.Tensor) and roots.numel() == 1 and not roots.is_complex():
            finite = math.isfinite(roots.item())  # a scalar loss: one read, where isfinite().all() is two ops more
        else:
            given = [roots] if isinstance(roots, torch.Tensor) else list(roots)
            with torch.no_grad():
                finite = all(bool(torch.isfinite(r.detach()).all()) for r in given if isinstance(r, torch.Tensor))
        if not finite:
            self._next_full = not self._was_nonfinite
            if self.first_nonfinite_loss is None:
                self.first_nonfinite_loss = self.iterations_before_sample + 1

    # ---------------------------------------------------------------- provenance inside optimizers

    def _pause_for_step(self) -> None:
        """An optimizer's own ops (and gradaudit's reads around them) are not the program's: provenance stops
        observing from a step's pre-hook to the end of its post-hook (10,000 parameter tensors would otherwise make
        every step tens of thousands of observed ops), and the mode leaves this thread's stack meanwhile, so that
        those ops do not call into Python at all."""
        if self._steps_open == 0:
            self._paused_before_step, self.mode.paused = self.mode.paused, True
            self._step_set_mode_aside = self._set_mode_aside()
        self._steps_open += 1

    def _resume_after_step(self) -> None:
        if self._steps_open == 0:
            return
        self._steps_open -= 1
        if self._steps_open == 0:
            if self._step_set_mode_aside:
                self._put_mode_back()
            self.mode.paused = self._paused_before_step

    def _set_mode_aside(self) -> bool:
        """Takes the provenance mode off this thread's stack, remembering where it sat (see `_put_mode_back`); False
        when it is not there (light mode, already aside, or popped by torch while its `__torch_function__` runs)."""
        if not self._mode_on_stack or self._mode_aside_at is not None or torch.compiler.is_compiling():
            return False
        stack = torch.overrides._get_current_function_mode_stack()
        at = next((i for i, entry in enumerate(stack) if entry is self.mode), None)
        if at is None or not _take_off_stack(self.mode):
            return False
        self._mode_aside_at = at
        return True

    @contextlib.contextmanager
    def _unobserved(self) -> Iterator[None]:
        """gradaudit's own reads of every parameter (`.grad`, its version), and an optimizer's zero_grad: provenance
        paused, and the mode off the stack, since with it on, each attribute read of a tensor calls into it."""
        aside = self._set_mode_aside()
        try:
            with self.mode.quiet():
                yield
        finally:
            if aside:
                self._put_mode_back()

    def _put_mode_back(self) -> bool:
        """Puts the mode back where it sat, under the modes entered above it since; False when it was not aside."""
        at, self._mode_aside_at = self._mode_aside_at, None
        if at is None:
            return False
        above = []
        while torch._C._len_torch_function_stack() > at:
            above.append(torch.overrides._pop_mode())
        torch.overrides._push_mode(self.mode)
        for entry in reversed(above):
            torch.overrides._push_mode(entry)
        return True

    def _close_abandoned_steps(self) -> None:
        """A step that raised never reached its post-hook: the next forward, backward or zero_grad outside any
        step closure ends its pause."""
        if self._steps_open and not self._closures_open:
            self._steps_open = 1
            self._resume_after_step()
            self._step_started.clear()

    def _observed_closure(
        self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        """The closure a step calls (L-BFGS, Lightning's training step) is the program's code: observed as usual."""
        if callable(kwargs.get("closure")):
            return args, {**kwargs, "closure": self._observing(kwargs["closure"])}
        if len(args) > 1 and callable(args[1]) and _takes_closure_first(optimizer):
            return (args[0], self._observing(args[1]), *args[2:]), kwargs
        return None

    def _observing(self, closure: Callable) -> Callable:
        recorder = self

        @functools.wraps(closure)
        def observed(*args: Any, **kwargs: Any) -> Any:
            recorder._closures_open += 1
            paused, recorder.mode.paused = recorder.mode.paused, recorder._paused_before_step
            was_aside = recorder._put_mode_back()
            try:
                return closure(*args, **kwargs)
            finally:
                if was_aside:
                    recorder._set_mode_aside()
                recorder.mode.paused = paused
                recorder._closures_open -= 1

        return observed

    # ---------------------------------------------------------------- gradient state

    def _events(
        self,
        kind: str,
        params: list[_Param],
        backward: int | None = None,
        optimizer: int | None = None,
        by: str = "",
        location: Location | None = None,
        norms: list[float] | None = None,
        finite: list[bool] | None = None,
    ) -> None:
        """One event per parameter, in order; added to the last record when they continue it."""
        if not params:
            return
        ids = [id(param.tensor) for param in params]
        last = self.events[-1] if self.events else None
        if (
            last is not None
            and last.extends(kind, backward, optimizer, by, location)
            and (norms is None) == (last.norms is None)
        ):
            last.params += ids
            if last.norms is not None and last.finite is not None:
                last.norms += norms or []
                last.finite += finite or []
        else:
            seq = self._events_so_far()
            self.events.append(_Events(seq, kind, ids, backward, optimizer, by, location, norms, finite))
        if kind == "wipe":
            for param in params:
                param.pending = False

    def _events_so_far(self) -> int:
        last = self.events[-1] if self.events else None
        return last.seq + len(last.params) if last is not None else 0

    def _checkpoint(self, location: Location | None) -> None:
        """Detects, by their effect, wipes and updates made outside optimizers (Module.zero_grad, p.grad = None, manual SGD)."""
        with self._unobserved():
            for param in self.params.values():
                if not param.pending:
                    continue
                grad = param.tensor.grad
                if param.snapshot is not None and not same_values(param.tensor.detach(), param.snapshot):
                    self._events("apply", [param], by="an update outside any optimizer", location=location)
                    param.snapshot = param.tensor.detach().clone()
                if grad is None:
                    self._events("wipe", [param], by="grad set to None outside an optimizer", location=location)
                elif not param.saw(grad):
                    if all_zero(grad):
                        self._events("wipe", [param], by="grad zeroed outside an optimizer", location=location)
                    param.see(grad)

    @_guarded
    def _refresh(self, params: list[_Param]) -> None:
        with self._unobserved():
            for param in params:
                param.see(param.tensor.grad)

    # ---------------------------------------------------------------- backward

    def _wrap_backward(self, original: Callable, accumulates: bool) -> Callable:
        """`torch.autograd.backward` / `grad`, recorded: the wrapper takes exactly what the original takes."""
        recorder = self
        signature = inspect.signature(original)
        roots_argument = next(iter(signature.parameters))

        @functools.wraps(original)
        def backward(*args: Any, **kwargs: Any) -> Any:
            if recorder._in_backward or not recorder._admit():
                if recorder._foreign_thread():
                    recorder.foreign_backwards += 1
                elif recorder._idle and recorder._audited_thread() and not recorder._in_backward:
                    recorder._guarded_idle_check(roots_argument, args, kwargs)
                return original(*args, **kwargs)
            try:
                arguments = signature.bind(*args, **kwargs).arguments
            except TypeError:
                return original(*args, **kwargs)  # raises the program's own TypeError
            roots = arguments[roots_argument]
            whole = arguments.get("grad_tensors") is None and arguments.get("inputs") is None
            recorder._in_backward = True
            recorded = len(recorder.backwards)
            try:
                prepared = recorder._before_backward(roots, accumulates, whole)
                hooks, awaited, record_chains = prepared or ([], [], None)
                try:
                    result = original(*args, **kwargs)
                finally:
                    for handle in hooks:
                        handle.remove()
                    recorder._after_backward(awaited, record_chains)
            finally:
                recorder._in_backward = False
            recorder._tell_backward(recorded)
            recorder._update_window()
            return result

        return backward

    @_guarded
    def _tell_backward(self, first_record: int) -> None:
        if self.on_backward is None:
            return
        for record in self.backwards[first_record:]:
            if record.accumulates:
                unknown = record.walk_truncated or record.reach_unknown
                self.on_backward(None if unknown else record.param_ids, record.location)

    @_guarded
    def _guarded_idle_check(self, roots_argument: str, args: tuple, kwargs: dict) -> None:
        self._check_idle_loss(args[0] if args else kwargs[roots_argument])  # the roots come first in backward and grad

    @_guarded
    def _before_backward(self, tensors: Any, accumulates: bool, whole: bool = True) -> tuple[list, list, Any] | None:
        """`whole`: the backward was given neither its roots' gradients (`grad_tensors`, which scale what it
        accumulates) nor `inputs` (which leave the other parameters without their gradient)."""
        if torch.compiler.is_compiling():  # AOT autograd tracing a compiled region's backward: not the program's
            return None
        frame = user_frame()
        location = location_of(frame)
        given = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        roots = [r for r in given if isinstance(r, torch.Tensor)]
        with self.mode.quiet():
            self._checkpoint(location)
            nodes = [r.grad_fn for r in roots]
            view = walk(nodes, self._is_parameter, self.mode.user_code, self.max_nodes)
            self.raw_graphs.capture(location, view)
            reached = [self._param(view.leaves[pid][1]) for pid in view.param_ids]
            index = len(self.backwards)
            groups = [group for root in roots for group in self._term_groups(root, frame, view, location)]
            terms = [self._term(group, view) for group in groups]
            reads_backward = accumulates and whole and all(node is not None for node in nodes)
            self._measure_terms(terms, groups, view, accumulates, reads_backward)
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
            handles, record_chains = ([], None) if self.light else self.chain_tracker.prepare(view, index)
            probes, record_probes = self.chain_probe.prepare(view)
            handles += probes
            record_chains = _both(record_chains, record_probes)
        if not accumulates:
            return handles, [], record_chains
        accumulators = [view.leaves[pid][0] for pid in view.param_ids]
        if reach_unknown:
            hidden = self._hidden_leaves(view)
            reached += [self._param(tensor) for _, tensor in hidden]
            accumulators += [node for node, _ in hidden]
        for node, param in zip(accumulators, reached, strict=True):
            self._listen(node, param)
            param.awaited, param.contribution = True, None
        return handles, reached, record_chains

    def _listen(self, accumulator: Any, param: _Param) -> None:
        """Hooks a parameter's gradient accumulator, once: holding the node, the hook stays on it through later
        forward passes (the parameter's next graph reuses a live accumulator), so that a step of 10,000 parameters
        does not register and remove 10,000 hooks. Released at the end of the audit, and while watching is idle."""
        known = self._accumulators.get(id(accumulator))
        if known is None or known[0] is not accumulator:
            handle = accumulator.register_prehook(functools.partial(self._on_contribution, param))
            self._accumulators[id(accumulator)] = (accumulator, handle)

    def _release_accumulators(self) -> None:
        for _, handle in self._accumulators.values():
            handle.remove()
        self._accumulators.clear()

    @_guarded
    def _on_contribution(self, param: _Param, grad_outputs: tuple) -> None:
        grad = grad_outputs[0]
        if grad is None or not param.awaited:
            return
        param.awaited = False
        mode = self.mode
        paused, mode.paused = mode.paused, True  # `quiet()`, without a generator per parameter
        try:
            param.contribution = norm_unread(grad)  # of the detached gradient: no graph; read after, in one sync
        finally:
            mode.paused = paused

    def _read_contributions(self, received: list[_Param]) -> list[tuple[float, bool]]:
        """Each contribution's (norm, all finite), read in one batch per device. The rare
        non-finite norm is looked at again on the parameter's .grad (the contribution is not kept: a program that
        accumulates would hold a second copy of its gradients): overflow in the gradient's precision gets the norm
        in double, NaN/Inf stays, as it does in the .grad it was added to."""
        with self._unobserved(), torch.no_grad():
            sizes = read_all([param.contribution for param in received])
            for i, param in enumerate(received):
                if not math.isfinite(sizes[i]) and (grad := param.tensor.grad) is not None and all_finite(grad):
                    sizes[i] = norm(grad)
            return [(size, math.isfinite(size)) for size in sizes]

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
    def _after_backward(self, awaited: list[_Param], record_chains: Callable[[], None] | None) -> None:
        if record_chains is not None:
            record_chains()
        received = [param for param in awaited if param.contribution is not None]
        sizes = self._read_contributions(received)
        for param in awaited:
            param.awaited, param.contribution = False, None
        if not received:
            return
        backward = self.backwards[-1]
        self._term_from_contributions(backward, received, sizes)
        self._events(
            "accumulate",
            received,
            backward=backward.index,
            location=backward.location,
            norms=[size for size, _ in sizes],
            finite=[finite for _, finite in sizes],
        )
        for param in received:
            param.pending = True
            if not param.owners and param.snapshot is None:
                param.snapshot = param.tensor.detach().clone()
        self._refresh(received)

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
        return decompose(
            root.grad_fn,
            root.output_nr,
            self.mode.record_for,
            name,
            self._user_term_name,
            view.expanded,
            split_unrecorded=self.light,
        )

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
        self,
        terms: list[_TermRecord],
        groups: list[TermGroup],
        view: GraphView,
        accumulates: bool,
        reads_backward: bool,
    ) -> None:
        """Each term's own gradient per parameter, running no program code twice.

        A backward with one term that reaches parameters (however many addends it merges; the others are dead) needs
        no extra pass: its gradient is what the real backward accumulates. With several, a parameter that only one
        term reaches also gets, from the real backward, that term's gradient and nothing else: every path from the
        root to it runs through that term. So where the backward accumulates into every parameter from unit seeds
        (`reads_backward`) and every term's reach is known, a term is read from the backward on its own
        parameters, and an extra pass covers only the parameters it shares (none: no pass). Exact, no subtraction:
        the value read is the one the backward computed (the last term as the total less the others would leave
        rounding noise where a dead term must read exactly zero for GA102). No term gets an extra pass when a
        backward through it runs program code (hooks, Python-defined nodes, checkpoint recomputation): its gradient
        is then not measured, and it says why.
        """
        if not self.term_grads:
            return
        live = [(term, group) for term, group in zip(terms, groups, strict=True) if term.may_reach_parameters]
        if len(live) == 1:
            live[0][0].from_contributions = accumulates
            return
        shared = self._shared_params([term for term, _ in live]) if reads_backward else None
        for term, group in live:
            if term.user_code is not None:
                term.grads_skipped = f"a backward through it runs {term.user_code}"
                continue
            passed = term.param_ids
            if shared is not None:
                passed = [pid for pid in term.param_ids if pid in shared]
                term.alone = [pid for pid in term.param_ids if pid not in shared]
            if passed:
                term.sq_norms = self._term_gradients(group, view, passed)

    @staticmethod
    def _shared_params(terms: list[_TermRecord]) -> set[int] | None:
        """Parameters more than one term reaches; None when some term may reach parameters the walk did not see."""
        if any(term.reach_unknown for term in terms):
            return None
        seen: set[int] = set()
        shared: set[int] = set()
        for term in terms:
            for pid in term.param_ids:
                (shared if pid in seen else seen).add(pid)
        return shared

    def _term_gradients(self, group: TermGroup, view: GraphView, reached: list[int]) -> dict[int, float]:
        """The term's own gradient per parameter: an extra non-accumulating backward from its graph edges to `reached`
        (autograd runs only the part of the graph that leads to them)."""
        edges, seeds = [], []
        for part in group.edges:
            metadata = part.node._input_metadata[part.output_nr]
            edges.append(GradientEdge(part.node, part.output_nr))
            seeds.append(torch.full(tuple(metadata.shape), part.scale, dtype=metadata.dtype, device=metadata.device))
        params = [view.leaves[pid][1] for pid in reached]
        grads = torch.autograd.grad(edges, params, grad_outputs=seeds, retain_graph=True, allow_unused=True)
        return {pid: 0.0 if g is None else squared_norm(g) for pid, g in zip(reached, grads, strict=True)}

    def _term_from_contributions(
        self, backward: _BackwardRecord, received: list[_Param], sizes: list[tuple[float, bool]]
    ) -> None:
        """What the real backward accumulated, as term gradients: each parameter's contribution is the gradient of a
        one-term backward's term, and of the term that alone reaches it. A parameter the backward left no gradient
        (it stopped early, or its gradient was undefined) stays unmeasured, as it would for a one-term backward."""
        accumulated = {id(param.tensor): size for param, (size, _) in zip(received, sizes, strict=True)}
        for term in backward.terms:
            if term.from_contributions:
                listed = set(term.param_ids)
                term.param_ids += [pid for pid in accumulated if pid not in listed]
            for pid in term.param_ids if term.from_contributions else term.alone:
                if pid in accumulated:
                    term.sq_norms[pid] = accumulated[pid] ** 2

    def _upstream(self, view: GraphView) -> dict[str, list[int]]:
        upstream: dict[str, set[int]] = {}
        for groups, node in self.module_inputs:
            if view.holds(node):
                reached = view.params_reached(node)
                for group in groups:
                    upstream.setdefault(group, set()).update(reached)
        return {group: sorted(pids) for group, pids in upstream.items()}

    def _note_numerics(self, view: GraphView, backward: int, loss_finite: bool) -> None:
        """Claims the clamps and exps on this graph; for a non-finite loss, finds the op where NaN/Inf was born."""
        self.measured += [
            (m, backward, view.params_reached(m.node) if isinstance(m.stats, ClampStats) and not m.stats.gate else [])
            for m in self.mode.measured
            if view.holds(m.node)
        ]
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
            if view.holds(call.target_node):
                reached = view.params_reached(call.target_node)
                if reached:
                    self.regression_targets.append((call, reached, view.params_reached(call.prediction_node)))
            else:
                remaining.append(call)
        self.mode.regression_calls[:] = remaining[-1000:]

    # ---------------------------------------------------------------- user API

    def name_term(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.grad_fn is not None:
            self.user_term_names[id(tensor.grad_fn)] = (tensor.grad_fn, name)
        else:
            self.mode.named_constants[tensor] = name

    # ---------------------------------------------------------------- the Trace

    def build_trace(self, program: str, stopped_by: str | None = None, note: str = "") -> Trace:
        with collector_paused():
            return self._build_trace(program, stopped_by, note)

    def _build_trace(self, program: str, stopped_by: str | None, note: str) -> Trace:
        self._adopt_live_optimizers()
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
            window=Window(self.iterations, stopped_by or self.stopped_by, note, self.internal_errors_total()),
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
            events=[event for batch in self.events for event in self._grad_events(batch, names)],
            regression_targets=[
                RegressionTarget(
                    call.op,
                    call.location,
                    call.target_expression,
                    group_list(target_pids),
                    call.prediction_expression,
                    group_list(prediction_pids),
                    group_list(sorted(set(target_pids) & set(prediction_pids))),
                )
                for call, target_pids, prediction_pids in self.regression_targets
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
                    m.selection,
                    group_list(behind),
                )
                for m, backward, behind in self.measured
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
                for m, backward, _ in self.measured
                if not isinstance(m.stats, ClampStats)
            ],
            nonfinite_origins=[
                NonFiniteOrigin(
                    c.record.op, c.record.location, c.record.expression, backward, "nan" if bool(c.has_nan) else "inf"
                )
                for c, backward in self.nonfinite_origins
            ],
            raw_graphs=self.raw_graphs.graphs(names),
            light=self.light,
        )

    @staticmethod
    def _grad_events(batch: _Events, names: dict[int, str]) -> list[GradEvent]:
        norms = batch.norms or [None] * len(batch.params)
        finite = batch.finite or [True] * len(batch.params)
        return [
            GradEvent(
                batch.seq + i,
                batch.kind,
                names[pid],
                batch.backward,
                batch.optimizer,
                size,
                ok,
                batch.by,
                batch.location,
            )
            for i, (pid, size, ok) in enumerate(zip(batch.params, norms, finite, strict=True))
        ]

    def _module_label(self, module: nn.Module, names: dict[int, str]) -> str:
        """Its group when it was called at top level, else the dotted prefix its parameters' names share."""
        known = self.module_groups.get(id(module))
        if known is not None and known[0] is module and known[1] is not None:
            return known[1]
        paths = [names[id(p)].split(".")[:-1] for p in module.parameters() if id(p) in names]
        prefix = os.path.commonprefix(paths) if paths else []
        return ".".join(prefix) or _class_name(module)

    def _final_names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        taken: set[str] = set()
        last_suffix: dict[str, int] = {}  # where to go on numbering a base: 10,000 unnamed tensors share one base
        for pid, p in self.params.items():
            base = p.name or p.creation_name or self._fallback_name(p)
            name, n = base, last_suffix.get(base, 1)
            while name in taken:
                n += 1
                name = f"{base}#{n}"
            last_suffix[base] = n
            taken.add(name)
            names[pid] = name
        return names

    def _fallback_name(self, param: _Param) -> str:
        shape = "x".join(map(str, param.tensor.shape)) or "scalar"
        if param.owners:
            owner = next(o for o in self.optimizers.values() if o.index == param.owners[0])
            return f"{self._label(owner)}:param[{shape}]"
        return f"tensor[{shape}]"
