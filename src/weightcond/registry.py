"""A small named registry, used for transforms and presets."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from .errors import OptionError, UnknownNameError

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Mapping[str, T], Generic[T]):
    """A read-only mapping from names to entries, filled with :meth:`register`.

    Looking up a missing name raises :class:`~weightcond.errors.UnknownNameError` listing the
    registered names.
    """

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Register the decorated entry under ``name`` (a decorator)."""

        def decorate(entry: T) -> T:
            self.add(name, entry)
            return entry

        return decorate

    def add(self, name: str, entry: T, *, before: str | None = None) -> None:
        """Register ``entry`` under ``name``; a name can be registered once. ``before``: a
        registered name the entry is listed (and tried) before; ``None``: last."""
        if not isinstance(name, str) or not name.isidentifier():
            raise OptionError(f"{self._kind} registry: argument 'name' expected an identifier, "
                              f"got {name!r}")
        if name in self._entries:
            raise OptionError(f"{self._kind} registry: name {name!r} is already registered")
        if before is None:
            self._entries[name] = entry
            return
        if before not in self._entries:
            self.lookup(before, f"{self._kind} registry", "before")  # raises, naming them
        entries = list(self._entries.items())
        at = next(i for i, (n, _) in enumerate(entries) if n == before)
        entries.insert(at, (name, entry))
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            valid = ", ".join(repr(n) for n in self._entries)
            raise UnknownNameError(
                f"unknown {self._kind} {name!r}; expected one of {valid}") from None

    def lookup(self, name: str, where: str, argument: str) -> T:
        """``self[name]``, with an error that names the call and the argument."""
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        valid = ", ".join(repr(n) for n in self._entries)
        raise UnknownNameError(
            f"{where}: argument '{argument}' expected one of {valid}, got {name!r}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self._kind}: {', '.join(self._entries)})"
