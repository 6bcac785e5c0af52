"""``--help`` that shows every option's default (the three command lines share it),
:func:`field_default`, by which a flag takes its default from the config dataclass it fills, and
:func:`json_object`, the argparse type of a flag that takes a JSON object."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json


def field_default(cls, name: str):
    """The default of field ``name`` of the dataclass ``cls`` (its ``default`` or a fresh
    ``default_factory()``). A command-line flag whose value goes into that field takes its
    default from here: one place per default (tests/project/test_cli_defaults.py checks the commands)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise TypeError(f"{cls.__name__}.{name} has no default")
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


def json_object(text: str) -> dict:
    """argparse type: a JSON object (a bad one is the usual one-line usage error, exit 2)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, got a {type(value).__name__}")
    return value


def default_text(action: argparse.Action) -> str | None:
    """``(default: X)`` for an option whose help does not already say its default; None where
    there is nothing to say (no default, an on/off flag, a positional argument)."""
    d = action.default
    if not action.option_strings or d is None or d is argparse.SUPPRESS or isinstance(d, bool):
        return None
    if action.help is argparse.SUPPRESS or "default" in (action.help or "").lower():
        return None
    if isinstance(d, (list, tuple)):
        if not d:
            return None
        d = " ".join(str(x) for x in d)
    return f"(default: {d})".replace("%", "%%")  # help strings are %-formatted


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; each option's help ends with its default (like
    argparse.ArgumentDefaultsHelpFormatter, without its "(default: None)" / "(default: False)",
    and for options without a help string too)."""

    def _format_action(self, action: argparse.Action) -> str:
        text = default_text(action)
        if text:
            action = copy.copy(action)
            action.help = f"{action.help.rstrip()} {text}" if action.help else text
        return super()._format_action(action)
