"""Typed per-identity parameters predicted by the projectors.

The official code assigned these tensors into the generator modules (``m.weight = ...``); here they
are plain values the generators take as an argument, so a module never holds identity state and
many identities can share one network. Every tensor has the identity batch as its first dimension.

``InferenceParams.flatten()`` gives stable names (``blocks.3.skip.weight``) used as ONNX graph inputs
and as tensor names in saved avatars; ``InferenceParams.unflatten`` is its exact inverse.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass
class AdaBNParams:
    """Per-channel affine of an adaptive BatchNorm: ``y = BN(x) * scale + bias``.

    ``scale`` already includes the official ``+ 1.0`` (it is the factor actually applied)."""

    scale: Tensor  # (B, C)
    bias: Tensor  # (B, C)


@dataclass
class AdaConvParams:
    """A per-identity 1x1 convolution: ``y[b, o] = sum_i weight[b, o, i] * x[b, i] + bias[b, o]``."""

    weight: Tensor  # (B, C_out, C_in)
    bias: Tensor  # (B, C_out)


@dataclass
class AdaSpadeParams:
    """AdaSPADE-BN: ``y = BN(x) * (scale_conv(P) + 1) + bias_conv(P)`` with the layer's learned ``P``."""

    scale_conv: AdaConvParams
    bias_conv: AdaConvParams


@dataclass
class InferenceBlockParams:
    norm1: Optional[AdaBNParams]  # None for block 0, whose first norm is a plain BatchNorm
    norm2: AdaBNParams
    skip: AdaConvParams


@dataclass
class TextureBlockParams:
    norm1: Optional[AdaSpadeParams]  # None for block 0
    norm2: AdaSpadeParams
    skip: AdaConvParams


def _map(obj, fn: Callable[[Tensor], Tensor]):
    """Apply ``fn`` to every tensor of a (nested) parameter dataclass, keeping the structure."""
    if obj is None:
        return None
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return tuple(_map(item, fn) for item in obj)
    return type(obj)(**{f.name: _map(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)})


def _flatten(obj, prefix: str, out: dict[str, Tensor]) -> None:
    if obj is None:
        return
    if isinstance(obj, Tensor):
        out[prefix] = obj
    elif isinstance(obj, (tuple, list)):
        for index, item in enumerate(obj):
            _flatten(item, f"{prefix}.{index}", out)
    else:
        for f in dataclasses.fields(obj):
            _flatten(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name, out)


def _first_tensor(obj) -> Tensor:
    """The first tensor in field order, without building ``flatten()`` (called once per frame)."""
    while not isinstance(obj, Tensor):
        if isinstance(obj, (tuple, list)):
            obj = obj[0]
        else:
            obj = next(v for v in (getattr(obj, f.name) for f in dataclasses.fields(obj)) if v is not None)
    return obj


class _ParamsMixin:
    """Tensor plumbing shared by the per-identity parameter sets."""

    def map(self, fn: Callable[[Tensor], Tensor]):
        return _map(self, fn)

    def flatten(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        _flatten(self, "", out)
        return out

    @property
    def batch_size(self) -> int:
        return _first_tensor(self).shape[0]

    def to(self, *args, **kwargs):
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self):
        return self.map(lambda t: t.detach())

    def select(self, index):
        """Identities ``index`` (an int keeps a batch of one, a slice or index tensor picks several)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self.map(lambda t: t[index])

    def repeat_frames(self, frames: int):
        """Each identity repeated ``frames`` times consecutively: batch B -> B * frames (official order)."""
        if frames == 1:
            return self
        return self.map(lambda t: t.repeat_interleave(frames, dim=0))

    @classmethod
    def cat(cls, items):
        items = list(items)
        if not items:
            raise ValueError(f"{cls.__name__}.cat: nothing to concatenate")
        flats = [item.flatten() for item in items]
        return cls.unflatten({name: torch.cat([f[name] for f in flats]) for name in flats[0]})


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _split_blocks(flat: dict[str, Tensor], owner: str) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    blocks: dict[int, dict[str, Tensor]] = {}
    rest: dict[str, Tensor] = {}
    for name, tensor in flat.items():
        match = _BLOCK_KEY.match(name)
        if match:
            blocks.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        else:
            rest[name] = tensor
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ValueError(f"{owner}.unflatten: block indices must be 0..n-1, got {sorted(blocks)}")
    return [blocks[j] for j in range(len(blocks))], rest


def _take(flat: dict[str, Tensor], names: list[str], owner: str, where: str) -> list[Tensor]:
    missing = [n for n in names if n not in flat]
    unknown = sorted(set(flat) - set(names))
    if missing or unknown:
        raise ValueError(f"{owner}.unflatten: {where}: missing {missing}, unknown {unknown}")
    return [flat[n] for n in names]


def _bn(flat, prefix, owner, where):
    scale, bias = _take(
        {k: v for k, v in flat.items() if k.startswith(prefix)}, [prefix + "scale", prefix + "bias"], owner, where
    )
    return AdaBNParams(scale, bias)


def _conv(flat, prefix, owner, where):
    weight, bias = _take(
        {k: v for k, v in flat.items() if k.startswith(prefix)}, [prefix + "weight", prefix + "bias"], owner, where
    )
    return AdaConvParams(weight, bias)


def _spade(flat, prefix, owner, where):
    return AdaSpadeParams(
        _conv(flat, prefix + "scale_conv.", owner, where), _conv(flat, prefix + "bias_conv.", owner, where)
    )


def _check_exact(flat: dict[str, Tensor], allowed_prefixes: list[str], owner: str, where: str) -> None:
    unknown = sorted(n for n in flat if not any(n.startswith(p) for p in allowed_prefixes))
    if unknown:
        raise ValueError(f"{owner}.unflatten: {where}: unknown {unknown}")


def _unflatten_generator(cls, block_cls, read_norm, flat: dict[str, Tensor]):
    """Blocks of (norm1 (none in block 0, whose first norm is not adaptive), norm2, skip) plus a final norm."""
    owner = cls.__name__
    block_dicts, rest = _split_blocks(flat, owner)
    blocks = []
    for j, d in enumerate(block_dicts):
        where = f"block {j}"
        _check_exact(d, (["norm1."] if j else []) + ["norm2.", "skip."], owner, where)
        blocks.append(
            block_cls(
                norm1=read_norm(d, "norm1.", owner, where) if j else None,
                norm2=read_norm(d, "norm2.", owner, where),
                skip=_conv(d, "skip.", owner, where),
            )
        )
    _check_exact(rest, ["final_norm."], owner, "top level")
    return cls(tuple(blocks), read_norm(rest, "final_norm.", owner, "final_norm"))


@dataclass
class InferenceParams(_ParamsMixin):
    """Everything the per-frame inference generator needs from one identity (AdaBN + 1x1 skips)."""

    blocks: tuple[InferenceBlockParams, ...]
    final_norm: AdaBNParams

    @classmethod
    def unflatten(cls, flat: dict[str, Tensor]) -> "InferenceParams":
        return _unflatten_generator(cls, InferenceBlockParams, _bn, flat)


@dataclass
class TextureParams(_ParamsMixin):
    """Per-identity AdaSPADE and skip parameters of the texture generator (used once per avatar)."""

    blocks: tuple[TextureBlockParams, ...]
    final_norm: AdaSpadeParams

    @classmethod
    def unflatten(cls, flat: dict[str, Tensor]) -> "TextureParams":
        return _unflatten_generator(cls, TextureBlockParams, _spade, flat)


__all__ = [
    "AdaBNParams",
    "AdaConvParams",
    "AdaSpadeParams",
    "InferenceBlockParams",
    "InferenceParams",
    "TextureBlockParams",
    "TextureParams",
]
