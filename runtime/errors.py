"""One family of exceptions for mistakes a user can fix.

Command-line entry points catch :class:`MedusaError`, print its message and exit 1 with
no traceback. Anything else escaping is a bug in medusa-trt and keeps its traceback.
"""


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
