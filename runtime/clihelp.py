"""``--help`` that shows every option's default (the three command lines share it)."""

from __future__ import annotations

import argparse
import copy


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
