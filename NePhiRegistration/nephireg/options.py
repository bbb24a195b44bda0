"""One schema for method options: each method's ``Settings`` field has a :class:`Rule` (type and allowed range).

A method module defines ``OPTION_RULES = {field name: Rule}`` beside its ``Settings`` dataclass and calls
:func:`settings_from` (user options -> typed, checked settings) and :func:`check_settings` (from
``__post_init__``, so a directly built ``Settings`` is held to the same rules). Every refusal is an
:class:`nephireg.errors.InputError` that names the option, the value given and what is allowed. No torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Type, TypeVar

from nephireg.errors import InputError

# The options that have their own flags on the command line (``--iterations`` ...); others come from ``--option``.
OPTION_FLAGS = {"iterations": "--iterations", "regularization": "--regularization",
                "grid_spacing_mm": "--grid-spacing-mm", "model": "--model", "seed": "--seed"}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
S = TypeVar("S")


def option_label(name: str) -> str:
    """How the user wrote option ``name``: ``--iterations`` or ``--option coarse_level``."""
    return OPTION_FLAGS.get(name, f"--option {name}")


@dataclass(frozen=True)
class Rule:
    """What one option accepts. ``kind``: "int" | "float" | "bool" | "choice" | "text" | "int-list".

    Numbers lie in [low, high] (``low_open``: low itself excluded); ``also``: single values allowed outside the
    range (e.g. 0 = "off"); ``choices`` for "choice"; ``items`` (min, max) list length for "int-list";
    ``optional``: None allowed (the default is None)."""

    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    also: Tuple[Any, ...] = ()
    choices: Tuple[Any, ...] = ()
    items: Tuple[int, int] = (1, 8)
    optional: bool = False

    def describe(self) -> str:
        """The allowed values in words, for error messages and docs."""
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice":
            text = "one of " + ", ".join(map(str, self.choices))
        elif self.kind == "text":
            text = "a text"
        else:
            bracket = "(" if self.low_open else "["
            number = "an integer" if self.kind in ("int", "int-list") else "a finite number"
            text = f"{number} in {bracket}{_num(self.low)}, {_num(self.high)}]"
            if self.kind == "int-list":
                text = f"a list of {self.items[0]}-{self.items[1]} items, each {text}"
        if self.also:
            text += " or " + " or ".join(map(str, self.also))
        return text + (" (or unset)" if self.optional else "")

    def parse(self, name: str, value: Any) -> Any:
        """``value`` (from JSON, a flag or code) as this rule's type; InputError when it is not allowed."""
        if value is None and self.optional:
            return None
        parsed = _PARSERS[self.kind](self, value)
        if parsed is _BAD or (self.kind in ("int", "float") and not self._in_range(parsed)):
            raise InputError(f"{option_label(name)}={_show(value)} is not allowed; allowed: {self.describe()}")
        return parsed

    def _in_range(self, number: float) -> bool:
        if number in self.also:
            return True
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            return False
        return self.high is None or number <= self.high


# Rules of options with their own flag that more than one place checks (the request and a method's settings).
SEED_RULE = Rule("int", 0, 2**32 - 1)
GRID_SPACING_RULE = Rule("float", 0, 1000, low_open=True, optional=True)  # mm

_BAD = object()


def _num(value: Optional[float]) -> str:
    if value is None:
        return "inf"
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _as_int(rule: Rule, value: Any) -> Any:
    if isinstance(value, bool):
        return _BAD
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else _BAD
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return _BAD
    return int(value) if isinstance(value, int) else _BAD


def _as_float(rule: Rule, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return _BAD
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return _BAD
    return number if math.isfinite(number) else _BAD


def _as_bool(rule: Rule, value: Any) -> Any:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return True if text in _TRUE else False if text in _FALSE else _BAD


def _as_choice(rule: Rule, value: Any) -> Any:
    for choice in rule.choices:
        if (value == choice and type(value) is type(choice)) or str(value) == str(choice):
            return choice
    return _BAD


def _as_text(rule: Rule, value: Any) -> Any:
    return value if isinstance(value, str) and value.strip() else _BAD


def _as_int_list(rule: Rule, value: Any) -> Any:
    if not isinstance(value, (list, tuple)) or not rule.items[0] <= len(value) <= rule.items[1]:
        return _BAD
    numbers = [_as_int(rule, v) for v in value]
    if any(n is _BAD or not rule._in_range(n) for n in numbers):
        return _BAD
    return tuple(numbers)


_PARSERS: Dict[str, Callable[[Rule, Any], Any]] = {
    "int": _as_int, "float": _as_float, "bool": _as_bool, "choice": _as_choice, "text": _as_text,
    "int-list": _as_int_list,
}

Invariant = Tuple[Callable[[Any], bool], str]
"""(predicate on a Settings, message when it fails): a rule between options (e.g. coarse=adam needs iterations)."""


def settings_from(cls: Type[S], options: Mapping[str, Any], rules: Mapping[str, Rule],
                  ignored: Iterable[str] = (), what: str = "this method") -> S:
    """A ``cls`` (a Settings dataclass) from user ``options``: unknown names refused, every value parsed by its rule.

    ``ignored``: common option names this method does not use (accepted, dropped); None values are dropped."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known - set(ignored))
    if unknown:
        raise InputError(f"unknown {what} option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {name: rules[name].parse(name, value) for name, value in options.items()
              if name in known and value is not None}
    return cls(**values)


def check_settings(settings: Any, rules: Mapping[str, Rule], invariants: Sequence[Invariant] = ()) -> None:
    """Every field of ``settings`` against its rule, then the invariants; InputError for the first failure."""
    for f in fields(settings):
        rules[f.name].parse(f.name, getattr(settings, f.name))
    for holds, message in invariants:
        if not holds(settings):
            raise InputError(message)


def missing_rules(cls: type, rules: Mapping[str, Rule]) -> Tuple[str, ...]:
    """Fields of ``cls`` without a rule (a test keeps this empty for every method)."""
    return tuple(f.name for f in fields(cls) if f.name not in rules)
