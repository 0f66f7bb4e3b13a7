"""One generic registry, used for defenses and for task suites.

Components register with a decorator. Third-party packages register through an entry-point group: the group's
entry points are listed (package metadata only, nothing imported) the first time a name is looked up, and each one
is imported on its own, when its name is asked for (or when every component is listed). A plugin that does not
import, or whose name another component has, therefore fails only a command that asks for that name, with one line
naming the distribution, the entry point and the problem; :meth:`Registry.problems` lists them all.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Callable, Generic, TypeVar

from benchmark.errors import BenchmarkError, one_line

T = TypeVar("T")


@dataclass
class _Plugins:
    """The entry points of a registry's group, by name, and what became of those imported so far."""

    found: dict[str, list[EntryPoint]]
    loaded: set[str] = field(default_factory=set)  # names whose entry point imported and was registered
    failed: dict[str, str] = field(default_factory=dict)  # name -> why its entry point does not import (one line)


def plugin_origin(ep: EntryPoint) -> str:
    """``plugin <distribution> <version> (entry point <name> = <module:object>)``."""
    dist = getattr(ep, "dist", None)
    where = f"{dist.name} {dist.version}" if dist is not None else "of an unknown distribution"
    return f"plugin {where} (entry point {ep.name} = {ep.value})"


def _definition(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def same_definition(a: object, b: object) -> bool:
    """Whether ``b`` is ``a`` defined again (a re-run notebook cell or a reloaded module): the same class name in
    the same module."""
    return isinstance(a, type) and isinstance(b, type) and _definition(a) == _definition(b)


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._plugins: _Plugins | None = None  # listed on first use

    def register(self, name: str) -> Callable[[T], T]:
        """Register under ``name``. Registering the same object again, or the same class defined again (same module
        and name: a re-run notebook cell), is allowed and keeps the newest; anything else under a taken name is an
        error."""

        def decorator(obj: T) -> T:
            old = self._items.get(name)
            if old is not None and old is not obj and not same_definition(old, obj):
                raise BenchmarkError(f"{self.kind} '{name}' is already registered by {_definition(old)}; "
                                     f"register {_definition(obj)} under another name")
            self._add(name, obj)
            return obj

        return decorator

    def _add(self, name: str, obj: T) -> None:
        self._items[name] = obj
        # a class's own name only: a subclass of a registered class must not inherit its parent's name
        own = vars(obj).get("name") if isinstance(obj, type) else getattr(obj, "name", None)
        if own in (None, ""):
            setattr(obj, "name", name)

    def _entry_points(self) -> _Plugins:
        if self._plugins is None:
            found: dict[str, list[EntryPoint]] = {}
            for ep in entry_points(group=self.entry_point_group) if self.entry_point_group else ():
                found.setdefault(ep.name, []).append(ep)
            self._plugins = _Plugins(found)
        return self._plugins

    def _conflict(self, name: str) -> str | None:
        """Why ``name`` cannot be used because two components claim it (None when at most one does)."""
        plugins = self._entry_points()
        owners = [plugin_origin(ep) for ep in plugins.found.get(name, [])]
        if name in self._items and name not in plugins.loaded:
            owners.insert(0, _definition(self._items[name]))
        if len(owners) < 2:
            return None
        return (f"{self.kind} '{name}' is defined twice: by {owners[0]} and by {owners[1]}; rename the plugin's entry "
                f"point (group {self.entry_point_group}) so each name has one owner")

    def _load(self, name: str) -> None:
        """Import plugin ``name`` and register what its entry point names, or raise one line saying why it does not
        import (remembered: a broken plugin is not imported again)."""
        plugins = self._entry_points()
        if name not in plugins.failed:
            ep = plugins.found[name][0]
            try:
                obj = ep.load()
            except (Exception, SystemExit) as err:  # noqa: BLE001 - a plugin's import may raise anything
                plugins.failed[name] = (f"{self.kind} {plugin_origin(ep)} does not import: "
                                        f"{type(err).__name__}: {one_line(err)}")
            else:
                plugins.loaded.add(name)
                self._add(name, obj)
        if name in plugins.failed:
            raise BenchmarkError(plugins.failed[name])

    def _load_all(self) -> None:
        for name in self._entry_points().found:
            if self._conflict(name) is None and name not in self._items:
                try:
                    self._load(name)
                except BenchmarkError:  # reported by problems()
                    pass

    def get(self, name: str) -> T:
        conflict = self._conflict(name)
        if conflict is not None:
            raise BenchmarkError(conflict)
        if name not in self._items and name in self._entry_points().found:
            self._load(name)
        if name not in self._items:
            known = sorted(set(self._items) | set(self._entry_points().found))
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise BenchmarkError(f"unknown {self.kind} '{name}'{hint} (registered: {', '.join(known) or 'none'})")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        """Whether ``name`` is taken: registered, or the name of an installed plugin (imported or not)."""
        return name in self._items or name in self._entry_points().found

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """Every usable component, plugins included (imported now); :meth:`problems` says which are not usable."""
        self._load_all()
        return sorted((n, obj) for n, obj in self._items.items() if self._conflict(n) is None)

    def problems(self) -> list[str]:
        """One line per plugin that cannot be used: its name has two owners, or it does not import."""
        self._load_all()
        plugins = self._entry_points()
        lines = [self._conflict(n) or plugins.failed.get(n) for n in sorted(plugins.found)]
        return [line for line in lines if line]
