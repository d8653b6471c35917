"""The names a configuration can give (models, datasets, pruning methods, measurements), and the
plug-ins that add to them.

A registry is a plain mapping from a name to a factory, filled by the package's own modules and by
plug-ins through the same decorator (``hvd_sparse.register_model``, ``register_dataset``,
``register_pruning``, ``register_measurement``). A plug-in is
a module or a Python file named with ``--plugin`` (or a study spec's ``plugins:``), or an installed
package's entry point in the group ``hvd_sparse.plugins``; every rank imports it before any name is
looked up. A plug-in that cannot be found, raises on import, or registers a name that is taken, is a
ConfigError (one line, exit 2 on every rank).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Iterator, Sequence, TypeVar

from hvd_sparse.config import ConfigError

F = TypeVar("F", bound=Callable)
ENTRY_POINTS = "hvd_sparse.plugins"


def _where(obj: Callable) -> str:
    """``module.name (file:line)`` of a registered factory, for a message about it."""
    name = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
    try:
        return f"{name} ({inspect.getsourcefile(obj)}:{inspect.getsourcelines(obj)[1]})"
    except (TypeError, OSError):
        return name


class Registry(Generic[F]):
    """Name -> factory, for one kind of thing (``kind`` names it in messages)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, F] = {}
        self._origins: dict[str, str] = {}  # name -> the module that registered it (the plug-in being imported)

    def register(self, name: str) -> Callable[[F], F]:
        """A decorator adding the decorated factory under ``name``; a name taken already is a ConfigError
        saying where both are."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"register_{self.kind}: the name must be a non-empty string, got {name!r}")

        def add(factory: F) -> F:
            if name in self._entries:
                raise ConfigError(f"{self.kind} {name!r} is registered twice: by {_where(self._entries[name])} "
                                  f"and by {_where(factory)}")
            self._entries[name] = factory
            self._origins[name] = _importing[-1] if _importing else getattr(factory, "__module__", "")
            return factory
        return add

    def origin(self, name: str) -> str:
        """The name of the module that registered ``name`` (a plug-in's, not that of a class it imported)."""
        self[name]  # unknown: the usual error
        return self._origins[name]

    def __getitem__(self, name: str) -> F:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class Plugin:
    """A plug-in as a log records it: what was named, the module it became, its source and that
    source's SHA-256 (a resume whose plug-in changed is told so)."""

    name: str
    module: str
    source: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "module": self.module, "source": self.source, "sha256": self.sha256}


_loaded: dict[str, Plugin] = {}  # by module name or resolved path: a plug-in named twice is imported once
_importing: list[str] = []  # the module names of the plug-ins being imported (what registers is theirs)


def _key(name: str) -> str:
    return str(Path(name).resolve()) if _is_file(name) else name


def _is_file(name: str) -> bool:
    return name.endswith(".py") or "/" in name


def _import(name: str) -> object:
    if _is_file(name):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"plug-in {name}: no such file")
        module_name = f"hvd_sparse_plugin_{path.stem.replace('-', '_')}_{hashlib.sha256(_key(name).encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"plug-in {name}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        _importing.append(module_name)
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        finally:
            _importing.pop()
        return module
    _importing.append(name)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError(f"plug-in {name}: no module named {e.name!r} (not installed, or not on PYTHONPATH; a "
                              "file is named by its path, e.g. ./my_plugin.py)") from None
        raise
    finally:
        _importing.pop()


def load(name: str) -> Plugin:
    """Import one plug-in (a module name or a .py file) once; what it registers is then in the registries."""
    key = _key(name)
    if key in _loaded:
        return _loaded[key]
    try:
        module = _import(name)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the plug-in raised is named in one line
        sys.modules.pop(name, None)
        raise ConfigError(f"plug-in {name}: importing it raised {type(e).__name__}: {e}") from None
    source = getattr(module, "__file__", None) or ""
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest() if source and Path(source).is_file() else ""
    _loaded[key] = Plugin(name, getattr(module, "__name__", name), source, digest)
    return _loaded[key]


def load_plugins(names: Sequence[str]) -> list[Plugin]:
    """The installed entry points of ``hvd_sparse.plugins``, then ``names`` in order; what they are."""
    found = [load(ep.module) for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINTS),
                                                 key=lambda ep: ep.name)]
    return found + [load(name) for name in names]


def loaded() -> list[Plugin]:
    """Every plug-in this process imported, in order."""
    return list(_loaded.values())


def plugin_digest() -> str:
    """One hash of the plug-ins' sources, to check that every rank (every host) imported the same code."""
    return hashlib.sha256(" ".join(p.sha256 for p in _loaded.values()).encode()).hexdigest()[:16]
