"""pybilayer: one-shot bi-layer neural head avatars, rendered fast.

    from pybilayer import Renderer
    r = Renderer("model.safetensors")
    avatar = r.create_avatar(photo)            # once per identity
    frame = r.render(avatar, landmarks)        # once per frame

Importing never fails because CUDA, a GPU or an optional library is missing;
``pybilayer.native.capabilities()`` reports what is available and why not.
"""

from __future__ import annotations

from .errors import (
    BackendUnavailableError,
    CheckpointError,
    EngineError,
    MediaError,
    NoFaceError,
    PybilayerError,
)

__version__ = "0.1.0"

__all__ = [
    "Avatar",
    "BackendUnavailableError",
    "CheckpointError",
    "EngineError",
    "MediaError",
    "NoFaceError",
    "PybilayerError",
    "Renderer",
    "__version__",
]


def __getattr__(name: str):
    # Lazy: `import pybilayer` stays light (no torch import) until the engine is used.
    if name == "Renderer":
        from .renderer import Renderer

        return Renderer
    if name == "Avatar":
        from .avatar import Avatar

        return Avatar
    raise AttributeError(f"module 'pybilayer' has no attribute {name!r}")
