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


def _cheapest_each(
    targets: dict[int, tuple[object, dict[int, Path]]], roots: Iterable[tuple[str, object]], wanted: int
) -> dict[int, Path]:
    """For each of `wanted` searches, the least private, then shortest, path from a root to any of its targets (plus
    that target's own path onward). One walk serves them all: paths leave the heap in cost order, so the first time a
    search's target leaves it is that search's cheapest path. A target of every search is not looked into (a path
    through it costs more than the path to it); one that some searches want is, for the others."""
    order = itertools.count()
    heap = [(_part(name), next(order), value) for name, value in roots if value is not None and name.isidentifier()]
    heapq.heapify(heap)
    seen: set[int] = set()
    best: dict[int, Path] = {}
    worst: Path | None = None
    while heap and len(seen) < _MAX_VISITED:
        path, _, value = heapq.heappop(heap)
        if worst is not None and path >= worst:
            break
        if id(value) in seen:
            continue
        seen.add(id(value))
        target = targets.get(id(value))
        if target is not None and target[0] is value:
            for search, onward in target[1].items():
                found = path.then(onward)
                best[search] = min(best.get(search, found), found)
            if len(best) == wanted:
                worst = max(best.values())  # only falls as more targets are found: a stale bound just looks longer
            if len(target[1]) == wanted:
                continue
        if path.length < _MAX_PARTS:
            for name, child in _children(value):
                if child is not None and id(child) not in seen and not issubclass(type(child), _SCALARS):
                    heapq.heappush(heap, (path.then(_part(name)), next(order), child))
    return best


@dataclass
class _Naming:
    """One object's search for its name, frame by frame outward."""

    targets: dict[int, tuple[object, Path]]
    """What names it: itself, then the `self` of each frame it was reached through, with the path onward from it."""
    through_self: list[Path]
    library_local: Path | None = None
    name: str | None = None
    done: bool = False

    def result(self) -> str | None:
        if self.done:
            return self.name
        named = [(p.private, p.length > _READABLE_PARTS, -i, p) for i, p in enumerate(self.through_self) if p.parts]
        if named:
            return min(named)[-1].text()
        return self.library_local.text() if self.library_local is not None else None


def _search(namings: list[_Naming], roots: list[tuple[str, object]]) -> list[Path | None]:
    """Each naming's cheapest path from the roots: one walk for all (they share every target but their own)."""
    targets: dict[int, tuple[object, dict[int, Path]]] = {}
    for index, naming in enumerate(namings):
        for key, (value, onward) in naming.targets.items():
            targets.setdefault(key, (value, {}))[1][index] = onward
    best = _cheapest_each(targets, roots, len(namings))
    return [best.get(index) for index in range(len(namings))]


def attribute_path(obj: object, frame: FrameType | None, outermost: Collection[int] = ()) -> str | None:
    """The path a user would type to reach `obj`, looking outward from `frame` (not past the frames in `outermost`).

    In the user's own code, a variable (`critic`, `agent.critic`) or an attribute of `self` (`critic` in a method of
    a plain Agent object) names it; `self` of a module, and every library frame, pass the question outward with
    `self` as the object to name. With no user frame that can reach it, the outermost path from a library's `self`
    is used (`policy.optimizer` for stable-baselines3's `self.policy.optimizer`), then a library's local variable.
    """
    return attribute_paths([obj], frame, outermost)[0]


def attribute_paths(objs: list[object], frame: FrameType | None, outermost: Collection[int] = ()) -> list[str | None]:
    """`attribute_path` of each object, with one search per frame for all of them (10,000 unnamed tensors would
    otherwise be 10,000 searches of the same variables)."""
    namings = {id(obj): _Naming({id(obj): (obj, _HERE)}, []) for obj in objs}
    while frame is not None:
        if is_program_frame(frame):
            _name_in_frame(list(namings.values()), frame)
        if id(frame) in outermost:
            break
        frame = frame.f_back
    return [namings[id(obj)].result() for obj in objs]


def _name_in_frame(namings: list[_Naming], frame: FrameType) -> None:
    """One step outward for the namings still looking: those that went through the same `self`s search together."""
    in_library = package_path(frame.f_code.co_filename) is not None
    local_names = frame.f_locals
    owner = local_names.get("self")
    roots = [("self", owner)] if in_library else [*local_names.items(), *frame.f_globals.items()]
    together: dict[tuple[int, ...], list[_Naming]] = {}
    for naming in namings:
        if not naming.done:
            together.setdefault(tuple(naming.targets)[1:], []).append(naming)
    for group in together.values():
        unfound = []
        for naming, found in zip(group, _search(group, roots), strict=True):
            if found is not None and found.parts[0] == "self":
                relative = found.tail()
                if in_library or issubclass(type(owner), nn.Module) or not relative.parts:
                    naming.through_self.append(relative)
                    naming.targets[id(owner)] = (owner, relative)
                else:
                    naming.name, naming.done = relative.text(), True
            elif found is not None:
                naming.name, naming.done = found.text(), True
            elif in_library and naming.library_local is None:
                unfound.append(naming)
        if unfound:
            for naming, local in zip(unfound, _search(unfound, list(local_names.items())), strict=True):
                naming.library_local = local


def frames_on_stack() -> frozenset[int]:
    """The frames running now (ids): a later search for names stops at them, the audit's callers."""
    frame, ids = sys._getframe(1), set()
    while frame is not None:
        ids.add(id(frame))
        frame = frame.f_back
    return frozenset(ids)
