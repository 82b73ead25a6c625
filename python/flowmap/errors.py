"""The exceptions flowmap raises. Every one is a `FlowmapError` and also the built-in a Python user would
catch (`ValueError`, `FileNotFoundError`, `OSError`, `RuntimeError`, `KeyboardInterrupt`), with the
library's one-line message.

    >>> import flowmap
    >>> try:
    ...     flowmap.load("missing.safetensors")
    ... except FileNotFoundError as e:
    ...     print("no such model")
    no such model
"""


class FlowmapError(Exception):
    """The base of every error flowmap raises."""


class InvalidArgument(FlowmapError, ValueError):
    """An argument outside its valid range: `s > t`, `nfe = 0`, an unknown method, a class out of range."""


class DataError(FlowmapError, ValueError):
    """Data that cannot be used: a malformed file, NaNs, a wrong shape, too few points."""


class ConfigError(FlowmapError, ValueError):
    """A setting that does not parse or does not exist (a misspelt key, a wrong type)."""


class CheckpointError(FlowmapError, ValueError):
    """A checkpoint that is unreadable, of the wrong kind, or inconsistent with its metadata."""


class FileNotFound(FlowmapError, FileNotFoundError):
    """A file that does not exist."""


class FlowmapIOError(FlowmapError, OSError):
    """A file that could not be read or written."""


class DivergedError(FlowmapError, RuntimeError):
    """Training diverged (a NaN or infinite loss or gradient) and recovery gave up."""


class TensorError(FlowmapError, RuntimeError):
    """An error inside the tensor library."""


class TrainingInterrupted(FlowmapError, KeyboardInterrupt):
    """Ctrl-C during training: the run stopped after its current step. `.state` holds the training state
    (pass it as `resume=` to go on, bit for bit as if never stopped); with `state=PATH` it was also written
    there."""

    def __init__(self, message, state=None):
        super().__init__(message)
        self.state = state


__all__ = [
    "FlowmapError",
    "InvalidArgument",
    "DataError",
    "ConfigError",
    "CheckpointError",
    "FileNotFound",
    "FlowmapIOError",
    "DivergedError",
    "TensorError",
    "TrainingInterrupted",
]
