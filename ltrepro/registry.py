"""One tiny generic registry (name -> factory), used for datasets, models, losses and methods."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from ltrepro.errors import LtreproError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a name to a factory; ``@registry.register("name")`` adds one, ``registry.get`` finds it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(factory: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            return factory

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise LtreproError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._entries[name]

    def unregister(self, name: str) -> None:
        """Remove an entry (tests register toy entries and remove them afterwards)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
