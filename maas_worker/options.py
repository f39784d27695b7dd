"""How a setting is declared: `Option` (its variable, parser, check and doc) in a field's metadata.

settings.py declares every field with `setting` (or `group`, for a nested
dataclass of settings); `read` builds a dataclass's keyword arguments from an
environment, `validate` checks an instance in its ``__post_init__``, and
`declared` lists the options in order (the docs table). A parser takes
``(variable, text)`` and raises `ConfigError` for text it cannot read; a check
takes ``(variable, value)`` and raises `ConfigError` out of bounds, `TypeError`
for a wrong type (a programmer's mistake).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from maas_worker.errors import ConfigError

V = TypeVar("V")

#: Field metadata keys: a setting's `Option`, or the class of a group of settings.
OPTION = "maas_option"
GROUP = "maas_group"


@dataclass(frozen=True, kw_only=True)
class Option:
    """How one setting is read, checked and documented (kept in its field's metadata)."""

    #: The environment variable.
    env: str
    #: Its meaning, as docs/configuration.md shows it (Markdown).
    doc: str
    #: Its default, as docs/configuration.md shows it (Markdown).
    default_doc: str
    #: ``(variable, text) -> value``; raises `ConfigError` for text it cannot read.
    parse: Callable[[str, str], Any]
    #: ``(variable, value)``; raises `ConfigError` out of bounds, `TypeError` for a wrong type.
    check: Callable[[str, Any], None]
    #: The default when it depends on the environment read (``XDG_CONFIG_HOME``).
    env_default: Callable[[Mapping[str, str]], Any] | None = None
    #: A secret (a password, in a URL or not): kept out of ``repr``.
    secret: bool = False
    #: What values are accepted, as the docs show it, when the check cannot say it.
    accepted_doc: str = ""

    @property
    def accepted(self) -> str:
        """What values are accepted, for the docs: the bounds or choices checked."""
        if self.accepted_doc:
            return self.accepted_doc
        return str(self.check) if isinstance(self.check, Range | Choices) else ""


def setting(
    default: Any = MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    env: str,
    doc: str,
    parse: Callable[[str, str], Any],
    check: Callable[[str, Any], None],
    shown: str | None = None,
    accepted: str = "",
    secret: bool = False,
    env_default: Callable[[Mapping[str, str]], Any] | None = None,
) -> Any:
    """A dataclass field declared with its `Option`; ``secret`` keeps it out of ``repr``.

    ``shown`` and ``accepted`` are the docs' default and accepted values when
    the default's text and the check's bounds do not say it.
    """
    option = Option(
        env=env,
        doc=doc,
        parse=parse,
        check=check,
        env_default=env_default,
        default_doc=shown if shown is not None else f"`{_show(default)}`",
        secret=secret,
        accepted_doc=accepted,
    )
    metadata = {OPTION: option}
    if factory is not None:
        return field(default_factory=factory, repr=not secret, metadata=metadata)
    return field(default=default, repr=not secret, metadata=metadata)


def group(cls: type) -> Any:
    """A field holding a group of settings (itself declared with `setting` fields)."""
    return field(default_factory=cls, metadata={GROUP: cls})


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def require(name: str, value: Any, kind: type | tuple[type, ...], what: str) -> None:
    """Raise `TypeError` unless ``value`` is a ``kind`` (a bool is no number)."""
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise TypeError(f"{name} must be {what}, got a bool")
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")


# -- parsers and checks: (variable, text) -> value and (variable, value) -> None --------------
def parse_text(_: str, raw: str) -> str:
    """The text as it is."""
    return raw


def parse_path(_: str, raw: str) -> Path:
    """The text as a path."""
    return Path(raw)


def parse_paths(_: str, raw: str) -> tuple[Path, ...]:
    """``a:b:c`` (os.pathsep) as paths; empty parts are ignored."""
    return tuple(Path(p) for p in raw.split(os.pathsep) if p)


def parse_int(name: str, raw: str) -> int:
    """An integer (bounds are the check's)."""
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def parse_float(name: str, raw: str) -> float:
    """A number (bounds are the check's)."""
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def parse_flag(name: str, raw: str) -> bool:
    """``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``, any case."""
    text = raw.strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be 1 or 0, got {text!r}")


def parse_lower(_: str, raw: str) -> str:
    """The text, stripped and lower-cased (for a choice)."""
    return raw.strip().lower()


def is_str(name: str, value: Any) -> None:
    """Check: a string."""
    require(name, value, str, "a string")


def is_optional_str(name: str, value: Any) -> None:
    """Check: a string or None."""
    if value is not None:
        require(name, value, str, "a string or None")


def is_bool(name: str, value: Any) -> None:
    """Check: a bool."""
    require(name, value, bool, "a bool")


def is_path(name: str, value: Any) -> None:
    """Check: a Path."""
    require(name, value, Path, "a Path")


def are_paths(name: str, value: Any) -> None:
    """Check: a tuple of Paths."""
    require(name, value, tuple, "a tuple of Paths")
    for path in value:
        is_path(name, path)


@dataclass(frozen=True)
class Range:
    """Check: an integer from ``lo`` (to ``hi`` when given), or a number from ``lo`` to ``hi``."""

    lo: float
    hi: float | None = None
    integer: bool = False

    def __call__(self, name: str, value: Any) -> None:
        """Raise `ConfigError` out of bounds, `TypeError` for a value of another type."""
        if self.integer:
            require(name, value, int, "an integer")
        else:
            require(name, value, (int, float), "a number")
        lo, hi = _number(self.lo), None if self.hi is None else _number(self.hi)
        if hi is None or self.integer:
            if value < self.lo:
                raise ConfigError(f"{name} must be >= {lo}, got {_number(value)}")
            if self.hi is not None and value > self.hi:
                raise ConfigError(f"{name} must be <= {hi}, got {_number(value)}")
        elif not self.lo <= value <= self.hi:
            raise ConfigError(f"{name} must be between {lo} and {hi}, got {_number(value)}")

    def __str__(self) -> str:
        what = "an integer" if self.integer else "a number"
        if self.hi is None:
            return f"{what} >= {_number(self.lo)}"
        return f"{what} from {_number(self.lo)} to {_number(self.hi)}"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def int_in(lo: int, hi: int | None = None) -> Range:
    """Check: an integer, ``lo`` <= value (<= ``hi`` when given)."""
    return Range(lo, hi, integer=True)


def number_in(lo: float, hi: float) -> Range:
    """Check: a number, ``lo`` <= value <= ``hi``."""
    return Range(lo, hi)


@dataclass(frozen=True)
class Choices:
    """Check: one of ``options`` (strings)."""

    options: tuple[str, ...]

    def __call__(self, name: str, value: Any) -> None:
        """Raise `ConfigError` for another string, `TypeError` for a value of another type."""
        require(name, value, str, "a string")
        if value not in self.options:
            raise ConfigError(f"{name} must be one of {', '.join(self.options)}, got {value!r}")

    def __str__(self) -> str:
        return ", ".join(f"`{o}`" for o in self.options)


def one_of(options: tuple[str, ...]) -> Choices:
    """Check: one of ``options``."""
    return Choices(options)


def pairs(name: str, raw: str, value: Callable[[str, str], V], usage: str) -> dict[str, V]:
    """Parse ``key=VALUE,key=VALUE``; ``value(key, text)`` raises ValueError when wrong."""
    out: dict[str, V] = {}
    try:
        for part in raw.strip().split(","):
            key, _, text = part.partition("=")
            if not key.strip():
                raise ValueError
            out[key.strip()] = value(key.strip(), text)
    except ValueError:
        raise ConfigError(f"{name} must look like {usage}") from None
    return out


def mapping_of(usage: str, ok: Callable[[str, Any], bool]) -> Callable[[str, Any], None]:
    """Check a ``key=VALUE,...`` setting: a dict whose every ``ok(key, value)`` holds."""

    def check(name: str, value: Any) -> None:
        require(name, value, dict, "a dict")
        for key, item in value.items():
            try:
                good = isinstance(key, str) and ok(key, item)
            except (TypeError, ValueError):
                good = False
            if not good:
                raise ConfigError(f"{name} must look like {usage}")

    return check


def is_number(value: Any) -> bool:
    """True for an int or a float (a bool is no number)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- validation and reading ---------------------------------------------------------------
def validate(obj: Any) -> None:
    """Check every declared field of ``obj`` (a settings dataclass) against its `Option`."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if OPTION in f.metadata:
            f.metadata[OPTION].check(f.metadata[OPTION].env, value)
        elif GROUP in f.metadata:
            require(f.name, value, f.metadata[GROUP], f"a {f.metadata[GROUP].__name__}")


def read(cls: type, env: Mapping[str, str], skip: Collection[str] = ()) -> dict[str, Any]:
    """Keyword arguments for ``cls`` from ``env``: only the variables that are set
    (an empty value means the default); fields named in ``skip`` are not read."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        if GROUP in f.metadata:
            values[f.name] = f.metadata[GROUP](**read(f.metadata[GROUP], env))
            continue
        option: Option = f.metadata[OPTION]
        raw = env.get(option.env, "")
        if raw.strip():
            values[f.name] = option.parse(option.env, raw)
        elif option.env_default is not None:
            values[f.name] = option.env_default(env)
    return values


def declared(cls: type) -> Iterator[Option]:
    """Every option of ``cls``, its groups' included, in declaration order."""
    for f in fields(cls):
        if GROUP in f.metadata:
            yield from declared(f.metadata[GROUP])
        else:
            yield f.metadata[OPTION]
