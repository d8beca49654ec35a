"""The native kernels' entry points, each beside its PyTorch reference (the oracle the tests compare with).

``composite`` (``composite_reference``): ``out = lf + bilinear(texture, identity_grid + delta_uv)``,
masked, as a frame; the native CPU twin, or the CUDA twin for GPU arrays, in one fused pass.

``heads`` (``heads_reference``): the per-frame network's last steps on the CPU, from the last block's
up-sampling convolution (its input, ``UpsampleConv``, or its low-resolution tap groups) to delta-uv, the
low-frequency image and the mask logits (the convention is in ``heads``). ``upsample_conv``
(``upsample_conv_reference``) and ``depth_to_space_box`` (``depth_to_space_box_reference``): the same to
the block's output alone, at a block boundary.

Compositor convention:
    - Per item b and output pixel (y, x) of an H x W frame, the sampling point is
      ``identity_grid + delta_uv[b]`` with the identity grid at pixel centres,
      ``((x + 0.5) / W * 2 - 1, (y + 0.5) / H * 2 - 1)``; ``delta_uv`` channel 0 is x, channel 1 is y.
    - Bilinear sampling, zeros padding, ``align_corners=False``, in the texture's own size
      (``F.grid_sample`` semantics), so the texture size may differ from the output size.
    - ``v = lf + sample`` is not clamped. With a mask, ``v = v * m + bg * (1 - m)``, where
      ``m = sigmoid(mask)`` if ``mask_is_logits``, and bg is ``background`` or -1 (black) when absent.
    - ``out="uint8"``: ``round(clamp((v + 1) * 127.5, 0, 255))``, ties to even, as (B, H, W, C).
      ``out="float32"``: ``v`` as (B, C, H, W).
    - Coordinates and weights are fp32; fp16 inputs are widened exactly.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import native

__all__ = ["LowResStage", "UpsampleConv", "composite", "composite_reference", "depth_to_space_box",
           "depth_to_space_box_reference", "heads", "heads_reference", "identity_grid", "low_res_stage_reference",
           "upsample_conv", "upsample_conv_reference"]

_OUT_KINDS = {"uint8": np.uint8, "float32": np.float32}
_TYPESTR_NAMES = {"<f4": "float32", "<f2": "float16", "|u1": "uint8"}


def composite(
    texture: Any,
    delta_uv: Any,
    lf: Any,
    mask: Any = None,
    background: Any = None,
    mask_is_logits: bool = False,
    out: str = "uint8",
    *,
    out_buffer: Any = None,
    num_threads: int | None = None,
    stream: int | None = None,
) -> Any:
    """Composite a batch of frames in one fused pass (see the module docstring for the convention).

    Args:
        texture: (C, Ht, Wt) shared by every item, or (B, C, Ht, Wt) one per item; fp32 or fp16.
        delta_uv: (B, 2, H, W) offsets of the sampling grid, in normalised [-1, 1] units.
        lf: (B, C, H, W) low-frequency layer, 1 <= C <= 4; its type and device decide the output's.
        mask: (B, 1, H, W) foreground probability, or logits when ``mask_is_logits``; None: no compositing.
        background: with a mask, a colour (C floats in [-1, 1]) or a (B, C, H, W) image; None: -1.
        mask_is_logits: apply a sigmoid to ``mask`` inside the kernel.
        out: "uint8" for (B, H, W, C) frames or "float32" for (B, C, H, W) values.
        out_buffer: optional preallocated, C-contiguous output of that shape and dtype, written in full
            and returned (lets a per-frame loop avoid allocations).
        num_threads: CPU threads; None uses all cores (fewer for small frames).
        stream: CUDA stream handle (int) to launch on; None: torch's current stream for torch tensors,
            the legacy default stream (0) for other CUDA arrays. The launch is asynchronous.

    Arrays may be numpy arrays, torch tensors (CPU or CUDA), objects exposing
    ``__array_interface__`` / ``__cuda_array_interface__`` (e.g. ``native.DeviceBuffer``, CuPy) or
    DLPack producers; none is copied. All must be C-contiguous and on one device.
    numpy in -> numpy out; torch in -> torch out on lf's device; other CUDA arrays -> a torch CUDA tensor,
    or give ``out_buffer``. Inference only: no gradients flow through the native kernels.

    Raises:
        ValueError: a wrong shape, dtype, device or layout, naming the argument.
        BackendUnavailableError: CUDA arrays where the CUDA twin or a GPU is unavailable.
    """
    if out not in _OUT_KINDS:
        raise ValueError(f"out: expected 'uint8' or 'float32', got {out!r}")
    texture, delta_uv, lf, mask = (_as_array(a) for a in (texture, delta_uv, lf, mask))
    background_image, background_color = _split_background(background)

    caps = native.capabilities()
    on_cuda = _is_cuda(lf)
    if isinstance(lf, (np.ndarray, torch.Tensor)) and not (caps.cuda if on_cuda else caps.native):
        # Still correct, only slower: the extension (or its CUDA twin) is missing, torch is not.
        _warn_fallback(caps.cuda_reason if on_cuda else caps.native_reason)
        result = composite_reference(texture, delta_uv, lf, mask, background, mask_is_logits, out)
        if out_buffer is None:
            return result
        if isinstance(out_buffer, np.ndarray):
            np.copyto(out_buffer, result)
        else:
            out_buffer.copy_(torch.as_tensor(result))
        return out_buffer
    module = native.load()

    if out_buffer is None:
        out_buffer = _allocate_output(lf, out)
    elif _dtype_name(out_buffer) != out:
        raise ValueError(f"out_buffer: expected dtype {out} for out={out!r}, got {_dtype_name(out_buffer)}")
    if on_cuda and stream is None:
        stream = torch.cuda.current_stream(lf.device).cuda_stream if isinstance(lf, torch.Tensor) else 0

    module.composite(
        _interface(texture),
        _interface(delta_uv),
        _interface(lf),
        _interface(out_buffer),
        mask=_interface(mask),
        background=_interface(background_image),
        background_color=background_color,
        mask_is_logits=bool(mask_is_logits),
        num_threads=0 if num_threads is None else int(num_threads),
        stream=0 if stream is None else int(stream),
    )
    return out_buffer


def composite_reference(
    texture: Any,
    delta_uv: Any,
    lf: Any,
    mask: Any = None,
    background: Any = None,
    mask_is_logits: bool = False,
    out: str = "uint8",
) -> Any:
    """The compositor in plain PyTorch (F.grid_sample), in fp32. Same arguments and result types as
    ``composite`` (numpy in -> numpy out), without its fused pass or zero-copy guarantees."""
    if out not in _OUT_KINDS:
        raise ValueError(f"out: expected 'uint8' or 'float32', got {out!r}")
    numpy_in = isinstance(lf, np.ndarray)
    texture, delta_uv, lf, mask = (_as_tensor(a) for a in (texture, delta_uv, lf, mask))
    batch, channels, height, width = lf.shape
    if texture.dim() == 3:
        texture = texture.unsqueeze(0).expand(batch, -1, -1, -1)
    grid = _cached_identity_grid(height, width, str(lf.device)) + delta_uv.float().permute(0, 2, 3, 1)
    sample = F.grid_sample(texture.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    value = sample + lf.float()
    if mask is not None:
        m = torch.sigmoid(mask.float()) if mask_is_logits else mask.float()
        background_image, background_color = _split_background(background)
        if background_image is not None:
            bg = _as_tensor(background_image).float()
        else:
            color = background_color if background_color is not None else [-1.0] * channels
            bg = torch.tensor(color, dtype=torch.float32, device=lf.device).view(1, channels, 1, 1)
        value = value * m + bg * (1 - m)
    if out == "uint8":
        value = ((value + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return value.cpu().numpy() if numpy_in else value


class UpsampleConv(NamedTuple):
    """A nearest 2x up-sampling + 3x3 convolution (padding 1) plus an up-sampled skip, given by its input:
    ``conv3x3(up2(input), weight) + bias + up2(skip)``. The native kernels compute it at the low
    resolution as four tap groups (9 multiply-adds per low-resolution pixel and channel pair, against 36),
    a row at a time, so the groups never reach memory. ``channels_last``: input (B, s, s, Cin) and skip
    (B, s, s, C), as ``LowResStage`` writes them (the same results)."""

    input: np.ndarray  # (B, Cin, s, s)
    weight: np.ndarray  # (C, Cin, 3, 3)
    bias: np.ndarray  # (C,)
    skip: np.ndarray | None = None  # (B, C, s, s)
    channels_last: bool = False

    def arrays(self, convert: Callable[[Any], Any]) -> "UpsampleConv":
        """The same with ``convert`` applied to each array."""
        return self._replace(input=convert(self.input), weight=convert(self.weight), bias=convert(self.bias),
                             skip=None if self.skip is None else convert(self.skip))

    def channels_first(self) -> "UpsampleConv":
        """The same in (B, C, s, s) layout (torch tensors)."""
        if not self.channels_last:
            return self
        return UpsampleConv(self.input.permute(0, 3, 1, 2), self.weight, self.bias,
                            None if self.skip is None else self.skip.permute(0, 3, 1, 2))


def heads(
    groups: np.ndarray | UpsampleConv,
    scale: np.ndarray,
    shift: np.ndarray,
    slope: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    num_threads: int | None = None,
    isa: str = "best",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-frame network's last steps in one native CPU pass: (delta_uv, lf, mask_logits).

    ``groups`` is the last block's up-sampling convolution: an ``UpsampleConv`` (its input), or
    ``phases`` (B, 4C, s+1, s+1), the convolution computed at the low resolution as four tap groups
    (``frame_graph.upsample_conv_taps``, DepthToSpace DCR order, bias and skip included) that
    depth-to-space and a 2x2 box sum finish at 2s x 2s. Then per channel
    ``t = prelu(x * scale + shift, slope)`` (C each), the three heads as one 3x3 convolution
    (``weight`` (6, C, 3, 3), ``bias`` (6,), zero padding), and tanh on delta-uv (2) and lf (3).
    float32 numpy arrays in, three new float32 arrays (B, 2|3|1, 2s, 2s) out.

    ``num_threads``: None uses every core. ``isa``: the kernel's code path, "best" (this CPU's widest) or one
    of ``native.capabilities().cpu_isas``; "portable" convolves directly, the others match it within float
    rounding.
    Falls back to ``heads_reference`` (with a warning) where the native core is not built.
    """
    groups = _groups_arrays(groups)
    params = [np.ascontiguousarray(a, dtype=np.float32) for a in (scale, shift, slope, weight, bias)]
    caps = native.capabilities()
    if not caps.native:
        _warn_fallback(caps.native_reason)
        return tuple(t.numpy() for t in heads_reference(_as_torch_groups(groups), *map(torch.from_numpy, params)))
    batch, size = _output_batch_size(groups)
    outputs = tuple(np.empty((batch, c, size, size), np.float32) for c in (2, 3, 1))
    options = _cpu_kernel_options(num_threads, isa)
    if isinstance(groups, UpsampleConv):
        native.load().upsample_conv_heads(*groups[:4], *params, *outputs, channels_last=groups.channels_last, **options)
    else:
        native.load().heads(groups, *params, *outputs, **options)
    return outputs


def heads_reference(groups: torch.Tensor | UpsampleConv, scale: torch.Tensor, shift: torch.Tensor,
                    slope: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``heads`` in plain PyTorch, in the inputs' dtype: the block output (``upsample_conv_reference`` or
    ``depth_to_space_box_reference``), activation, one 3x3 convolution, tanh."""
    if isinstance(groups, UpsampleConv):
        x = upsample_conv_reference(*groups.channels_first()[:4])
    else:
        x = depth_to_space_box_reference(groups)
    x = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    t = torch.where(x < 0, x * slope.view(1, -1, 1, 1), x)
    h = F.conv2d(t, weight, bias, padding=1)
    return torch.tanh(h[:, :2]), torch.tanh(h[:, 2:5]), h[:, 5:]


def upsample_conv(input: np.ndarray, weight: np.ndarray, bias: np.ndarray, skip: np.ndarray | None = None, *,
                  num_threads: int | None = None, isa: str = "best") -> np.ndarray:
    """``conv3x3(up2(input), weight, padding 1) + bias + up2(skip)`` for nearest 2x up-sampling, a block's
    output, in one native CPU pass at the low resolution (see ``UpsampleConv``): (B, Cin, s, s) float32
    -> a new (B, C, 2s, 2s) float32 array.
    Falls back to ``upsample_conv_reference`` (with a warning) where the native core is not built."""
    groups = _groups_arrays(UpsampleConv(input, weight, bias, skip))
    caps = native.capabilities()
    if not caps.native:
        _warn_fallback(caps.native_reason)
        return upsample_conv_reference(*_as_torch_groups(groups)[:4]).numpy()
    batch, size = _output_batch_size(groups)
    out = np.empty((batch, groups.weight.shape[0], size, size), np.float32)
    native.load().upsample_conv(*groups[:4], out, **_cpu_kernel_options(num_threads, isa))
    return out


def upsample_conv_reference(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            skip: torch.Tensor | None = None) -> torch.Tensor:
    """``upsample_conv`` in plain PyTorch, in the inputs' dtype."""
    x = F.conv2d(F.interpolate(input, scale_factor=2, mode="nearest"), weight, bias, padding=1)
    return x if skip is None else x + F.interpolate(skip, scale_factor=2, mode="nearest")


def depth_to_space_box(phases: np.ndarray, *, num_threads: int | None = None, isa: str = "best") -> np.ndarray:
    """The end of an up-sampling convolution computed as four tap groups (``heads``' first two steps):
    (B, 4C, s+1, s+1) float32 -> a new (B, C, 2s, 2s) float32 array, in one native CPU pass.
    Falls back to ``depth_to_space_box_reference`` (with a warning) where the native core is not built."""
    phases = _groups_arrays(phases)
    caps = native.capabilities()
    if not caps.native:
        _warn_fallback(caps.native_reason)
        return depth_to_space_box_reference(torch.from_numpy(phases)).numpy()
    batch, groups_channels, side, _ = phases.shape
    out = np.empty((batch, groups_channels // 4, 2 * (side - 1), 2 * (side - 1)), np.float32)
    native.load().depth_to_space_box(phases, out, **_cpu_kernel_options(num_threads, isa))
    return out


def depth_to_space_box_reference(phases: torch.Tensor) -> torch.Tensor:
    """``depth_to_space_box`` in plain PyTorch, in the input's dtype: depth-to-space (DCR), 2x2 box sum."""
    batch, groups_channels, side, _ = phases.shape
    channels = groups_channels // 4
    # DCR order (group-major) to pixel_shuffle's CRD order (channel-major)
    crd = phases.reshape(batch, 4, channels, side, side).transpose(1, 2).reshape(batch, groups_channels, side, side)
    v = F.pixel_shuffle(crd, 2)[:, :, 1:, 1:]
    return F.conv2d(v, torch.ones(channels, 1, 2, 2, dtype=phases.dtype), groups=channels)


class LowResStage:
    """The per-frame network's keypoint MLP and up-sampling blocks, one avatar folded in, in one native CPU
    call: everything that runs below the frame's resolution (each up-sampling convolution is computed at its
    input's), up to the full-resolution ``heads``. ``csrc/lowres``: direct convolutions on channels-last
    maps, conv1 as Winograd (F(2x2, 3x3) below 16 px, F(4x4, 3x3) from there) on maps of at least
    ``winograd_min_size`` px (<= 0: never), the up-sampling convolutions' tap groups by pairs of outputs
    (Winograd F(2, 2)), a few passes per block: over whole maps, or, for the blocks on maps of at least
    ``sweep_min_size`` px (<= 0: none), depth first over bands of rows that stay in cache.

    ``mlp``: [(weight (out, in), bias (out,))], LeakyReLU(0.2) between layers; the last layer's outputs are
    the first block's input x, (C0, s0, s0) with s0 = ``input_size``. ``blocks``: per block a dict of
    ``scale``, ``shift``, ``slope`` (Cin,), ``conv1_weight`` (C, Cin, 3, 3), ``conv1_bias``,
    ``conv2_weight`` (C, C, 3, 3), ``conv2_bias``, ``skip_weight`` (C, Cin), ``skip_bias`` (C,), computing
    ``t = prelu(x * scale + shift, slope)``, ``h = lrelu(conv3x3(t, conv1) + conv1_bias, 0.2)`` and the next
    x ``= conv3x3(up2(h), conv2) + conv2_bias + up2(conv1x1(x, skip) + skip_bias)`` (``low_res_stage_reference``).
    With ``heads_inputs`` the last block stops before its up-sampling convolution (no conv2 needed there):
    the outputs are its ``h`` and ``conv1x1(x, skip) + skip_bias``, the inputs of ``UpsampleConv`` for
    ``heads``. The weights are copied once; calls are serialised. Needs the native core (no fallback:
    callers use the graph instead)."""

    def __init__(self, mlp: Sequence[tuple[np.ndarray, np.ndarray]], blocks: Sequence[dict[str, np.ndarray]],
                 input_size: int, winograd_min_size: int = 0, heads_inputs: bool = False, sweep_min_size: int = 0):
        caps = native.capabilities()
        if not caps.native:
            from .errors import BackendUnavailableError

            raise BackendUnavailableError(f"LowResStage needs the native core: {caps.native_reason}")
        as_floats = functools.partial(np.ascontiguousarray, dtype=np.float32)
        self._stage = native.load().LowResStage(
            [(as_floats(w), as_floats(b)) for w, b in mlp],
            [{k: as_floats(v) for k, v in block.items()} for block in blocks], int(input_size), int(winograd_min_size),
            bool(heads_inputs), int(sweep_min_size))

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(C, S, S) of one item's output; with ``heads_inputs`` (S, S, C) of each, channels-last."""
        c, size = self._stage.out_channels, self._stage.out_size
        return (size, size, c) if self._stage.heads_inputs else (c, size, size)

    def __call__(self, features: np.ndarray, *, num_threads: int | None = None,
                 isa: str = "best") -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """features (B, F) float32 (the MLP's input) -> a new (B, C, S, S) float32 array, the last block's output;
        with ``heads_inputs`` two (B, S, S, C), its ``h`` and skip channels-last (``UpsampleConv``'s
        ``channels_last``). ``num_threads``: None uses every core. ``isa``: the kernel's code path, "best" (this
        CPU's widest) or one of ``native.capabilities().cpu_isas``; all but "portable" give the same bits."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2:
            raise ValueError(f"features: expected (B, F), got shape {features.shape}")
        out = np.empty((features.shape[0], *self.output_shape), np.float32)
        skip = np.empty_like(out) if self._stage.heads_inputs else None
        self._stage.run(features, out, skip, **_cpu_kernel_options(num_threads, isa))
        return out if skip is None else (out, skip)


def low_res_stage_reference(features: torch.Tensor, mlp: Sequence[tuple[torch.Tensor, torch.Tensor]],
                            blocks: Sequence[dict[str, torch.Tensor]], input_size: int,
                            heads_inputs: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``LowResStage`` in plain PyTorch, in the inputs' dtype (the nearest up-sampling done explicitly)."""
    h = features
    for i, (weight, bias) in enumerate(mlp):
        h = F.linear(h, weight, bias)
        if i + 1 < len(mlp):
            h = F.leaky_relu(h, 0.2)
    x = h.reshape(len(h), -1, input_size, input_size)
    for b in blocks:
        v = x * b["scale"].view(1, -1, 1, 1) + b["shift"].view(1, -1, 1, 1)
        t = torch.where(v < 0, v * b["slope"].view(1, -1, 1, 1), v)
        h = F.leaky_relu(F.conv2d(t, b["conv1_weight"], b["conv1_bias"], padding=1), 0.2)
        skip = F.conv2d(x, b["skip_weight"][:, :, None, None], b["skip_bias"])
        if heads_inputs and b is blocks[-1]:
            return h, skip
        x = upsample_conv_reference(h, b["conv2_weight"], b["conv2_bias"], skip)
    return x


def identity_grid(height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(1, H, W, 2) pixel-centre grid in [-1, 1], x first. Computed in float64 and rounded once: the same
    bits as the native kernels' correctly rounded fp32 quotient (2i + 1 - size) / size."""
    xs = ((torch.arange(width, dtype=torch.float64) + 0.5) / width * 2 - 1).float()
    ys = ((torch.arange(height, dtype=torch.float64) + 0.5) / height * 2 - 1).float()
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
    return grid.unsqueeze(0).to(device)


@functools.lru_cache(maxsize=16)
def _cached_identity_grid(height: int, width: int, device: str) -> torch.Tensor:
    return identity_grid(height, width, device)  # never mutated: callers add to it


# --- argument plumbing -------------------------------------------------------------------------------


def _as_array(a: Any) -> Any:
    """numpy arrays, torch tensors and array-interface objects pass through; DLPack producers become
    torch tensors (zero-copy)."""
    if a is None or isinstance(a, (np.ndarray, torch.Tensor)):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        return a
    if hasattr(a, "__array_interface__"):
        return np.asarray(a)  # a view, so results come back as numpy
    if hasattr(a, "__dlpack__"):
        return torch.from_dlpack(a)
    return a  # the native layer names it in its error


def _groups_arrays(groups: Any) -> np.ndarray | UpsampleConv:
    """What the native kernels read as C-contiguous float32 arrays: a (B, 4C, s+1, s+1) ``phases`` array, or
    an ``UpsampleConv`` whose input is 4-D (the native layer checks the rest of the shapes)."""
    if isinstance(groups, UpsampleConv):
        as_floats = functools.partial(np.ascontiguousarray, dtype=np.float32)
        converted = groups.arrays(as_floats)
        if converted.input.ndim != 4:
            layout = "(B, s, s, Cin)" if groups.channels_last else "(B, Cin, s, s)"
            raise ValueError(f"input: expected {layout}, got shape {converted.input.shape}")
        return converted
    phases = np.ascontiguousarray(groups, dtype=np.float32)
    if phases.ndim != 4:
        raise ValueError(f"phases: expected (B, 4C, s+1, s+1), got shape {phases.shape}")
    return phases


def _cpu_kernel_options(num_threads: int | None, isa: str) -> dict[str, Any]:
    """The threading and code-path arguments of the native CPU kernels (0 threads: every core)."""
    return {"num_threads": 0 if num_threads is None else int(num_threads), "isa": str(isa)}


def _output_batch_size(groups: np.ndarray | UpsampleConv) -> tuple[int, int]:
    """(B, 2s) of the output for checked ``_groups_arrays``."""
    if isinstance(groups, UpsampleConv):
        return groups.input.shape[0], 2 * groups.input.shape[2]
    return groups.shape[0], 2 * (groups.shape[2] - 1)


def _as_torch_groups(groups: np.ndarray | UpsampleConv) -> torch.Tensor | UpsampleConv:
    if isinstance(groups, UpsampleConv):
        return groups.arrays(torch.from_numpy)
    return torch.from_numpy(groups)


def _as_tensor(a: Any) -> torch.Tensor | None:
    if a is None or isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return torch.as_tensor(a)


def _is_cuda(a: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return a.is_cuda
    return hasattr(a, "__cuda_array_interface__")


class _CudaTensorView:
    """A torch CUDA tensor's __cuda_array_interface__, built directly (torch's own property costs ~10 us)."""

    __slots__ = ("__cuda_array_interface__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor  # keeps the memory alive while the native call runs
        contiguous = tensor.is_contiguous()
        self.__cuda_array_interface__ = {
            "shape": tuple(tensor.shape),
            "typestr": _TORCH_TYPESTRS[tensor.dtype],
            "data": (tensor.data_ptr(), False),
            "strides": None if contiguous else tuple(s * tensor.element_size() for s in tensor.stride()),
            "version": 3,
        }


_TORCH_TYPESTRS = {torch.float32: "<f4", torch.float16: "<f2", torch.uint8: "|u1"}


def _interface(a: Any) -> Any:
    """What the native layer reads: an object exposing __array_interface__ / __cuda_array_interface__."""
    if isinstance(a, torch.Tensor):
        a = a.detach()
        if not a.is_cuda:
            return a.numpy()
        return _CudaTensorView(a) if a.dtype in _TORCH_TYPESTRS else a  # other dtypes: the native error names it
    return a


def _split_background(background: Any) -> tuple[Any, list[float] | None]:
    """(image, None) for a 4-D array, (None, colour) for a sequence or 1-D array, (None, None) for None."""
    if background is None:
        return None, None
    if isinstance(background, Sequence) and not isinstance(background, (str, bytes)):
        return None, [float(v) for v in background]
    background = _as_array(background)
    if getattr(background, "ndim", None) == 1:
        values = background.tolist() if isinstance(background, (np.ndarray, torch.Tensor)) else background
        return None, [float(v) for v in values]
    return background, None


def _dtype_name(a: Any) -> str:
    if isinstance(a, (np.ndarray, torch.Tensor)):
        return str(a.dtype).removeprefix("torch.")
    interface = getattr(a, "__cuda_array_interface__", None) or getattr(a, "__array_interface__", None)
    typestr = interface.get("typestr") if isinstance(interface, dict) else None
    return _TYPESTR_NAMES.get(typestr, str(typestr))


def _allocate_output(lf: Any, out: str) -> Any:
    shape = getattr(lf, "shape", None)
    if shape is None and hasattr(lf, "__cuda_array_interface__"):
        shape = tuple(lf.__cuda_array_interface__["shape"])
    if shape is None or len(shape) != 4:
        raise ValueError(f"lf: expected (B, C, H, W), got {'shape ' + str(tuple(shape)) if shape else type(lf)}")
    batch, channels, height, width = (int(s) for s in shape)
    frame_shape = (batch, height, width, channels) if out == "uint8" else (batch, channels, height, width)
    if isinstance(lf, torch.Tensor):
        return torch.empty(frame_shape, dtype=getattr(torch, out), device=lf.device)
    if hasattr(lf, "__cuda_array_interface__"):
        if not torch.cuda.is_available():
            raise ValueError("out_buffer: required for CUDA arrays that are not torch tensors when torch has no CUDA")
        return torch.empty(frame_shape, dtype=getattr(torch, out), device="cuda")
    return np.empty(frame_shape, dtype=_OUT_KINDS[out])


@functools.cache
def _warn_fallback(reason: str | None) -> None:
    warnings.warn(
        f"pybilayer.ops falls back to the PyTorch reference: {reason}", RuntimeWarning, stacklevel=3
    )
