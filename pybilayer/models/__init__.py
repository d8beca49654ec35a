"""The bi-layer networks (official-compatible structure and state-dict keys) and the model API.

    from pybilayer.models import Bilayer, BilayerConfig
    model = Bilayer()                                  # released configuration, random init, eval mode
    model = Bilayer.from_official(ckpt_dir, 2225, enhancer_dir=..., enhancer_epoch=1225)
    avatar = model.create_avatar(image, keypoints)     # once per identity: BilayerAvatar(texture, params)
    out = model.render(avatar, target_keypoints)       # once per frame: RenderOutput(image, lf, hf, ...)
    pose = model.keypoints_embedder(keypoints)         # per-frame split used by the fast paths:
    delta_uv, lf, mask_logits = model.inference_generator.generate(pose, avatar.params)

Each sub-network's ``state_dict()`` (after spectral-norm removal) has exactly the official keys and
shapes, including the ``identity_grid`` buffer of the inference generator (recomputed exactly; the
converter checks the official copy against it). Per-identity parameters are typed values
(``InferenceParams``, ``TextureParams``) passed to the generators, never stored in modules.
A randomly initialised model is numerically sane: every Conv2d/Linear weight is divided by its
spectral norm (power iteration), which is what spectral-norm training would apply.
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
