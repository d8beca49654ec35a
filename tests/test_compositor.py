"""The native compositor (CPU twin, and CUDA twin where a GPU exists) against the PyTorch reference.

Every comparison uses fresh random inputs, with coordinates that leave the texture, and outputs
poisoned before the call (NaN / 0xAB), so a pixel the kernel forgets to write cannot pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tolerances import TOLERANCES, UINT8_MAX_LSB

from pybilayer import native, ops
from pybilayer.errors import BackendUnavailableError

pytestmark = pytest.mark.skipif(not native.capabilities().native, reason=str(native.capabilities().native_reason))

POISON_FLOAT = float("nan")
POISON_BYTES = (0xAB, 0x54)


def make_inputs(
    batch=2,
    size=(31, 45),
    texture_size=None,
    channels=3,
    shared_texture=False,
    dtype=torch.float32,
    mask=None,
    background=None,
    generator=None,
):
    """Random compositor inputs. delta_uv moves most points a little, some far outside [-1, 1]."""
    g = generator if generator is not None else torch.Generator().manual_seed(torch.randint(1 << 30, ()).item())
    height, width = size
    th, tw = texture_size or size
    texture_shape = (channels, th, tw) if shared_texture else (batch, channels, th, tw)
    texture = torch.rand(texture_shape, generator=g) * 2 - 1
    delta_uv = torch.randn(batch, 2, height, width, generator=g) * 0.3
    far = torch.rand(batch, 2, height, width, generator=g) < 0.05
    delta_uv[far] = (torch.rand(int(far.sum()), generator=g) * 2 - 1) * 40  # far outside the texture
    lf = torch.randn(batch, channels, height, width, generator=g) * 0.3
    args = dict(texture=texture.to(dtype), delta_uv=delta_uv.to(dtype), lf=lf.to(dtype))
    if mask == "probability":
        args["mask"] = torch.rand(batch, 1, height, width, generator=g).to(dtype)
    elif mask == "logits":
        args["mask"] = (torch.randn(batch, 1, height, width, generator=g) * 3).to(dtype)
        args["mask_is_logits"] = True
    if background == "color":
        args["background"] = [float(v) for v in torch.rand(channels, generator=g) * 2 - 1]
    elif background == "image":
        args["background"] = (torch.rand(batch, channels, height, width, generator=g) * 2 - 1).to(dtype)
    return args


def poisoned_like(reference, poison):
    out = torch.empty_like(reference)
    if out.dtype == torch.uint8:
        out.fill_(poison)
    else:
        out.fill_(POISON_FLOAT)
    return out


def assert_matches(actual, expected, dtype=torch.float32):
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if expected.dtype == torch.uint8:
        lsb = (actual.int() - expected.int()).abs().max().item()
        assert lsb <= UINT8_MAX_LSB, f"uint8 frames differ by {lsb} LSB"
    else:
        assert not torch.isnan(actual).any(), "unwritten (NaN-poisoned) values left in the output"
        rtol, atol = TOLERANCES["composite_fp16" if dtype == torch.float16 else "composite_fp32"]
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def run_poisoned(args, out, device="cpu", **kwargs):
    """Run the native compositor twice into buffers poisoned differently; every value must be written."""
    expected = ops.composite_reference(**args, out=out)
    results = []
    for poison in POISON_BYTES if out == "uint8" else POISON_BYTES[:1]:
        buffer = poisoned_like(expected, poison).to(device)
        returned = ops.composite(**args, out=out, out_buffer=buffer, **kwargs)
        assert returned is buffer
        results.append(buffer.cpu())
    if out == "uint8":
        assert torch.equal(results[0], results[1]), "some bytes were not written (they kept the poison)"
    return results[0], expected


# ----------------------------------------------------------------------------------- CPU twin vs reference

CASES = {
    "odd_255x257": dict(batch=1, size=(255, 257)),
    "texture_smaller_shared": dict(batch=2, size=(40, 64), texture_size=(23, 37), shared_texture=True),
    "texture_larger_per_item": dict(batch=3, size=(33, 21), texture_size=(128, 100)),
    "one_channel": dict(batch=2, size=(17, 19), channels=1),
    "four_channels": dict(batch=1, size=(16, 24), channels=4),
}


@pytest.mark.parametrize("out", ["uint8", "float32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "mask,background",
    [(None, None), ("probability", None), ("logits", "color"), ("probability", "image"), ("logits", "image")],
)
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_matches_reference(case, mask, background, dtype, out):
    if out == "uint8" and CASES[case].get("channels", 3) != 3 and background is not None:
        pytest.skip("covered by the float output")
    args = make_inputs(**CASES[case], dtype=dtype, mask=mask, background=background)
    actual, expected = run_poisoned(args, out, num_threads=2)
    assert_matches(actual, expected, dtype)


@pytest.mark.parametrize("texture_size", [(1, 1), (1, 6), (5, 1), (2, 2)])
def test_tiny_textures(texture_size):
    args = make_inputs(batch=2, size=(9, 11), texture_size=texture_size, mask="logits", background="color")
    for out in ("uint8", "float32"):
        actual, expected = run_poisoned(args, out)
        assert_matches(actual, expected)


def test_cpu_output_stays_inside_its_buffer():
    """Guard bands around the output: the kernel writes every pixel and nothing else."""
    args = make_inputs(batch=2, size=(37, 29), mask="logits", background="image")
    expected = ops.composite_reference(**args)
    for out, guard in (("uint8", 0xAB), ("float32", 12345.0)):
        expected = ops.composite_reference(**args, out=out)
        n, pad = expected.numel(), 4096
        storage = torch.full((n + 2 * pad,), guard, dtype=expected.dtype)
        view = storage[pad : pad + n].view(expected.shape)
        if out == "float32":
            view.fill_(POISON_FLOAT)
        ops.composite(**args, out=out, out_buffer=view)
        assert (storage[:pad] == guard).all() and (storage[pad + n :] == guard).all(), "write outside out_buffer"
        assert_matches(view, expected)


def test_batch_equals_singles():
    args = make_inputs(batch=4, size=(29, 35), texture_size=(40, 33), mask="logits", background="image")
    batched = ops.composite(**args, out="float32")
    for b in range(4):
        single = {k: (v[b : b + 1] if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        assert torch.equal(ops.composite(**single, out="float32"), batched[b : b + 1])


def test_shared_texture_equals_per_item_copies():
    args = make_inputs(batch=3, size=(21, 26), shared_texture=True, mask="probability")
    per_item = dict(args, texture=args["texture"].expand(3, -1, -1, -1).contiguous())
    assert torch.equal(ops.composite(**args), ops.composite(**per_item))


def test_thread_counts_agree():
    args = make_inputs(batch=3, size=(64, 80), mask="logits", background="color")
    results = [ops.composite(**args, num_threads=n) for n in (1, 2, 3, None)]
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_large_frame_uses_threads_and_matches():
    args = make_inputs(batch=1, size=(300, 301), mask="probability", background="image")
    actual, expected = run_poisoned(args, "float32", num_threads=4)
    assert_matches(actual, expected)


def test_logits_equal_sigmoid_probability():
    args = make_inputs(batch=2, size=(30, 40), mask="logits", background="image")
    as_probability = dict(args, mask=torch.sigmoid(args["mask"]), mask_is_logits=False)
    torch.testing.assert_close(
        ops.composite(**args, out="float32"), ops.composite(**as_probability, out="float32"), rtol=1e-6, atol=1e-6
    )


def test_default_background_is_black():
    args = make_inputs(batch=1, size=(20, 20), mask="probability")
    black = dict(args, background=[-1.0, -1.0, -1.0])
    assert torch.equal(ops.composite(**args), ops.composite(**black))
    assert_matches(ops.composite(**args), ops.composite_reference(**black))


def test_identity_warp_and_one_texel_shifts():
    """The convention itself: pixel centres, channel 0 of delta_uv moves x, channel 1 moves y, zeros outside."""
    height, width = 25, 31
    texture = torch.rand(1, 3, height, width) * 2 - 1
    lf = torch.zeros(1, 3, height, width)
    delta_uv = torch.zeros(1, 2, height, width)
    close = dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(ops.composite(texture, delta_uv, lf, out="float32"), texture, **close)
    delta_uv[:, 0] = 2 / width  # one texel to the right: pixel x shows texel x + 1
    shifted = ops.composite(texture, delta_uv, lf, out="float32")
    torch.testing.assert_close(shifted[..., :-1], texture[..., 1:], **close)
    torch.testing.assert_close(shifted[..., -1], torch.zeros(1, 3, height), **close)
    delta_uv[:, 0], delta_uv[:, 1] = 0, -2 / height  # one texel up: pixel y shows texel y - 1
    shifted = ops.composite(texture, delta_uv, lf, out="float32")
    torch.testing.assert_close(shifted[..., 1:, :], texture[..., :-1, :], **close)
    torch.testing.assert_close(shifted[..., 0, :], torch.zeros(1, 3, width), **close)


def test_numpy_in_numpy_out_and_torch_in_torch_out():
    args = make_inputs(batch=2, size=(19, 23), mask="logits", background="image")
    as_numpy = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    from_numpy = ops.composite(**as_numpy)
    from_torch = ops.composite(**args)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.shape == (2, 19, 23, 3) and from_numpy.dtype == np.uint8
    assert isinstance(from_torch, torch.Tensor) and from_torch.device.type == "cpu"
    np.testing.assert_array_equal(from_numpy, from_torch.numpy())
    float_out = ops.composite(**as_numpy, out="float32")
    assert isinstance(float_out, np.ndarray) and float_out.shape == (2, 3, 19, 23) and float_out.dtype == np.float32
    assert isinstance(ops.composite_reference(**as_numpy), np.ndarray)


def test_colour_as_array_and_array_interface_objects():
    args = make_inputs(batch=1, size=(12, 14), mask="probability", background="color")
    color = args["background"]

    class HostArray:  # exposes only __array_interface__, like a foreign host buffer
        def __init__(self, array):
            self.array = array

        @property
        def __array_interface__(self):
            return self.array.__array_interface__

    expected = ops.composite(**args)
    for background in (np.array(color, np.float32), torch.tensor(color), tuple(color)):
        assert torch.equal(ops.composite(**dict(args, background=background)), expected)
    wrapped = {k: HostArray(v.numpy()) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    np.testing.assert_array_equal(ops.composite(**wrapped), expected.numpy())


def test_dlpack_producers_are_accepted():
    args = make_inputs(batch=1, size=(10, 11))

    class DLPackOnly:
        def __init__(self, tensor):
            self.tensor = tensor

        def __dlpack__(self, **kwargs):
            return self.tensor.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.tensor.__dlpack_device__()

    wrapped = {k: DLPackOnly(v) for k, v in args.items()}
    assert torch.equal(ops.composite(**wrapped), ops.composite(**args))


def test_empty_batch():
    args = make_inputs(batch=0, size=(8, 9))
    assert ops.composite(**args).shape == (0, 8, 9, 3)


def test_requires_grad_inputs_are_read_without_copy():
    args = make_inputs(batch=1, size=(9, 9))
    args["lf"].requires_grad_(True)
    assert ops.composite(**args).shape == (1, 9, 9, 3)


# ----------------------------------------------------------------------------------- bad arguments


def _bad(name, **changes):
    return pytest.param(changes, name, id=f"{name}-{'-'.join(changes)}")


BAD_ARGUMENTS = [
    _bad("texture", texture=torch.rand(2, 4, 31, 45)),
    _bad("texture", texture=torch.rand(3, 3, 31, 45)),
    _bad("texture", texture=torch.rand(31, 45)),
    _bad("texture", texture=torch.rand(2, 3, 31, 45, dtype=torch.float64)),
    _bad("texture", texture=[[0.0]]),
    _bad("delta_uv", delta_uv=torch.rand(2, 2, 30, 45)),
    _bad("delta_uv", delta_uv=torch.rand(2, 45, 31, 2).permute(0, 3, 2, 1)),  # right shape, not contiguous
    _bad("lf", lf=torch.rand(3, 31, 45)),
    _bad("lf", lf=torch.zeros(2, 3, 31, 45, dtype=torch.uint8)),
    _bad("lf", lf=torch.rand(2, 5, 31, 45)),
    _bad("mask", mask=torch.rand(2, 3, 31, 45)),
    _bad("mask", mask=torch.rand(2, 1, 31, 45, dtype=torch.float64)),
    _bad("background", mask=torch.rand(2, 1, 31, 45), background=torch.rand(2, 3, 31, 44)),
    _bad("background", mask=torch.rand(2, 1, 31, 45), background=[0.0, 0.0]),
    _bad("background", background=[0.0, 0.0, 0.0]),  # a background without a mask
    _bad("out", out="rgb"),
    _bad("out_buffer", out_buffer=torch.empty(2, 31, 45, 4, dtype=torch.uint8)),
    _bad("out_buffer", out_buffer=torch.empty(2, 31, 45, 3, dtype=torch.float32)),
    _bad("out_buffer", out_buffer=torch.empty(2, 45, 31, 3, dtype=torch.uint8).transpose(1, 2)),
]


@pytest.mark.parametrize("changes,name", BAD_ARGUMENTS)
def test_bad_arguments_name_the_argument(changes, name):
    args = make_inputs(batch=2, size=(31, 45))
    args.update(changes)
    with pytest.raises(ValueError, match=name):
        ops.composite(**args)


def test_read_only_output_is_rejected():
    args = make_inputs(batch=1, size=(5, 6))
    frozen = np.zeros((1, 5, 6, 3), np.uint8)
    frozen.flags.writeable = False
    numpy_args = {k: v.numpy() for k, v in args.items()}
    with pytest.raises(ValueError, match="out_buffer.*read-only"):
        ops.composite(**numpy_args, out_buffer=frozen)


def test_cuda_arrays_without_cuda_raise_backend_unavailable():
    if native.capabilities().cuda:
        pytest.skip("a usable GPU is present")

    class FakeCudaArray:  # claims device memory that does not exist; must never be dereferenced
        def __init__(self, shape):
            self.__cuda_array_interface__ = {
                "shape": shape,
                "typestr": "<f4",
                "data": (0xDEAD0000, False),
                "strides": None,
                "version": 3,
            }

    fake = dict(texture=FakeCudaArray((3, 8, 8)), delta_uv=FakeCudaArray((1, 2, 8, 8)), lf=FakeCudaArray((1, 3, 8, 8)))
    out = FakeCudaArray((1, 3, 8, 8))
    with pytest.raises(BackendUnavailableError, match=str(native.capabilities().cuda_reason)[:20]):
        ops.composite(**fake, out="float32", out_buffer=out)


# ----------------------------------------------------------------------------------- CUDA twin


@pytest.mark.needs_cuda
@pytest.mark.parametrize("out", ["uint8", "float32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mask,background", [(None, None), ("logits", "color"), ("probability", "image")])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_matches_cpu_twin_and_reference(case, mask, background, dtype, out):
    args = make_inputs(**CASES[case], dtype=dtype, mask=mask, background=background)
    cpu = ops.composite(**args, out=out)
    cuda_args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    actual, expected = run_poisoned(cuda_args, out, device="cuda")
    assert_matches(actual, cpu, dtype)  # the twins share their sampling code
    assert_matches(actual, expected.cpu(), dtype)  # torch's CUDA grid_sample


@pytest.mark.needs_cuda
def test_cuda_runs_on_the_callers_stream():
    args = {
        k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(batch=8, size=(256, 256)).items()
    }
    expected = ops.composite(**args)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        result = ops.composite(**args)  # launched on `side`: torch's current stream
    side.synchronize()
    assert torch.equal(result, expected)
    stream = native.Stream()
    out = torch.full_like(expected, 0xAB)
    torch.cuda.synchronize()
    ops.composite(**args, out_buffer=out, stream=stream.handle)
    stream.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.needs_cuda
def test_cuda_device_buffers_round_trip():
    args = make_inputs(batch=2, size=(40, 50), mask="logits", background="color")
    expected = ops.composite(**args).numpy()
    buffers = {}
    for name in ("texture", "delta_uv", "lf", "mask"):
        host = args[name].numpy()
        buffers[name] = native.DeviceBuffer(host.shape, "float32")
        buffers[name].copy_from_host(host)
    out = native.DeviceBuffer(expected.shape, "uint8")
    ops.composite(**dict(args, **buffers), out_buffer=out, stream=0)  # raw CUDA arrays: the default stream
    torch.cuda.synchronize()
    result = np.full(expected.shape, 0xAB, np.uint8)
    out.copy_to_host(result)
    np.testing.assert_array_equal(result, expected)


@pytest.mark.needs_cuda
def test_cuda_mixed_devices_name_the_argument():
    args = make_inputs(batch=1, size=(8, 8))
    mixed = dict(args, lf=args["lf"].cuda(), delta_uv=args["delta_uv"].cuda())  # texture stays on the CPU
    with pytest.raises(ValueError, match="texture"):
        ops.composite(**mixed)
