"""The name a user would type for a live module, optimizer or tensor: its attribute path from a variable of the program.

Library code holds the objects under names nobody types (`self`, `self._optim`, `module`): the path goes outward
through the calling frames, through `self`, to the first frame of the user's own code that can reach the object
(`policy.optimizer`, `agent.critic`). Only instance attributes, module children, and short lists, tuples and dicts
are followed: no property, `__getattr__` or other user code runs while looking.
"""

from __future__ import annotations

import heapq
import itertools
import sys
import types
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from types import FrameType

import torch
from torch import nn

from gradaudit.capture.source import is_program_frame, package_path

_MAX_VISITED = 2000
"""Objects looked at per frame: a bound on the cost of naming one object."""
_MAX_PARTS = 6
_MAX_ITEMS = 32
"""Lists, tuples and dicts longer than this (datasets, replay buffers) are not looked into."""
_READABLE_PARTS = 4
"""A path through library objects longer than this (`trainer.strategy.model...`) is a last resort."""
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.MethodType, torch.Tensor, torch.optim.Optimizer)
_SCALARS = (str, bytes, int, float, complex)


@dataclass(frozen=True, order=True)
class Path:
    """An attribute path; ordered by how many of its parts are private (`_optim`), then by length."""

    private: int
    length: int
    parts: tuple[str, ...]

    def then(self, other: Path) -> Path:
        return Path(self.private + other.private, self.length + other.length, self.parts + other.parts)

    def tail(self) -> Path:
        """Without its first part (`self`)."""
        return Path(self.private - int(self.parts[0].startswith("_")), self.length - 1, self.parts[1:])

    def text(self) -> str:
        """`policy.mlp_extractor.0`, `critics[1]`, `nets['actor']`."""
        return "".join(p if i == 0 or p.startswith("[") else f".{p}" for i, p in enumerate(self.parts))


_HERE = Path(0, 0, ())


def _part(name: str) -> Path:
    return Path(int(name.startswith("_")), 1, (name,))


def instance_attributes(value: object) -> dict:
    """The object's own attribute dict, read without running any of its code; {} when it has none."""
    try:
        attributes = object.__getattribute__(value, "__dict__")
    except Exception:  # noqa: BLE001 - objects without a plain __dict__ are not looked into
        return {}
    return attributes if isinstance(attributes, dict) else {}


def _children(value: object) -> Iterator[tuple[str, object]]:
    """What an object holds by name, read without running any of its code (`type()`: proxies answer isinstance)."""
    kind = type(value)
    if issubclass(kind, nn.Module):
        attributes = instance_attributes(value)
        for store in ("_modules", "_parameters"):
            yield from list((attributes.get(store) or {}).items())
        yield from [(k, v) for k, v in attributes.items() if k not in _MODULE_INTERNALS]
    elif issubclass(kind, list | tuple):
        if len(value) <= _MAX_ITEMS:
            yield from ((f"[{i}]", item) for i, item in enumerate(value))
    elif issubclass(kind, dict):
        if len(value) <= _MAX_ITEMS:
            yield from ((f"[{key!r}]", item) for key, item in list(value.items()) if isinstance(key, str))
    elif not issubclass(kind, _OPAQUE):
        yield from list(instance_attributes(value).items())


def _cheapest(targets: dict[int, tuple[object, Path]], roots: Iterable[tuple[str, object]]) -> Path | None:
    """The least private, then shortest, path from a root to any target (plus that target's own path onward)."""
    order = itertools.count()
    heap = [(_part(name), next(order), value) for name, value in roots if value is not None and name.isidentifier()]
    heapq.heapify(heap)
    seen: set[int] = set()
    best: Path | None = None
    while heap and len(seen) < _MAX_VISITED:
        path, _, value = heapq.heappop(heap)
        if best is not None and path >= best:
            break
        if id(value) in seen:
            continue
        seen.add(id(value))
        target = targets.get(id(value))
        if target is not None and target[0] is value:
            best = min(best or path.then(target[1]), path.then(target[1]))
            continue
        if path.length < _MAX_PARTS:
            for name, child in _children(value):
                if child is not None and id(child) not in seen and not issubclass(type(child), _SCALARS):
                    heapq.heappush(heap, (path.then(_part(name)), next(order), child))
    return best


def attribute_path(obj: object, frame: FrameType | None, outermost: Collection[int] = ()) -> str | None:
    """The path a user would type to reach `obj`, looking outward from `frame` (not past the frames in `outermost`).

    In the user's own code, a variable (`critic`, `agent.critic`) or an attribute of `self` (`critic` in a method of
    a plain Agent object) names it; `self` of a module, and every library frame, pass the question outward with
    `self` as the object to name. With no user frame that can reach it, the outermost path from a library's `self`
    is used (`policy.optimizer` for stable-baselines3's `self.policy.optimizer`), then a library's local variable.
    """
    targets: dict[int, tuple[object, Path]] = {id(obj): (obj, _HERE)}
    through_self: list[Path] = []
    library_local: Path | None = None
    while frame is not None:
        if is_program_frame(frame):
            in_library = package_path(frame.f_code.co_filename) is not None
            local_names = frame.f_locals
            owner = local_names.get("self")
            roots = [("self", owner)] if in_library else [*local_names.items(), *frame.f_globals.items()]
            found = _cheapest(targets, roots)
            if found is not None and found.parts[0] == "self":
                relative = found.tail()
                if in_library or issubclass(type(owner), nn.Module) or not relative.parts:
                    through_self.append(relative)
                    targets[id(owner)] = (owner, relative)
                else:
                    return relative.text()
            elif found is not None:
                return found.text()
            elif in_library and library_local is None:
                library_local = _cheapest(targets, local_names.items())
        if id(frame) in outermost:
            break
        frame = frame.f_back
    named = [(p.private, p.length > _READABLE_PARTS, -i, p) for i, p in enumerate(through_self) if p.parts]
    if named:
        return min(named)[-1].text()
    return library_local.text() if library_local is not None else None


def frames_on_stack() -> frozenset[int]:
    """The frames running now (ids): a later search for names stops at them, the audit's callers."""
    frame, ids = sys._getframe(1), set()
    while frame is not None:
        ids.add(id(frame))
        frame = frame.f_back
    return frozenset(ids)
