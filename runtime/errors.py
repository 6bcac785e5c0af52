"""One family of exceptions for mistakes a user can fix.

Command-line entry points catch :class:`MedusaError`, print its message and exit 1 with
no traceback (:func:`run_cli`). Anything else escaping is a bug in medusa-trt and keeps
its traceback.
"""

import contextlib
import logging
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator


def run_cli(prog: str, command: Callable[[], "int | None"], interrupted: "str | None" = None) -> int:
    """Exit code of one command-line call: ``command()``'s int (0 for None); 1 with
    ``prog: error: ...`` on a :class:`MedusaError`; 130 with ``prog: <interrupted>`` on
    Ctrl-C where ``interrupted`` is given (else the interrupt propagates); 143 on SIGTERM
    inside :func:`sigterm_as_interrupt`."""
    try:
        with warnings.catch_warnings():
            default = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                if issubclass(category, MedusaWarning):  # the runtime changed what was asked: one line
                    if logging.getLogger("medusa_trt").isEnabledFor(logging.WARNING):  # not under -q
                        print(f"{prog}: warning: {message}", file=sys.stderr)
                else:
                    default(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            code = command()
    except MedusaError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if interrupted is None:
            raise
        if isinstance(e, Terminated):  # "interrupted; nothing was written" -> "terminated (SIGTERM); ..."
            print(f"{prog}: {interrupted.replace('interrupted', 'terminated (SIGTERM)', 1)}", file=sys.stderr)
            return 143
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt inside :func:`sigterm_as_interrupt` so that every
    ``finally`` (temporary folders, partial files) runs as it does for Ctrl-C. A
    KeyboardInterrupt, not an Exception: no ``except Exception`` in a library swallows it."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (the previous handler is restored
    on exit). Only the main thread can install handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # an embedded interpreter without signal support
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


class MedusaError(Exception):
    """A user error: bad input, a missing file, a mismatch the user can fix."""


def require_extra(what: str, extra: str, modules: tuple[str, ...]) -> None:
    """MedusaError naming the pip extra when one of ``modules`` is not installed (``pip install .``
    is the runtime alone; exporting, training and plotting need extras)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MedusaError(
            f"{what} needs {', '.join(missing)}: pip install 'medusa-trt[{extra}]' "
            f"(or, in a checkout, pip install -e '.[{extra}]')"
        )


class ConfigError(MedusaError):
    """An argument of the public API or a command line has a wrong type or value
    (runtime/checks.py holds the rules); the message names it and says what to give."""


class MedusaWarning(UserWarning):
    """The runtime does something other than what was asked (a cap, a fallback), and says so."""


class TreeError(MedusaError):
    """A tree configuration is malformed or does not fit the model."""


class CheckpointError(MedusaError):
    """A Medusa head checkpoint is missing, of an unknown layout, or does not fit the backbone."""


class ContextLengthError(MedusaError):
    """The prompt (plus what must be generated) does not fit the model's context."""


class ArtifactError(MedusaError):
    """An artifact folder is missing files or was written by an incompatible exporter."""


class EngineError(MedusaError):
    """An engine call failed, or (``stopped``) the engine is closed or stopped for good: the server's
    fault, not the request's (the server answers 500, or 503 once the engine has stopped)."""

    def __init__(self, message: str, stopped: bool = False):
        super().__init__(message)
        self.stopped = stopped


class Cancelled(MedusaError):
    """A stream's ``cancel`` event was set: it ended before its next engine call (between prompt chunks
    too), its sequence's cache entries given up."""


class BackendUnavailableError(MedusaError):
    """An optional backend (TensorRT, ONNX Runtime CUDA, PyTorch) is not installed here."""


class ValidationError(MedusaError):
    """Exported graph outputs differ from the PyTorch reference; lists every failing output."""

    def __init__(self, failures, what: str = "exported graph does not match PyTorch"):
        self.failures = list(failures)
        lines = [f"  {f}" for f in self.failures]
        super().__init__(f"{what}:\n" + "\n".join(lines))
