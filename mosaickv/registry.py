"""Registries of policy parts: decorators for this code base, an entry-point group for others.

A third-party package adds parts by declaring, in its own metadata,
``[project.entry-points."mosaickv.policies"] name = "pkg.module"`` (a module whose import
registers parts with the decorators below) or ``"pkg.module:function"`` (called once).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

ENTRY_POINT_GROUP = "mosaickv.policies"
T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Name -> class for one kind of policy part."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._parts: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(cls: T) -> T:
            if name in self._parts and self._parts[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._parts[name].__module__}")
            self._parts[name] = cls
            cls.registered_name = name
            return cls

        return add

    def get(self, name: str) -> T | None:
        load_builtin_and_plugins()
        return self._parts.get(name)

    def names(self) -> list[str]:
        load_builtin_and_plugins()
        return sorted(self._parts)


SCORERS: Registry = Registry("scorer")
SELECTORS: Registry = Registry("selector")
STRATEGIES: Registry = Registry("strategy")

register_scorer = SCORERS.register
register_selector = SELECTORS.register
register_strategy = STRATEGIES.register

_loaded = False


def load_builtin_and_plugins() -> None:
    """Import the built-in parts and every ``mosaickv.policies`` entry point, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("mosaickv.policies")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must say which one it is
            raise ImportError(f"mosaickv policy plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        if callable(obj) and ":" in ep.value:
            obj()


def reload_plugins() -> None:
    """Look for entry points again (after installing a plugin in a running process)."""
    global _loaded
    _loaded = False
    load_builtin_and_plugins()
