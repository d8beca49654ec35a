"""The bi-layer networks (official-compatible structure and state-dict keys) and the model API.

    from pybilayer.models import Bilayer, BilayerConfig
    model = Bilayer()                                  # released configuration, random init
    avatar = model.create_avatar(image, keypoints)     # once per identity
    out = model.render(avatar, target_keypoints)       # once per frame
"""

from .bilayer import Bilayer, BilayerAvatar, RenderOutput
from .config import BilayerConfig
from .params import (
    AdaBNParams,
    AdaConvParams,
    AdaSpadeParams,
    InferenceBlockParams,
    InferenceParams,
    TextureBlockParams,
    TextureParams,
)

__all__ = [
    "AdaBNParams",
    "AdaConvParams",
    "AdaSpadeParams",
    "Bilayer",
    "BilayerAvatar",
    "BilayerConfig",
    "InferenceBlockParams",
    "InferenceParams",
    "RenderOutput",
    "TextureBlockParams",
    "TextureParams",
]
