"""A map keyed by tensor identity that keeps no tensor alive, for the lookups every observed op makes."""

from __future__ import annotations

import weakref
from typing import Any

import torch


class _Ref(weakref.ref):
    """A weak reference that knows its entry's key, so that its callback can drop that entry."""

    __slots__ = ("key",)


class TensorMap:
    """Tensor -> value by identity; an entry goes when its tensor is freed.

    `WeakIdKeyDictionary` makes a weak-reference object in Python at every lookup; here each entry holds one, made
    when the entry is set, and a lookup is a dict read by `id` (checked against the reference, so a freed tensor's
    reused id never finds its entry). Every observed op looks up each of its inputs in several of these maps.
    """

    __slots__ = ("_entries", "_drop")

    def __init__(self) -> None:
        entries: dict[int, tuple[_Ref, Any]] = {}
        self._entries = entries

        def drop(ref: _Ref) -> None:  # holds the dict, not the map: a map no longer used is freed as usual
            entry = entries.get(ref.key)
            if entry is not None and entry[0] is ref:
                del entries[ref.key]

        self._drop = drop

    def get(self, tensor: torch.Tensor, default: Any = None) -> Any:
        entry = self._entries.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else default

    def __contains__(self, tensor: torch.Tensor) -> bool:
        entry = self._entries.get(id(tensor))
        return entry is not None and entry[0]() is tensor

    def __getitem__(self, tensor: torch.Tensor) -> Any:
        entry = self._entries.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            raise KeyError(tensor)
        return entry[1]

    def __setitem__(self, tensor: torch.Tensor, value: Any) -> None:
        key = id(tensor)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is tensor:
            ref = entry[0]
        else:
            ref = _Ref(tensor, self._drop)
            ref.key = key
        self._entries[key] = (ref, value)

    def __delitem__(self, tensor: torch.Tensor) -> None:
        if tensor not in self:
            raise KeyError(tensor)
        del self._entries[id(tensor)]

    def __len__(self) -> int:
        return len(self._entries)
