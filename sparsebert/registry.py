"""Named registries: recipes and configs pick methods, criteria, mask patterns and schedules by
string, and code looks them up here."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

__all__ = ["NotRegistered", "Registry"]

T = TypeVar("T")


class NotRegistered(ValueError):
    """A name no registry entry answers to; the message lists the known names."""


class Registry(Generic[T]):
    """Names -> objects of one kind (methods, criteria, patterns, schedules, model families)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator that registers its argument under `name` (a second registration is an error)."""
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The object registered as `name`; NotRegistered (listing the known names) otherwise."""
        if name not in self._items:
            raise NotRegistered(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __getitem__(self, name: str) -> T:
        return self.get(name)
