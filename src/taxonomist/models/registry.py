"""A tiny name -> class registry shared by heads, losses and task weightings.

Components are created by name from plain config dicts (``create("flat", ...)``),
never through if/elif chains, so a new head or loss is one decorated class::

    @register_head("my_head")
    class MyHead(Head): ...

Unknown names and unknown options are :class:`~taxonomist.errors.ConfigError`
messages that list what is available.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ..errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Registered classes of one kind (``kind`` is used in error messages: "head", "loss")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: make ``cls`` available as ``name``."""

        def deco(cls: type[T]) -> type[T]:
            if not name or not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"{self.kind} name {name!r} must be letters, digits, '_' or '-'")
            old = self._items.get(name)
            if old is not None and old.__qualname__ != cls.__qualname__:
                raise ValueError(f"a {self.kind} called {name!r} is already registered ({old.__module__}."
                                 f"{old.__qualname__}); choose another name")
            self._items[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> type[T]:
        try:
            return self._items[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(str(name), self.names(), n=2)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}; registered {self.kind}s: "
                              f"{', '.join(self.names())}.{hint}") from None

    def options(self, name: str, skip: int = 0) -> dict[str, Any]:
        """Keyword options of ``name``'s constructor with their defaults (after ``skip`` positional args)."""
        sig = inspect.signature(self.get(name).__init__)
        params = list(sig.parameters.values())[1 + skip:]
        return {p.name: (None if p.default is inspect.Parameter.empty else p.default) for p in params
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def create(self, name: str, *args: Any, **cfg: Any) -> T:
        """Instantiate ``name`` with positional ``args`` and keyword options ``cfg`` (validated)."""
        cls = self.get(name)
        sig = inspect.signature(cls.__init__)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        if not takes_any:
            allowed = set(self.options(name, skip=len(args)))
            unknown = sorted(set(cfg) - allowed)
            if unknown:
                raise ConfigError(f"{self.kind} {name!r} has no option(s) {', '.join(map(repr, unknown))}; "
                                  f"its options are: {', '.join(sorted(allowed)) or '(none)'}")
        return cls(*args, **cfg)
