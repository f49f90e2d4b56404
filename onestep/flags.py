"""Flags declared once: a config dataclass field carries its help text, validator and choices as metadata, and
the command-line parser is generated from the fields.

    learning_rate: float = option(1e-4, "Adam(W) learning rate.", parse=non_negative_float, group=OPTIMISATION)

A field made with `option` is a flag named after the field (`--learning_rate`); a plain field is not. Booleans
become `--x / --no-x`; `list[int]` fields take comma-separated integers. Every generated flag defaults to None,
meaning "the preset's value", so a default lives in exactly one place: the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import UserError

# Help groups of the shared run flags, in the order --help lists them (a method's own groups follow).
TEACHER, DATA, OPTIMISATION, LOOP, MEMORY, EVALUATION = (
    "teacher",
    "data",
    "optimisation",
    "training loop",
    "memory",
    "in-training evaluation",
)
RUN_GROUPS = (TEACHER, DATA, OPTIMISATION, LOOP, MEMORY, EVALUATION)


@dataclass(frozen=True)
class Flag:
    help: str
    parse: Callable[[str], typing.Any] | None = None  # None: from the field's type
    choices: tuple | None = None
    group: str | None = None  # None: the group of the dataclass that declares the field


def option(default, help: str, *, parse=None, choices=None, group: str | None = None):
    """A config field that is also a command-line flag (lists get a default factory, as dataclasses require)."""
    meta = {"flag": Flag(help, parse, tuple(choices) if choices else None, group)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> Flag | None:
    return f.metadata.get("flag")


# -- validators (argparse `type=` functions: a bad value ends in one usage line and exit 2) ------------------


def _int_at_least(value: str, low: int, kind: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value!r}")
    return v


def positive_int(value: str) -> int:
    return _int_at_least(value, 1, "positive")


def non_negative_int(value: str) -> int:
    return _int_at_least(value, 0, "non-negative")


def _finite_float(value: str, allow_zero: bool) -> float:
    kind = "non-negative" if allow_zero else "positive"
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {kind} number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"expected a {kind} number, got {value!r}")
    return v


def positive_float(value: str) -> float:
    """A finite number above zero (clipping norms, LoRA alpha): NaN, inf, zero and negatives are refused."""
    return _finite_float(value, allow_zero=False)


def non_negative_float(value: str) -> float:
    """A finite number, zero or above (learning rates: 0 freezes a model)."""
    return _finite_float(value, allow_zero=True)


def finite_float(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return v


def probability(value: str) -> float:
    """A number in [0, 1)."""
    v = finite_float(value)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value!r}")
    return v


def unit_interval(value: str) -> float:
    """A number in [0, 1]."""
    v = finite_float(value)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}")
    return v


def int_list(value: str) -> list[int]:
    """Comma-separated integers, e.g. 999,749,499,249."""
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


# -- the parser --------------------------------------------------------------------------------------------


def _parser_for(annotation) -> tuple[Callable | None, bool]:
    """(argparse type, is a boolean switch) for a field's type; `X | None` reads as X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        return None, True
    if typing.get_origin(annotation) is list:
        return int_list, False
    if annotation in (int, float, str):
        return annotation, False
    raise TypeError(f"No flag parser for a field of type {annotation!r}; give the option a parse= function.")


def flag_fields(cls: type, exclude: tuple[str, ...] = ()) -> list[tuple[dataclasses.Field, Flag, type, object]]:
    """(field, its Flag, the class that declared it, its type) for every flag of a config dataclass, in field
    order; a class lists inherited fields it does not take as flags in `not_flags`."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = flag_of(f)
        if spec is None or f.name in exclude or f.name in getattr(cls, "not_flags", ()):
            continue
        owner = next(k for k in cls.__mro__ if f.name in vars(k).get("__annotations__", {}))
        out.append((f, spec, owner, hints[f.name]))
    return out


def add_flags(parser: argparse.ArgumentParser, classes: list[type], groups: dict[str, argparse._ArgumentGroup]):
    """Add the flags of each config dataclass to `parser`, each in its field's group (created on first use, after
    the ones already in `groups`). A class names its own group with a `flag_group` attribute."""
    for cls in classes:
        for f, spec, owner, hint in flag_fields(cls):
            title = spec.group or getattr(owner, "flag_group", None) or cls.__name__
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            parse, switch = _parser_for(hint)
            kw = {"help": spec.help.replace("%", "%%"), "default": None}  # argparse formats help with %
            if switch:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = spec.parse or parse
                if spec.choices:
                    kw["choices"] = spec.choices
            groups[title].add_argument(f"--{f.name}", **kw)
    return groups


def check_consistency(config, explicit: frozenset) -> None:
    """A flag given on the command line that has no effect with the others (a weight for a loss that is off) is
    refused in one sentence. A config class lists them in `flag_requires`: {flag: (field, predicate, what it
    needs)}."""
    for flag, (field_name, holds, needs) in getattr(type(config), "flag_requires", {}).items():
        if flag in explicit and not holds(getattr(config, field_name)):
            raise UserError(f"--{flag} has no effect without {needs}; drop it, or pass {needs}.")
