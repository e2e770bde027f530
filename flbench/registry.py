"""One way to find a part by name: methods, datasets, partitions, protocols and scenarios are each a `Registry`.

A name resolves, in order, to
  1. a part registered in flbench (`@REGISTRY.register("name")`, or `name = ...` on a PromptMethod subclass), or a
     lazy built-in ("module:attribute", imported on first use, so an optional dependency costs nothing until used);
  2. a part another package declares as a Python entry point in the group `flbench.<kind>`
     (`[project.entry-points."flbench.methods"] mymethod = "mypkg.methods:MyMethod"`);
  3. a "module:attribute" path written as the name itself (`algorithm.name=mypkg.methods:MyMethod`), the way
     Hydra's `_target_` names a class.
So a user's method or dataset needs no edit inside flbench (docs/extending.md). Importing a user's module runs its
code, as `_target_` does: the config names code the user chose, never a file flbench merely reads.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any, Generic, TypeVar

from flbench.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, key: str, lazy: dict[str, str] | None = None) -> None:
        self.kind = kind  # "methods": also the entry-point group flbench.methods
        self.key = key  # the config key that names a part, for error messages: "algorithm.name"
        self._parts: dict[str, T] = {}
        self._lazy = dict(lazy or {})
        self._on_miss: Callable[[], None] | None = None

    def register(self, name: str, part: T | None = None) -> Any:
        """`REGISTRY.register("x", part)`, or `@REGISTRY.register("x")` above a function or class."""
        if part is not None:
            self._parts[name] = part
            return part

        def decorate(obj: T) -> T:
            self._parts[name] = obj
            return obj
        return decorate

    def on_miss(self, load: Callable[[], None]) -> None:
        """Called once before the first lookup of a name not yet registered (the methods import their modules)."""
        self._on_miss = load

    def _builtin(self, name: str) -> T | None:
        if name not in self._parts and self._on_miss is not None:
            load, self._on_miss = self._on_miss, None
            load()
        if name not in self._parts and name in self._lazy:
            self._parts[name] = _import(self._lazy[name], self.key)
        return self._parts.get(name)

    def get(self, name: str) -> T:
        part = self._builtin(name)
        if part is None:
            part = self._external(str(name))
        if part is None:
            raise ConfigError(f"{self.key}={name!r} is unknown; choose one of {self.names()} (or a module:attribute "
                              f"path, or a package's flbench.{self.kind} entry point)")
        return part

    def _external(self, name: str) -> T | None:
        found = [ep for ep in metadata.entry_points(group=f"flbench.{self.kind}") if ep.name == name]
        if found:
            part = found[0].load()
        elif ":" in name:
            part = _import(name, self.key)
        else:
            return None
        self._parts[name] = part
        return part

    def __contains__(self, name: object) -> bool:
        try:
            self.get(str(name))
        except ConfigError:
            return False
        return True

    def names(self) -> list[str]:
        if self._on_miss is not None:
            self._builtin("")
        entry_points = [ep.name for ep in metadata.entry_points(group=f"flbench.{self.kind}")]
        return sorted({*self._parts, *self._lazy, *entry_points} - {n for n in self._parts if ":" in n})

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _import(path: str, key: str) -> Any:
    module, _, attribute = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{key}={path!r} cannot be imported ({type(error).__name__}: {error})") from error
