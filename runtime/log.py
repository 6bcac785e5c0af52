"""Logging: one logger per package, configured only by the command-line tools.

Library code logs diagnostics and progress to its package's logger, never to ``print``:

    log = logging.getLogger("medusa_trt.exporter")   # or medusa_trt.runtime, medusa_trt.training

and never configures logging (no ``basicConfig``, no level or handler on the root logger or
on another library's logger). A program that imports medusa-trt decides what it sees: by
default Python shows WARNING and above. ``medusa-export``, ``medusa-run`` and
``medusa-train`` call :func:`cli_logging`: WARNING by default, ``-v`` INFO (the steps and
their times), ``-vv`` DEBUG (every comparison, full commands), ``-q`` errors only (and no
progress bars). What a command produces (tables, generated text, "artifact written to
...") is its output, printed to stdout, whatever the verbosity.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator

ROOT = "medusa_trt"
EXPORTER = f"{ROOT}.exporter"
RUNTIME = f"{ROOT}.runtime"
TRAINING = f"{ROOT}.training"

# verbosity (-v count minus -q count) -> level of the medusa_trt logger
_LEVELS = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}


def level_for(verbosity: int) -> int:
    if verbosity >= 2:
        return logging.DEBUG
    return _LEVELS[max(verbosity, -1)]


def add_verbosity_args(parser: argparse.ArgumentParser, sub: bool = False) -> None:
    """``-v/--verbose`` (repeatable) and ``-q/--quiet`` on ``parser``. ``sub``: a subcommand's
    parser under a main parser that has them too (its defaults must not overwrite the main's)."""
    default = argparse.SUPPRESS if sub else 0
    group = parser.add_argument_group("output")
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default,
        help="more detail on stderr: -v the steps and their times, -vv everything (default: warnings only)",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=default,
        help="errors only on stderr, no progress bars; the command's output still goes to stdout (default: off)",
    )


def verbosity(args: argparse.Namespace) -> int:
    """-v count minus -q count (0: the default)."""
    return getattr(args, "verbose", 0) - getattr(args, "quiet", 0)


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted (tests swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Format(logging.Formatter):
    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"{self.prog}: {record.levelname.lower()}: {msg}"
        return f"[{self.prog}] {msg}"


@contextlib.contextmanager
def cli_logging(prog: str, verbosity: int = 0) -> Iterator[logging.Logger]:
    """Within the block the ``medusa_trt`` loggers write to stderr at ``level_for(verbosity)``,
    as ``[prog] message`` (``prog: warning: message`` from WARNING up). Only the ``medusa_trt``
    logger is touched, and it is restored on exit: a test or a program calling ``main()`` twice
    finds logging as it was."""
    logger = logging.getLogger(ROOT)
    saved = (logger.level, logger.propagate, list(logger.handlers))
    handler = _Stderr()
    handler.setFormatter(_Format(prog))
    logger.handlers = [handler]
    logger.setLevel(level_for(verbosity))
    logger.propagate = False  # the root logger's handlers (if a host program set some) would repeat every line
    try:
        yield logger
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers = saved[2]


def quiet(name: str = ROOT) -> bool:
    """Whether progress bars should stay off: the ``medusa_trt`` logger shows no warnings
    (``-q``). Without any logging configuration this is False (Python shows warnings)."""
    return not logging.getLogger(name).isEnabledFor(logging.WARNING)
