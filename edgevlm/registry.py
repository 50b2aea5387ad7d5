"""Named plug-in registries with normalised names and helpful lookup errors."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from edgevlm.errors import UsageError

T = TypeVar("T")


def normalize(name: str) -> str:
    """Registry keys ignore case and treat '_', '.' and '-' alike ('Qwen2_5-VL' == 'qwen2.5-vl')."""
    return name.strip().lower().replace("_", "-").replace(".", "-")


class Registry(Generic[T]):
    """A name -> object map for one kind of plug-in (adapters, scorers, targets, runtimes)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._names: dict[str, str] = {}

    def add(self, name: str, item: T) -> T:
        key = normalize(name)
        if key in self._items:
            raise ValueError(f"duplicate {self.kind} '{name}'")
        self._items[key] = item
        self._names[key] = name
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of add()."""
        return lambda item: self.add(name, item)

    def get(self, name: str) -> T:
        key = normalize(name)
        if key in self._items:
            return self._items[key]
        available = ", ".join(self.names()) or "(none)"
        close = difflib.get_close_matches(key, list(self._items), n=1)
        hint = f" (did you mean '{self._names[close[0]]}'?)" if close else ""
        raise UsageError(
            f"unknown {self.kind} '{name}'; available: {available}{hint}",
            f"pick one of: {available}",
        )

    def __contains__(self, name: str) -> bool:
        return normalize(name) in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())

    def names(self) -> list[str]:
        return [self._names[k] for k in self._items]

    def items(self) -> list[tuple[str, T]]:
        return [(self._names[k], v) for k, v in self._items.items()]
