"""Torch-free Medusa runtime: tree buffers, the decode loop and engine backends.

Importing this package never imports torch, onnxruntime or tensorrt; backends import
what they need when they are constructed.
"""

from runtime.api import Generation, MedusaGenerator, load  # noqa: F401
from runtime.errors import (  # noqa: F401
    ArtifactError,
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    ContextLengthError,
    MedusaError,
    MedusaWarning,
    TreeError,
)
