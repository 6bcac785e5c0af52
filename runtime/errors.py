"""One family of exceptions for mistakes a user can fix.

Command-line entry points catch :class:`MedusaError`, print its message and exit 1 with
no traceback (:func:`run_cli`). Anything else escaping is a bug in medusa-trt and keeps
its traceback.
"""

import sys
from typing import Callable


def run_cli(prog: str, command: Callable[[], "int | None"], interrupted: "str | None" = None) -> int:
    """Exit code of one command-line call: ``command()``'s int (0 for None); 1 with
    ``prog: error: ...`` on a :class:`MedusaError`; 130 with ``prog: <interrupted>`` on
    Ctrl-C where ``interrupted`` is given (else the interrupt propagates)."""
    try:
        code = command()
    except MedusaError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


class MedusaError(Exception):
    """A user error: bad input, a missing file, a mismatch the user can fix."""


class TreeError(MedusaError):
    """A tree configuration is malformed or does not fit the model."""


class CheckpointError(MedusaError):
    """A Medusa head checkpoint is missing, of an unknown layout, or does not fit the backbone."""


class ContextLengthError(MedusaError):
    """The prompt (plus what must be generated) does not fit the model's context."""


class ArtifactError(MedusaError):
    """An artifact folder is missing files or was written by an incompatible exporter."""


class BackendUnavailableError(MedusaError):
    """An optional backend (TensorRT, ONNX Runtime CUDA, PyTorch) is not installed here."""


class ValidationError(MedusaError):
    """Exported graph outputs differ from the PyTorch reference; lists every failing output."""

    def __init__(self, failures):
        self.failures = list(failures)
        lines = [f"  {f}" for f in self.failures]
        super().__init__("exported graph does not match PyTorch:\n" + "\n".join(lines))
