"""Renderer: create avatars once, render frames fast.

    from pybilayer import Renderer
    r = Renderer("model.safetensors", backend="auto", device="auto")   # auto: tensorrt > cuda > onnxruntime
    avatar = r.create_avatar(photo_uint8_hwc)          # landmarks detected, or pass landmarks=(68, 2) pixels
    avatar.save("me.avatar"); avatar = r.load_avatar("me.avatar")
    frame = r.render(avatar, driver_landmarks_px)      # uint8 (H, W, 3); (N, 68, 2) -> (N, H, W, 3)
    frames = r.render([avatar_a, avatar_b], landmarks)  # frame i of avatar i (or one pose for every avatar)
    layers = r.render(avatar, landmarks, output="layers")  # float image, lf, hf, mask

The few-shot talking-head baseline is served the same way: ``Renderer("fsth.safetensors")`` (the file's
metadata says which model it holds) or ``Renderer(fsth_model)``; its avatars are
``backends.fsth.FewShotAvatar`` and it renders uint8 frames only (``backends/fsth.py``). What differs per
model sits behind one small adapter (``BilayerServing`` here, ``FSTHServing`` there).

Convention:
    - Driver landmarks are (68, 2) float pixel coordinates of the driver frame (iBUG 300-W order). Each
      frame is normalised to its own crop (``pybilayer.geometry.crop_box``, the official crop), so the
      avatar follows the driver's expression and head pose, not its position in the frame.
    - The backend runs the per-frame network; ``pybilayer.ops.composite`` (native CPU or CUDA twin)
      warps the avatar's texture, adds the low-frequency layer and converts to uint8. Without a
      ``background`` the frame is ``lf + hf`` as in the official inference; with one, the predicted
      mask composites it over that background.

Threads: a Renderer may be shared by several threads. Its calls are serialised by one lock (the
CUDA-graph and TensorRT backends own static buffers), so sharing adds no throughput; for parallel
rendering give each thread its own Renderer (they may share avatars).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from .avatar import Avatar, model_fingerprint
from .backends import FrameOutputs, PreparedAvatar, create_backend, select_backend
from .backends.avatar_fast import FastAvatarCreator
from .errors import CheckpointError

log = logging.getLogger("pybilayer.renderer")

NUM_LANDMARKS = 68
# Landmarks beyond this many pixels from the origin are not a face in any real frame.
MAX_ABS_COORDINATE = 1e6


class RenderLayers(NamedTuple):
    """Float layers of rendered frames, numpy float32 (N, C, H, W) (no N for a single frame).

    image is the final frame in [-1, 1]-ish units, not clamped (with a background: composited over it);
    lf the low-frequency layer, hf the warped texture, mask the foreground probability."""

    image: np.ndarray
    lf: np.ndarray
    hf: np.ndarray
    mask: np.ndarray


def _file_format(path) -> str | None:
    """The ``format`` entry of a safetensors file's metadata; None when the file cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("format")
    except Exception:  # noqa: BLE001 - the loader that follows reports what is wrong with the file
        return None


def _load_model(checkpoint, config):
    """A Bilayer or an FSTH model: from a file (its metadata says which), as given, or random from ``config``."""
    from .models import Bilayer, BilayerConfig
    from .models.fsth import FORMAT_NAME as FSTH_FORMAT
    from .models.fsth import FSTH, FSTHConfig

    if checkpoint is None:
        log.warning("Renderer: no checkpoint given, using a randomly initialised model (for tests and benchmarks)")
        if isinstance(config, FSTHConfig):
            return FSTH(config)
        return Bilayer(config if config is not None else BilayerConfig())
    if config is not None:
        raise ValueError("config is only used without a checkpoint (a checkpoint carries its own config)")
    if isinstance(checkpoint, (Bilayer, FSTH)):
        return checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        try:
            if _file_format(checkpoint) == FSTH_FORMAT:
                return FSTH.load(checkpoint)
            return Bilayer.load(checkpoint)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to read a model file is a checkpoint problem
            raise CheckpointError(f"cannot load model file {os.fspath(checkpoint)}: {type(exc).__name__}: {exc}") from exc
    raise TypeError(f"checkpoint must be None, a path, a Bilayer or an FSTH model, got {type(checkpoint).__name__}")


def check_landmarks(landmarks, name: str = "driver_landmarks_px") -> tuple[np.ndarray, bool]:
    """(N, 68, 2) float64 landmarks and whether a single (68, 2) set was given; ValueError naming the problem."""
    if hasattr(landmarks, "detach"):  # torch tensor
        landmarks = landmarks.detach().cpu().numpy()
    try:
        array = np.asarray(landmarks)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be an array of (68, 2) pixel coordinates: {exc}") from None
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{name} must hold real numbers (float pixel coordinates), got dtype {array.dtype}")
    single = array.ndim == 2
    if single:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (NUM_LANDMARKS, 2) or array.shape[0] == 0:
        raise ValueError(f"{name} must have shape (68, 2) or (N, 68, 2) with N >= 1, got {np.shape(landmarks)}")
    array = array.astype(np.float64)
    bad = ~np.isfinite(array).all(axis=(1, 2))
    if bad.any():
        raise ValueError(f"{name} contains NaN or infinite values (frame(s) {np.flatnonzero(bad)[:10].tolist()})")
    absurd = (np.abs(array) > MAX_ABS_COORDINATE).any(axis=(1, 2))
    if absurd.any():
        raise ValueError(f"{name} has coordinates beyond {MAX_ABS_COORDINATE:g} pixels "
                         f"(frame(s) {np.flatnonzero(absurd)[:10].tolist()}): not a face in a frame")
    return array, single


def _check_photo(photo, name: str = "photo") -> np.ndarray:
    array = np.asarray(photo)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise ValueError(f"{name} must be a uint8 RGB image of shape (H, W, 3), got dtype {array.dtype} shape {array.shape}")
    return array


def _background(background, n: int, size: int):
    """None, a colour (3 floats in [-1, 1]) or a (n, 3, size, size) float32 image for the compositor."""
    if background is None:
        return None
    array = np.asarray(background)
    if array.dtype.kind not in "iu" or (array.size and (array.min() < 0 or array.max() > 255)):
        raise ValueError(f"background must be uint8 RGB: a colour (3 values 0..255) or an image, got dtype {array.dtype}")
    if array.shape == (3,):
        return [float(v) / 127.5 - 1.0 for v in array]
    if array.shape == (size, size, 3):
        array = np.broadcast_to(array[None], (n, size, size, 3))
    if array.shape != (n, size, size, 3):
        raise ValueError(f"background must be a colour (3,), an image ({size}, {size}, 3) or ({n}, {size}, {size}, 3), got {array.shape}")
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2), dtype=np.float32) / 127.5 - 1.0


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


class BilayerServing:
    """What the Renderer needs to know about the bi-layer model; ``backends.fsth.FSTHServing`` is the
    few-shot model's. Built once the backend (hence the device) is chosen."""

    kind = "bi-layer"
    avatar_type = Avatar
    few_shot = False  # one source photo per avatar
    create_backend = staticmethod(create_backend)

    def __init__(self, model, device: str, threads: int | None = None):
        from .backends import unavailable_reason

        self.model = model
        self.image_size = int(model.config.image_size)
        self.fingerprint = model_fingerprint(model)
        # Phase 1 with exact rewrites; on a CPU the identity embedder runs in the fastest runtime there is
        # (MNN: 0.27-0.31 s per avatar against 0.37 s; its ~2.5 s conversion is cached on disk).
        runtimes = [name for name in ("mnn", "onnxruntime") if unavailable_reason(name, "cpu") is None]
        embedder = runtimes[0] if device == "cpu" and runtimes else "torch"
        self._fast_creator = FastAvatarCreator(model, threads=threads, embedder_runtime=embedder)

    def create(self, source_image, source_keypoints, crop_box, enhance: bool) -> Avatar:
        """(1, 3, S, S) crop and (1, 68, 2) keypoints on the device -> Avatar (CPU tensors)."""
        import torch

        with torch.no_grad():  # not inference_mode: the texture enhancer needs autograd inside
            if enhance:
                created = self.model.create_avatar(source_image, source_keypoints, enhance=True)
            else:
                created = self._fast_creator.create(source_image, source_keypoints)
        return Avatar(
            texture=created.texture[0].detach().to("cpu", torch.float32).contiguous(),
            params=created.params.map(lambda t: t.detach().to("cpu", torch.float32).contiguous()),
            model_fingerprint=self.fingerprint,
            crop_box=tuple(int(v) for v in crop_box),
            enhanced=bool(enhance),
        )

    def load_avatar(self, path) -> Avatar:
        from .backends.fsth import AVATAR_FORMAT as FSTH_AVATAR_FORMAT

        if _file_format(path) == FSTH_AVATAR_FORMAT:
            raise CheckpointError(f"{os.fspath(path)} is an avatar of the few-shot (FSTH) model; this renderer "
                                  "serves a bi-layer model and reads only its avatars")
        return Avatar.load(path, expected_fingerprint=self.fingerprint)

    def check_render_options(self, output: str, background) -> None:
        """Every output and background is available (checked by ``render`` itself)."""

    def frames(self, prepared: PreparedAvatar, out: FrameOutputs, output: str, background):
        """Backend outputs -> uint8 frames, or the float layers (image, lf, hf, mask) as numpy."""
        from . import ops

        texture = prepared.texture
        if background is not None and not isinstance(background, list) and not isinstance(out.lf, np.ndarray):
            import torch

            background = torch.from_numpy(background).to(out.lf.device)
        mask = out.mask_logits if background is not None else None
        if output == "uint8":
            frames = ops.composite(texture, out.delta_uv, out.lf, mask, background, mask_is_logits=True, out="uint8")
            return _to_numpy(frames)
        image = ops.composite(texture, out.delta_uv, out.lf, mask, background, mask_is_logits=True, out="float32")
        zeros = out.lf * 0 if not isinstance(out.lf, np.ndarray) else np.zeros_like(out.lf)
        hf = ops.composite(texture, out.delta_uv, zeros, out="float32")
        mask_prob = 1.0 / (1.0 + np.exp(-_to_numpy(out.mask_logits).astype(np.float64)))
        return (_to_numpy(image), _to_numpy(out.lf).copy(), _to_numpy(hf), mask_prob.astype(np.float32))


class Renderer:
    """One model, one per-frame backend; see the module docstring.

    Args:
        checkpoint: a pybilayer model file (bi-layer or FSTH, told apart by its metadata), a loaded ``Bilayer``
            or ``FSTH`` (moved to ``device`` and used in place, not copied), or None for a random released-size
            bi-layer model (``config``, a ``BilayerConfig`` or an ``FSTHConfig``, chooses another then).
        backend: "auto" (tensorrt > cuda > onnxruntime, skipping what cannot run here), "tensorrt",
            "cuda", "onnxruntime", "mnn" (CPU, opt-in) or "torch" (the fp32 reference). The FSTH model: torch
            or onnxruntime.
        device: "auto" (each backend where it runs: onnxruntime on the CPU, cuda/tensorrt on the GPU, torch
            on the GPU if there is one), "cpu", "cuda" or "cuda:N". Avatar creation runs on the chosen
            backend's device (``Renderer.device``).
        threads: intra-op threads of the onnxruntime and mnn backends (None: their default, all cores).
        backend_options: extra keyword arguments per backend name, e.g. {"onnxruntime": {"graph": "generic"}}.

    ``backend`` (attribute) names the backend in use and ``backend_reason`` says why it was chosen.
    """

    def __init__(self, checkpoint=None, backend: str = "auto", device: str = "auto", *, config=None,
                 threads: int | None = None, backend_options: dict[str, dict[str, Any]] | None = None):
        import torch

        from .backends.fsth import FSTHServing
        from .models.fsth import FSTH

        model = _load_model(checkpoint, config)
        if model.spectral_norm:
            raise ValueError("the model still has spectral norm applied; call model.remove_spectral_norm() before serving")
        serving = FSTHServing if isinstance(model, FSTH) else BilayerServing
        options = {k: dict(v) for k, v in (backend_options or {}).items()}
        if threads is not None:
            for name in ("onnxruntime", "mnn"):
                options.setdefault(name, {}).setdefault("threads", threads)
        self._backend, self.backend_reason = select_backend(backend, model.eval(), device, options,
                                                            create=serving.create_backend)
        # The backend decides where things live: avatar creation runs on its device too.
        self.device = self._backend.device
        self.model = model.to(self.device)
        self._torch_device = torch.device(self.device)
        self._serving = serving(self.model, self.device, threads)
        self.image_size = self._serving.image_size
        self.fingerprint = self._serving.fingerprint
        self._lock = threading.RLock()
        self._prepared: weakref.WeakKeyDictionary[Any, PreparedAvatar] = weakref.WeakKeyDictionary()
        log.info("pybilayer Renderer: backend %s", self.backend_reason)

    @property
    def backend(self) -> str:
        return self._backend.name

    def __repr__(self) -> str:
        return (f"Renderer(model={self.model_kind!r}, backend={self.backend!r}, device={self.device!r}, "
                f"image_size={self.image_size})")

    @property
    def model_kind(self) -> str:
        """"bi-layer" or "few-shot talking-head (FSTH)"."""
        return self._serving.kind

    # ------------------------------------------------------------------ avatars
    def create_avatar(self, photo, landmarks=None, enhance: bool = False):
        """An Avatar from one RGB uint8 (H, W, 3) photo. ``landmarks``: (68, 2) pixels, or None to detect
        them (``pybilayer.landmarks.detect_one``, the largest face). ``enhance`` runs the texture enhancer.
        Runs the identity embedder, texture generator and projector once (with exact convolution
        rewrites, ``backends.avatar_fast``), then the backend's per-avatar preparation. No background
        segmentation is applied to the source photo.

        The FSTH model takes one photo or a list of K photos of the same person (``landmarks`` then None or
        one (68, 2) set per photo): embedder E over the K frames, embeddings averaged, projection P; the
        ``FewShotAvatar`` keeps the first photo's crop box. ``enhance`` is not available for it."""
        import torch

        from .geometry import preprocess

        few = isinstance(photo, (list, tuple))
        photos = list(photo) if few else [photo]
        if not photos:
            raise ValueError("photo: an empty list; give one photo, or a list of photos of one person (FSTH)")
        if len(photos) > 1 and not self._serving.few_shot:
            raise ValueError(f"the {self.model_kind} model makes an avatar from one photo, got {len(photos)}")
        if landmarks is None:
            landmarks = [None] * len(photos)
        elif not few:
            landmarks = [landmarks]
        elif len(landmarks) != len(photos):
            raise ValueError(f"{len(photos)} photos but {len(landmarks)} landmark sets: give one (68, 2) set per photo")
        images, keypoints, boxes = [], [], []
        for i, (one_photo, points) in enumerate(zip(photos, landmarks)):
            name = f"landmarks[{i}]" if few else "landmarks"
            one_photo = _check_photo(one_photo, f"photo[{i}]" if few else "photo")
            if points is None:
                from .landmarks import detect_one

                points = detect_one(one_photo)
            array, single = check_landmarks(points, name)
            if not single:
                raise ValueError(f"{name} must be one face, shape (68, 2), got {np.shape(points)}")
            try:
                image, kp, box = preprocess(one_photo, array[0], size=self.image_size)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
            images.append(image)
            keypoints.append(kp)
            boxes.append(box)
        source_image = torch.from_numpy(np.stack(images)).to(self._torch_device)
        source_keypoints = torch.from_numpy(np.stack(keypoints)).to(self._torch_device)
        with self._lock:
            avatar = self._serving.create(source_image, source_keypoints, boxes[0], enhance)
            self._prepare(avatar)
        return avatar

    def load_avatar(self, path):
        """Read an avatar file; CheckpointError if it is unreadable or was made by a different model."""
        avatar = self._serving.load_avatar(path)
        with self._lock:
            self._prepare(avatar)
        return avatar

    def _check_avatar(self, avatar) -> None:
        """TypeError naming both models when ``avatar`` is not one of this renderer's model kind."""
        if isinstance(avatar, self._serving.avatar_type):
            return
        from .backends.fsth import FewShotAvatar, FSTHServing

        kinds = {Avatar: BilayerServing.kind, FewShotAvatar: FSTHServing.kind}
        other = kinds.get(type(avatar))
        if other is None:
            raise TypeError(f"avatar must be a {self._serving.avatar_type.__name__} (made by this renderer) or a "
                            f"non-empty list of them, got {type(avatar).__name__}")
        raise TypeError(f"this Renderer serves the {self.model_kind} model, got an avatar of the {other} model; "
                        "create avatars with a Renderer of the model that will render them")

    def _prepare(self, avatar) -> PreparedAvatar:
        prepared = self._prepared.get(avatar)
        if prepared is None:
            self._check_avatar(avatar)
            if avatar.model_fingerprint != self.fingerprint:
                raise CheckpointError(
                    f"this avatar was made by a different model (fingerprint {avatar.model_fingerprint[:12]}..., "
                    f"this renderer's model {self.fingerprint[:12]}...); create it again with this model")
            prepared = self._backend.prepare(avatar)
            self._prepared[avatar] = prepared
        return prepared

    # ------------------------------------------------------------------ frames
    def normalize_landmarks(self, landmarks_px: np.ndarray, crop_boxes=None) -> np.ndarray:
        """(N, 68, 2) pixel landmarks -> (N, 68, 2) float32 in [-1, 1] of each frame's crop: its own
        (``geometry.crop_box``, the official behaviour) or ``crop_boxes[i]`` (e.g. smoothed over time)."""
        from .geometry import crop_box, normalize_keypoints

        if crop_boxes is not None and len(crop_boxes) != len(landmarks_px):
            raise ValueError(f"crop_boxes has {len(crop_boxes)} boxes for {len(landmarks_px)} landmark sets")
        out = np.empty(landmarks_px.shape, dtype=np.float32)
        for i, points in enumerate(landmarks_px):
            try:
                box = crop_box(points) if crop_boxes is None else crop_boxes[i]
                out[i] = normalize_keypoints(points, box)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"driver_landmarks_px frame {i}: {exc}") from None
        return out

    def render(self, avatar: Avatar | Sequence[Avatar], driver_landmarks_px, output: str = "uint8",
               background=None, crop_boxes=None):
        """Render frames of one or several avatars.

        avatar: an avatar of this renderer's model (``Avatar``; ``FewShotAvatar`` for FSTH), or a list of
            them. With a list and (N, 68, 2) landmarks, N must equal the number of avatars (frame i shows
            avatar i); with (68, 2) landmarks every avatar takes that pose.
        driver_landmarks_px: (68, 2) or (N, 68, 2) pixel coordinates of the driver frame(s).
        output: "uint8" -> (H, W, 3) or (N, H, W, 3) uint8 RGB; "layers" -> RenderLayers of float32
            (bi-layer only).
        background: None (lf + hf, no mask), a uint8 RGB colour (3,), or a uint8 image (H, W, 3) or
            (N, H, W, 3): the predicted mask composites the avatar over it (bi-layer only).
        crop_boxes: None (each frame's own crop, the official behaviour), or one square box
            (left, top, right, bottom) per frame in driver pixels, e.g. smoothed over time against jitter.
        """
        if output not in ("uint8", "layers"):
            raise ValueError(f"output must be 'uint8' or 'layers', got {output!r}")
        self._serving.check_render_options(output, background)
        points, single = check_landmarks(driver_landmarks_px)
        avatars = self._frame_avatars(avatar, len(points), single)
        if crop_boxes is not None:
            crop_boxes = [crop_boxes] if single and np.ndim(crop_boxes) == 1 else list(crop_boxes)
        if not isinstance(avatar, (list, tuple)):
            squeeze = single
        else:
            squeeze = False
            if single:  # one pose, every avatar
                points = np.repeat(points, len(avatars), axis=0)
                crop_boxes = None if crop_boxes is None else crop_boxes * len(avatars)
        keypoints = self.normalize_landmarks(points, crop_boxes)
        n = len(keypoints)
        bg = _background(background, n, self.image_size)
        # consecutive frames of the same avatar form one group
        groups: list[tuple[Avatar, int, int]] = []
        for i, a in enumerate(avatars):
            if groups and groups[-1][0] is a:
                groups[-1] = (a, groups[-1][1], i + 1)
            else:
                groups.append((a, i, i + 1))
        with self._lock:
            prepared = [self._prepare(a) for a, _, _ in groups]
            outputs = self._backend.run([(p, keypoints[s:e]) for p, (_, s, e) in zip(prepared, groups)])
            results = []
            for p, (_, s, e), out in zip(prepared, groups, outputs):
                group_bg = bg[s:e] if isinstance(bg, np.ndarray) else bg
                results.append(self._serving.frames(p, out, output, group_bg))
        if output == "uint8":
            frames = np.concatenate(results) if len(results) > 1 else results[0]
            return frames[0] if squeeze else frames
        layers = RenderLayers(*(np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*results)))
        return RenderLayers(*(x[0] for x in layers)) if squeeze else layers

    def _frame_avatars(self, avatar, n: int, single: bool) -> list:
        if not isinstance(avatar, (list, tuple)):
            self._check_avatar(avatar)
            return [avatar] * n
        if not avatar:
            raise TypeError("avatar must be an avatar or a non-empty list of avatars, got an empty list")
        for a in avatar:
            self._check_avatar(a)
        if not single and len(avatar) != n:
            raise ValueError(f"{len(avatar)} avatars but {n} landmark sets: give one set per avatar, "
                             "or a single (68, 2) set for all of them")
        return list(avatar)


__all__ = ["BilayerServing", "RenderLayers", "Renderer", "check_landmarks"]
