"""Exceptions of pybilayer. Each names the problem; all derive from PybilayerError."""


class PybilayerError(Exception):
    """Base class of every error pybilayer raises on purpose."""


class CheckpointError(PybilayerError, ValueError):
    """A model or avatar file is missing, truncated, foreign, or does not match the model."""


class NoFaceError(PybilayerError, ValueError):
    """No face (or not the requested face) was found in an image."""


class BackendUnavailableError(PybilayerError, RuntimeError):
    """A backend, device or optional library that was asked for is not usable here; says why."""


class EngineError(PybilayerError, RuntimeError):
    """A TensorRT plan could not be built, or was built for another GPU / TensorRT version."""


class MediaError(PybilayerError, ValueError):
    """An image, video or landmark file cannot be read or written."""
