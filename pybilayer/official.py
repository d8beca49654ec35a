"""Conversion of the released saic-violet/bilayer-model checkpoints into a ``Bilayer``.

The official runs store one ``{epoch}_{net}.pth`` state dict per network (official_bilayer.md 2.10),
with spectral norm applied to every Conv2d/Linear. Conversion:

- reads each file with ``torch.load(weights_only=True)`` (no pickled code runs);
- removes spectral norm: ``W = W_orig / (u^T W_orig v)`` with the stored u, v (no power iteration,
  exactly what ``remove_spectral_norm`` does in eval). Files written by PyTorch 1.0 store the
  normalised ``weight`` buffer instead of ``weight_v``; it is used as is;
- detects the 1088-input harmonic keypoint MLP by the shape of ``net.mlp.0``;
- treats the texture enhancer and the discriminator as optional;
- checks every key and shape against our networks; anything unknown, missing or mis-shaped raises
  ``CheckpointError`` naming the file and the key;
- checks the stored ``identity_grid`` (and harmonic ``frequencies``) against the exactly recomputed
  buffers and keeps the recomputed ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from .errors import CheckpointError
from .models import Bilayer, BilayerConfig

REQUIRED_NETWORKS = ("identity_embedder", "texture_generator", "keypoints_embedder", "inference_generator")
OPTIONAL_NETWORKS = ("texture_enhancer", "discriminator")
HARMONIC_KEY = "net.mlp.0.weight"
# Buffers we recompute; the file's copy must agree within this (official linspace grid differs by ulps).
RECOMPUTED_BUFFER_ATOL = 1e-5


def checkpoint_path(ckpt_dir, epoch: int, network: str) -> Path:
    """``{ckpt_dir}/{epoch}_{network}.pth``; ``ckpt_dir`` may be the run directory or its ``checkpoints/``."""
    directory = Path(ckpt_dir)
    name = f"{int(epoch)}_{network}.pth"
    if not (directory / name).exists() and (directory / "checkpoints" / name).exists():
        directory = directory / "checkpoints"
    return directory / name


def read_official_state(path) -> dict[str, Tensor]:
    """Load one official state dict safely; raises CheckpointError for missing or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"official checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse means a corrupt or foreign file
        raise CheckpointError(
            f"cannot read official checkpoint {path} (corrupt or not a tensor state dict): {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (got {type(state).__name__})")
    return dict(state)


def remove_official_spectral_norm(state: dict[str, Tensor], source: str = "state dict") -> dict[str, Tensor]:
    """Replace every ``weight_orig``/``weight_u``/``weight_v`` triple by ``weight = W_orig / sigma``."""
    out = dict(state)
    for key in [k for k in state if k == "weight_orig" or k.endswith(".weight_orig")]:
        base = key[: -len("weight_orig")]
        w_orig = out.pop(key).to(torch.float32)
        matrix = w_orig.reshape(w_orig.shape[0], -1)
        if base + "weight_u" not in out:
            raise CheckpointError(f"{source}: {key} has no {base}weight_u")
        u = out.pop(base + "weight_u").to(torch.float32)
        if u.shape != (matrix.shape[0],):
            raise CheckpointError(
                f"{source}: {base}weight_u has shape {tuple(u.shape)}, expected ({matrix.shape[0]},)")
        if base + "weight_v" in out:
            v = out.pop(base + "weight_v").to(torch.float32)
            if v.shape != (matrix.shape[1],):
                raise CheckpointError(
                    f"{source}: {base}weight_v has shape {tuple(v.shape)}, expected ({matrix.shape[1]},)")
            if base + "weight" in out:
                raise CheckpointError(f"{source}: {base}weight is stored next to weight_orig/weight_u/weight_v")
            # fp32, the same arithmetic as torch's remove_spectral_norm in eval mode.
            sigma = torch.dot(u, torch.mv(matrix, v))
            if not torch.isfinite(sigma) or sigma.abs() < 1e-12:
                raise CheckpointError(f"{source}: spectral norm of {key} is {float(sigma)}: cannot normalise")
            weight = w_orig / sigma
        elif base + "weight" in out:  # PyTorch 1.0 format: the normalised weight is a buffer
            weight = out.pop(base + "weight")
            if weight.shape != w_orig.shape:
                raise CheckpointError(
                    f"{source}: {base}weight has shape {tuple(weight.shape)}, weight_orig {tuple(w_orig.shape)}")
        else:
            raise CheckpointError(f"{source}: {key} has neither {base}weight_v nor {base}weight")
        out[base + "weight"] = weight.to(torch.float32)
    stray = sorted(k for k in out if k.endswith(("weight_u", "weight_v")))
    if stray:
        raise CheckpointError(f"{source}: spectral-norm buffer without weight_orig: {stray[0]}")
    return out


def _check_recomputed(name: str, stored: Tensor, ours: Tensor, source: str) -> None:
    if tuple(stored.shape) != tuple(ours.shape):
        raise CheckpointError(f"{source}: {name} has shape {tuple(stored.shape)}, expected {tuple(ours.shape)}")
    error = (stored.to(torch.float64) - ours.to(torch.float64)).abs().max().item()
    if not error <= RECOMPUTED_BUFFER_ATOL:
        raise CheckpointError(f"{source}: {name} differs from the recomputed buffer by {error:.3g}")


def _match_network(network: str, state: dict[str, Tensor], expected: dict[str, Tensor],
                   source: str) -> dict[str, Tensor]:
    for key in state:
        if key not in expected:
            raise CheckpointError(f"{source}: unknown key {key!r} for {network}")
    for key, reference in expected.items():
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key!r} of {network}")
        if tuple(state[key].shape) != tuple(reference.shape):
            raise CheckpointError(f"{source}: {key!r} has shape {tuple(state[key].shape)}, "
                                  f"expected {tuple(reference.shape)}")
    matched = {}
    for key, reference in expected.items():
        tensor = state[key]
        if key in ("identity_grid", "frequencies"):
            _check_recomputed(key, tensor, reference, source)
            tensor = reference
        matched[key] = tensor.to(reference.dtype).contiguous()
    return matched


def convert_official(ckpt_dir, epoch: int, enhancer_dir=None, enhancer_epoch: int | None = None,
                     include_discriminator: bool = True, config: BilayerConfig | None = None) -> Bilayer:
    """Build a ``Bilayer`` (eval mode, spectral norm removed) from official checkpoints.

    ckpt_dir/epoch: the base run (e.g. ``runs/vc2-hq_adrianb_paper_main``, 2225) with the four
    required networks and, optionally, ``texture_enhancer`` and ``discriminator``.
    enhancer_dir/enhancer_epoch: the enhancer run (e.g. ``..._enhancer``, 1225), whose
    ``texture_enhancer`` replaces any in the base run. ``config``: the architecture when it is not
    the released one (its harmonic flag and optional networks are still taken from the files).
    """
    if (enhancer_dir is None) != (enhancer_epoch is None):
        raise ValueError("enhancer_dir and enhancer_epoch must be given together")
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"official checkpoint directory not found: {ckpt_dir}")
    paths = {net: checkpoint_path(ckpt_dir, epoch, net) for net in REQUIRED_NETWORKS + OPTIONAL_NETWORKS}
    if enhancer_dir is not None:
        paths["texture_enhancer"] = checkpoint_path(enhancer_dir, enhancer_epoch, "texture_enhancer")
        if not paths["texture_enhancer"].is_file():
            raise CheckpointError(f"texture enhancer checkpoint not found: {paths['texture_enhancer']}")
    if not include_discriminator:
        paths.pop("discriminator")
    present = [net for net, path in paths.items() if net in REQUIRED_NETWORKS or path.is_file()]

    states = {}
    for net in present:
        source = str(paths[net])
        states[net] = remove_official_spectral_norm(read_official_state(paths[net]), source)

    mlp = states["keypoints_embedder"].get(HARMONIC_KEY)
    if mlp is None:
        missing = HARMONIC_KEY.replace(".weight", ".weight_orig")
        raise CheckpointError(f"{paths['keypoints_embedder']}: missing key {missing!r}")
    base = config if config is not None else BilayerConfig()
    values = base.to_dict()
    values["texture_enhancer"] = "texture_enhancer" in states
    values["discriminator"] = "discriminator" in states
    harmonic_inputs = 136 * 2 * base.num_harmonics
    if mlp.shape[1] == 136:
        values["harmonic_encoding"] = False
    elif mlp.shape[1] == harmonic_inputs:
        values["harmonic_encoding"] = True
    else:
        raise CheckpointError(f"{paths['keypoints_embedder']}: {HARMONIC_KEY} has {mlp.shape[1]} inputs; "
                              f"expected 136 (plain) or {harmonic_inputs} (harmonic encoding)")
    config = BilayerConfig.from_dict(values)

    with torch.device("meta"):
        reference = Bilayer(config, init_weights=False)
    full_state: dict[str, Tensor] = {}
    for net, state in states.items():
        expected = getattr(reference, net).state_dict()
        expected = {k: _real_buffer(net, k, v, config) for k, v in expected.items()}
        for key, tensor in _match_network(net, state, expected, str(paths[net])).items():
            full_state[f"{net}.{key}"] = tensor
    return Bilayer.from_state_dict(config, full_state, source=str(ckpt_dir))


def _real_buffer(net: str, key: str, value: Tensor, config: BilayerConfig) -> Tensor:
    """Meta placeholders keep shapes only; the recomputed buffers need real values to compare."""
    if net == "inference_generator" and key == "identity_grid":
        from .models.warp import identity_grid

        return identity_grid(config.image_size)
    if net == "keypoints_embedder" and key == "frequencies":
        from .models.keypoints_embedder import harmonic_frequencies

        return harmonic_frequencies(config.num_harmonics)
    return value


def convert_official_to_file(ckpt_dir, epoch: int, output, enhancer_dir=None, enhancer_epoch: int | None = None,
                             include_discriminator: bool = True, config: BilayerConfig | None = None) -> Bilayer:
    """``pybilayer convert-official``: convert (see ``convert_official``) and write one safetensors
    model file atomically; returns the converted model."""
    output = os.fspath(output)
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise ValueError(f"output directory does not exist: {parent}")
    model = convert_official(ckpt_dir, epoch, enhancer_dir=enhancer_dir, enhancer_epoch=enhancer_epoch,
                             include_discriminator=include_discriminator, config=config)
    model.save(output)
    return model


__all__ = [
    "OPTIONAL_NETWORKS",
    "REQUIRED_NETWORKS",
    "checkpoint_path",
    "convert_official",
    "convert_official_to_file",
    "read_official_state",
    "remove_official_spectral_norm",
]
