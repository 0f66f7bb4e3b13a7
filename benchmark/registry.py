"""One generic registry, used for defenses and for task suites.

Components register with a decorator; third-party packages register through an entry-point group, loaded
lazily the first time a name is looked up and not found among the built-ins.
"""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

from benchmark.errors import BenchmarkError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._plugins_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise BenchmarkError(f"{self.kind} '{name}' is already registered by {self._items[name]!r}")
            self._items[name] = obj
            # a class's own name only: a subclass of a registered class must not inherit its parent's name
            own = vars(obj).get("name") if isinstance(obj, type) else getattr(obj, "name", None)
            if own in (None, ""):
                setattr(obj, "name", name)
            return obj

        return decorator

    def _load_plugins(self) -> None:
        if self._plugins_loaded or self.entry_point_group is None:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            if ep.name not in self._items:
                self.register(ep.name)(ep.load())

    def get(self, name: str) -> T:
        if name not in self._items:
            self._load_plugins()
        if name not in self._items:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise BenchmarkError(
                f"unknown {self.kind} '{name}'{hint} (registered: {', '.join(self.names()) or 'none'})"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        self._load_plugins()
        return sorted(self._items.items())
