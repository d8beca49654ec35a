"""The ``pybilayer`` command (also ``python -m pybilayer``).

    pybilayer animate                                  # demo: bundled photo + driving landmarks
    pybilayer animate --source me.jpg --driver talk.mp4 --out out.mp4 --checkpoint model.safetensors
    pybilayer landmarks talk.mp4 -o talk.npy
    pybilayer avatar create me.jpg -o me.avatar --checkpoint model.safetensors
    pybilayer convert-official runs/vc2-hq_adrianb_paper_main --epoch 2225 -o model.safetensors
    pybilayer export --checkpoint model.safetensors -o frame.onnx --precision fp16
    pybilayer build-engine --checkpoint model.safetensors --precision fp16
    pybilayer webcam --source me.jpg --checkpoint model.safetensors
    pybilayer info

Every failure prints one line, ``pybilayer: error: ...``, and exits non-zero (``--debug`` shows the
traceback). Arguments are parsed once into typed option dataclasses; the library functions below take
explicit arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np

from . import __version__
from .errors import BackendUnavailableError, CheckpointError, MediaError, PybilayerError

PROG = "pybilayer"
log = logging.getLogger("pybilayer")

RANDOM_WEIGHTS_NOTE = "random weights: this shows the engine, not a trained model"
DEMO_FPS = 25.0
DETECTORS = ("auto", "face-alignment", "dlib", "mediapipe")


class UsageError(PybilayerError):
    """Bad command-line arguments (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line through main() instead of usage text + exit."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class EngineOptions:
    checkpoint: str | None  # None: random weights, always said so
    backend: str
    device: str


@dataclass(frozen=True)
class DetectionOptions:
    detector: str
    face_index: int


@dataclass(frozen=True)
class SmoothingOptions:
    smooth: str  # auto (on for video drivers, off for landmark files) | on | off
    stable_crop: bool


@dataclass(frozen=True)
class AnimateOptions:
    source: str  # a photo, or an .avatar file
    source_landmarks: str | None
    driver: str  # a video, or a .npy landmark file
    out: str
    engine: EngineOptions
    detection: DetectionOptions
    smoothing: SmoothingOptions
    side_by_side: bool
    landmarks_fps: float  # frame rate of a .npy driver
    max_frames: int | None
    batch_size: int
    enhance: bool
    demo: bool
    progress: bool
    still: str | None = None  # also save the middle frame as an image (e.g. for a README)


@dataclass(frozen=True)
class WebcamOptions:
    source: str
    camera: str  # an index ("0") or a video file / stream URL OpenCV can open
    engine: EngineOptions
    detection: DetectionOptions
    virtual_camera: bool
    side_by_side: bool
    max_frames: int | None


# --------------------------------------------------------------------------- shared helpers


def demo_asset(name: str) -> str:
    """Path of a bundled demo file (pybilayer/data/demo_*)."""
    path = resources.files("pybilayer.data").joinpath(name)
    if not path.is_file():
        raise MediaError(f"bundled demo asset {name} is missing from this installation")
    return os.fspath(path)


def _progress(iterable: Iterable, total: int | None, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    # disable=None: tqdm stays silent when stderr is not a terminal (logs, CI, captured output).
    return tqdm(iterable, total=total, desc=desc, unit="frame", file=sys.stderr, disable=None, leave=False)


def _progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar to ``update(n)`` by hand, or None (disabled, not a terminal, or tqdm missing)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="frame", file=sys.stderr, disable=None, leave=False)


def _require_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise MediaError(f"{what} {path}: no such file")
    if os.path.isdir(path):
        raise MediaError(f"{what} {path}: is a directory, expected a file")


def _check_output(path: str, what: str, suffixes: Sequence[str]) -> None:
    """Fail before any heavy work when the output cannot be written where asked."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in suffixes:
        raise MediaError(f"{what} {path}: unsupported file type {suffix or '(none)'!r}; use {', '.join(suffixes)}")
    if os.path.isdir(path):
        raise MediaError(f"{what} {path}: is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise MediaError(f"{what} {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise MediaError(f"{what} {path}: directory {directory} is not writable")


def weights_label(checkpoint: str | None) -> str:
    """What made the frames, for captions, metadata and logs."""
    if checkpoint is None:
        return "random weights (untrained model): this shows the engine, not a trained model"
    return f"weights: {os.path.basename(checkpoint)}"


def load_renderer(engine: EngineOptions):
    """The Renderer for these options; logs the backend and, for random weights, says so."""
    try:
        from .renderer import Renderer
    except ImportError as exc:
        raise BackendUnavailableError(f"the renderer is not available in this installation ({exc})") from exc
    if engine.checkpoint is None:
        log.warning(RANDOM_WEIGHTS_NOTE)
    else:
        _require_file(engine.checkpoint, "--checkpoint")
    return Renderer(engine.checkpoint, backend=engine.backend, device=engine.device)


def _detector(options: DetectionOptions, video: bool = False):
    from .landmarks import create_detector

    detector = create_detector(options.detector, video=video)
    log.info("landmark detector: %s", detector.name)
    return detector


def source_landmarks(photo: np.ndarray, landmarks_path: str | None, detection: DetectionOptions) -> np.ndarray:
    """(68, 2) landmarks of the source photo: from a file, or detected (face chosen by index)."""
    from .landmarks import detect_one, load_landmarks

    if landmarks_path is not None:
        landmarks = load_landmarks(landmarks_path)
        if landmarks.shape[0] != 1:
            raise MediaError(
                f"--source-landmarks {landmarks_path}: expected one face (68, 2), got {landmarks.shape[0]} frames"
            )
        return landmarks[0]
    return detect_one(photo, _detector(detection), index=detection.face_index)


@dataclass(frozen=True)
class Source:
    """The identity to animate: an .avatar file, or a photo with its 68 landmarks."""

    avatar_path: str | None
    photo: np.ndarray | None
    landmarks: np.ndarray | None


def load_source(source: str, landmarks_path: str | None, detection: DetectionOptions) -> Source:
    """Read the photo and find its face (cheap checks first: this runs before the model loads)."""
    from .video import read_image

    _require_file(source, "--source")
    if source.lower().endswith(".avatar"):
        return Source(source, None, None)
    photo = read_image(source)
    return Source(None, photo, source_landmarks(photo, landmarks_path, detection))


def make_avatar(renderer, source: Source, enhance: bool):
    if source.avatar_path is not None:
        return renderer.load_avatar(source.avatar_path)
    return renderer.create_avatar(source.photo, landmarks=source.landmarks, enhance=enhance)


# --------------------------------------------------------------------------- driver landmarks


@dataclass
class Driver:
    landmarks: np.ndarray  # (N, 68, 2) float32 pixels of the driver's frames
    fps: float
    video_path: str | None  # the video they came from (for side-by-side frames and its audio)


def video_landmarks(
    path: str, detection: DetectionOptions, max_frames: int | None, progress: bool
) -> Driver:
    """Landmarks of one face through a video (the face chosen by index in its first frame, then followed)."""
    from .landmarks import FaceFollower, fill_missing
    from .video import VideoReader

    per_frame: list[np.ndarray | None] = []
    with VideoReader(path) as reader:  # opened first: an unreadable file fails before the detector loads
        follower = FaceFollower(_detector(detection, video=True), index=detection.face_index)
        fps = reader.info.fps
        total = reader.info.frame_count or None
        if max_frames is not None and total is not None:
            total = min(total, max_frames)
        for frame in _progress(reader, total, "landmarks", progress):
            if max_frames is not None and len(per_frame) >= max_frames:
                break
            per_frame.append(follower(frame))
    if not per_frame:
        raise MediaError(f"{path}: the video has no frames")
    filled = fill_missing(per_frame)
    missing = int((~filled.found).sum())
    if missing:
        log.warning("%s: no face in %d of %d frames; they reuse the nearest frame's landmarks",
                    path, missing, len(per_frame))
    return Driver(filled.landmarks, fps, path)


def load_driver(path: str, detection: DetectionOptions, fps: float, max_frames: int | None, progress: bool) -> Driver:
    from .landmarks import load_landmarks

    _require_file(path, "--driver")
    if path.lower().endswith(".npy"):
        landmarks = load_landmarks(path)
        if max_frames is not None:
            landmarks = landmarks[:max_frames]
        return Driver(landmarks, fps, None)
    return video_landmarks(path, detection, max_frames, progress)


def driver_keypoints(driver: Driver, smoothing: SmoothingOptions) -> tuple[np.ndarray, list]:
    """Smoothed landmarks and the crop box of each frame (stable or per-frame official)."""
    from .geometry import crop_box
    from .smoothing import smooth_landmarks, stable_crop_boxes

    landmarks = driver.landmarks
    smooth = smoothing.smooth == "on" or (smoothing.smooth == "auto" and driver.video_path is not None)
    if smooth and len(landmarks) > 1:
        landmarks = smooth_landmarks(landmarks, driver.fps)
    if smoothing.stable_crop:
        boxes = stable_crop_boxes(landmarks, driver.fps)
    else:
        boxes = [crop_box(lm) for lm in landmarks]
    return landmarks, boxes


# --------------------------------------------------------------------------- rendering


def supports_crop_boxes(renderer) -> bool:
    """Whether ``renderer.render`` takes per-frame crop boxes (needed for stable crops)."""
    import inspect

    try:
        return "crop_boxes" in inspect.signature(renderer.render).parameters
    except (TypeError, ValueError):
        return False


def _stable_crops_possible(renderer) -> bool:
    if supports_crop_boxes(renderer):
        return True
    log.info("stable crops unavailable: this Renderer.render takes no crop_boxes, so every frame is "
                "re-centred on its own landmarks (the official behaviour, which jitters)")
    return False


def render_batch(renderer, avatar, landmarks: np.ndarray, boxes: Sequence | None) -> np.ndarray:
    """(n, H, W, 3) uint8 frames for (n, 68, 2) pixel landmarks; ``boxes``: stable crops, or None for the
    renderer's own per-frame (official) crop."""
    if boxes is None:
        frames = renderer.render(avatar, landmarks)
    else:
        frames = renderer.render(avatar, landmarks, crop_boxes=list(boxes))
    return np.asarray(frames).reshape(len(landmarks), *np.asarray(frames).shape[-3:])


def stickman_frame(landmarks: np.ndarray, box, size: int) -> np.ndarray:
    """The driving pose as the network sees it: its stickman in the crop box, uint8 (size, size, 3)."""
    from .geometry import draw_stickman, normalize_keypoints

    stickman = draw_stickman(normalize_keypoints(landmarks, box), size)
    return np.round((stickman.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)


def animate(options: AnimateOptions) -> str:
    """Render ``options.driver``'s motion on ``options.source``'s face into ``options.out``."""
    from .geometry import crop_box
    from .video import IMAGE_SUFFIXES, VideoReader, VideoWriter, add_caption, container_for, side_by_side, write_image

    # Everything that can be checked cheaply is checked before the model loads.
    _require_file(options.source, "--source")
    _require_file(options.driver, "--driver")
    if options.source_landmarks is not None:
        _require_file(options.source_landmarks, "--source-landmarks")
    container_for(options.out)
    _check_output(options.out, "--out", (".mp4", ".mov", ".mkv"))
    if options.still is not None:
        _check_output(options.still, "--still", sorted(IMAGE_SUFFIXES))
    label = weights_label(options.engine.checkpoint)
    # Random weights are never passed off as a result: such videos carry the label on every frame.
    caption = label if (options.engine.checkpoint is None or options.demo) else None
    if options.demo:
        log.info("demo: bundled source photo (NASA astronaut portrait, public domain) and synthetic driving landmarks")

    source = load_source(options.source, options.source_landmarks, options.detection)
    driver = load_driver(options.driver, options.detection, options.landmarks_fps, options.max_frames, options.progress)
    renderer = load_renderer(options.engine)
    started = time.perf_counter()
    avatar = make_avatar(renderer, source, options.enhance)
    log.info("avatar ready in %.2f s", time.perf_counter() - started)
    landmarks, boxes = driver_keypoints(driver, options.smoothing)
    n_frames = len(landmarks)
    stable = options.smoothing.stable_crop and _stable_crops_possible(renderer)
    if options.smoothing.stable_crop and not stable:
        boxes = [crop_box(lm) for lm in landmarks]  # what the renderer does itself (shown side by side)

    # The demo also shows whose face it is: source crop | driver | result.
    source_panel = None
    if options.demo and options.side_by_side and source.photo is not None:
        from .geometry import crop_image

        source_panel = crop_image(source.photo, crop_box(source.landmarks), avatar.image_size)
    metadata = {"comment": f"made by pybilayer {__version__}; {label}", "title": os.path.basename(options.out)}
    driver_frames: Iterator[np.ndarray] | None = None
    reader = None
    if options.side_by_side and driver.video_path is not None:
        reader = VideoReader(driver.video_path)
        driver_frames = iter(reader)
    render_seconds = 0.0
    started = time.perf_counter()
    bar = None
    middle_frame = None
    try:
        with VideoWriter(options.out, driver.fps, audio_from=driver.video_path, metadata=metadata) as writer:
            bar = _progress_bar(n_frames, "render", options.progress)
            for start in range(0, n_frames, options.batch_size):
                stop = min(start + options.batch_size, n_frames)
                tick = time.perf_counter()
                frames = render_batch(renderer, avatar, landmarks[start:stop], boxes[start:stop] if stable else None)
                render_seconds += time.perf_counter() - tick
                for offset, frame in enumerate(frames):
                    i = start + offset
                    if options.side_by_side:
                        left = next(driver_frames, None) if driver_frames is not None else None
                        if left is None:
                            left = stickman_frame(landmarks[i], boxes[i], frame.shape[0])
                        frame = side_by_side(left, frame)
                        if source_panel is not None:
                            frame = side_by_side(source_panel, frame)
                    if caption:
                        frame = add_caption(frame, caption)
                    writer.write(frame)
                    if i == n_frames // 2:
                        middle_frame = frame
                if bar is not None:
                    bar.update(stop - start)
    finally:
        if bar is not None:
            bar.close()
        if reader is not None:
            reader.close()
    total = time.perf_counter() - started
    if options.still is not None:
        write_image(options.still, middle_frame)
        log.info("wrote %s (frame %d of %d)", options.still, n_frames // 2, n_frames)
    log.info(
        "wrote %s: %d frames in %.1f s (%.1f fps overall, %.1f fps rendering)%s",
        options.out, n_frames, total, n_frames / max(total, 1e-9), n_frames / max(render_seconds, 1e-9),
        f"; {label}" if options.engine.checkpoint is None else "",
    )
    return options.out


# --------------------------------------------------------------------------- subcommands


def _engine_options(args) -> EngineOptions:
    return EngineOptions(checkpoint=args.checkpoint, backend=args.backend, device=args.device)


def _detection_options(args) -> DetectionOptions:
    if args.face_index < 0:
        raise UsageError(f"--face-index must be >= 0, got {args.face_index}")
    return DetectionOptions(detector=args.detector, face_index=args.face_index)


def cmd_animate(args) -> int:
    # Whatever is not given comes from the bundled demo (and the output then says it is a demo).
    demo = args.source is None or args.driver is None
    source = args.source or demo_asset("demo_source.jpg")
    source_lm = args.source_landmarks
    if args.source is None and source_lm is None:
        source_lm = demo_asset("demo_source_landmarks.npy")
    driver = args.driver or demo_asset("demo_driver_landmarks.npy")
    if args.out is None and not demo:
        raise UsageError("--out is required (it defaults to pybilayer_demo.mp4 only for the demo)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_frames is not None and args.max_frames < 1:
        raise UsageError(f"--max-frames must be >= 1, got {args.max_frames}")
    if not args.fps > 0:
        raise UsageError(f"--fps must be positive, got {args.fps}")
    options = AnimateOptions(
        source=source,
        source_landmarks=source_lm,
        driver=driver,
        out=args.out or "pybilayer_demo.mp4",
        engine=_engine_options(args),
        detection=_detection_options(args),
        smoothing=SmoothingOptions(smooth=args.smooth, stable_crop=not args.per_frame_crop),
        side_by_side=args.side_by_side or (args.source is None and args.driver is None),
        landmarks_fps=args.fps,
        max_frames=args.max_frames,
        batch_size=args.batch_size,
        enhance=args.enhance,
        demo=demo,
        progress=not args.quiet,
        still=args.still,
    )
    animate(options)
    return 0


def cmd_landmarks(args) -> int:
    from .landmarks import detect_one, save_landmarks
    from .smoothing import smooth_landmarks
    from .video import IMAGE_SUFFIXES, read_image

    _require_file(args.input, "input")
    _check_output(args.output, "-o", (".npy",))
    detection = _detection_options(args)
    fps_hint = ""
    if os.path.splitext(args.input)[1].lower() in IMAGE_SUFFIXES:
        landmarks = detect_one(read_image(args.input), _detector(detection), index=detection.face_index)[None]
    else:
        driver = video_landmarks(args.input, detection, args.max_frames, not args.quiet)
        landmarks = driver.landmarks
        if not args.no_smooth and len(landmarks) > 1:
            landmarks = smooth_landmarks(landmarks, driver.fps)
        fps_hint = f" at {driver.fps:g} fps (animate --fps {driver.fps:g})"
    save_landmarks(args.output, landmarks)
    log.info("wrote %s: %d frame(s) of 68 landmarks%s", args.output, len(landmarks), fps_hint)
    return 0


def cmd_avatar_create(args) -> int:
    from .video import read_image

    _require_file(args.photo, "photo")
    _check_output(args.output, "-o", (".avatar",))
    photo = read_image(args.photo)
    landmarks = source_landmarks(photo, args.landmarks, _detection_options(args))
    renderer = load_renderer(_engine_options(args))
    avatar = renderer.create_avatar(photo, landmarks=landmarks, enhance=args.enhance)
    avatar.save(args.output)
    log.info("wrote %s (%s)", args.output, weights_label(args.checkpoint))
    return 0


def cmd_convert_official(args) -> int:
    import json

    from .models import BilayerConfig
    from .official import convert_official

    if not os.path.isdir(args.ckpt_dir):
        raise CheckpointError(f"CKPT_DIR {args.ckpt_dir}: not a directory")
    if (args.enhancer_dir is None) != (args.enhancer_epoch is None):
        raise UsageError("--enhancer-dir and --enhancer-epoch go together")
    _check_output(args.output, "-o", (".safetensors",))
    config = None
    if args.config is not None:
        _require_file(args.config, "--config")
        try:
            with open(args.config, encoding="utf-8") as f:
                config = BilayerConfig.from_dict(json.load(f))
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"--config {args.config}: not a valid BilayerConfig JSON ({exc})") from exc
    model = convert_official(args.ckpt_dir, args.epoch, enhancer_dir=args.enhancer_dir,
                             enhancer_epoch=args.enhancer_epoch, config=config)
    model.save(args.output)
    log.info("wrote %s", args.output)
    return 0


def _load_model(checkpoint: str | None):
    from .models import Bilayer

    if checkpoint is None:
        log.warning(RANDOM_WEIGHTS_NOTE)
        return Bilayer().eval()
    _require_file(checkpoint, "--checkpoint")
    return Bilayer.load(checkpoint)


def cmd_export(args) -> int:
    try:
        from .export import export_onnx
    except ImportError as exc:
        raise BackendUnavailableError(f"ONNX export is not available in this installation ({exc})") from exc
    _check_output(args.output, "-o", (".onnx",))
    model = _load_model(args.checkpoint)
    export_onnx(model, args.output, args.precision)
    log.info("wrote %s (%s, %s)", args.output, args.precision, weights_label(args.checkpoint))
    return 0


def cmd_build_engine(args) -> int:
    from .trt import build_engine, import_tensorrt

    if args.max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {args.max_batch}")
    import_tensorrt()  # before any model is built: without TensorRT this says how to get it
    if args.checkpoint is None:
        log.warning(RANDOM_WEIGHTS_NOTE)
    else:
        _require_file(args.checkpoint, "--checkpoint")
    checkpoint = args.checkpoint if args.checkpoint is not None else _load_model(None)
    plan = build_engine(checkpoint, precision=args.precision, max_batch=args.max_batch,
                        cache_dir=args.cache_dir, force=args.force)
    print(plan)
    return 0


# --------------------------------------------------------------------------- webcam


class WindowSink:
    """Shows frames in an OpenCV window; closing it, q or Esc ends the loop."""

    TITLE = "pybilayer (q to quit)"

    def __init__(self):
        reason = window_unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"cannot open a window: {reason}")
        import cv2

        self._cv2 = cv2
        cv2.namedWindow(self.TITLE, cv2.WINDOW_AUTOSIZE)

    def __call__(self, frame: np.ndarray) -> bool:
        cv2 = self._cv2
        cv2.imshow(self.TITLE, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        key = cv2.waitKey(1) & 0xFF
        visible = cv2.getWindowProperty(self.TITLE, cv2.WND_PROP_VISIBLE) >= 1
        return key not in (ord("q"), 27) and visible

    def close(self) -> None:
        self._cv2.destroyAllWindows()


class VirtualCameraSink:
    """Sends frames to a virtual camera (pyvirtualcam: v4l2loopback, OBS, Unity Capture)."""

    def __init__(self, width: int, height: int, fps: float):
        try:
            import pyvirtualcam
        except ImportError as exc:
            raise BackendUnavailableError("--virtual-camera needs pyvirtualcam (pip install pyvirtualcam)") from exc
        try:
            self._camera = pyvirtualcam.Camera(width=width, height=height, fps=fps)
        except RuntimeError as exc:
            raise BackendUnavailableError(f"no virtual camera device is available: {exc}") from exc
        log.info("virtual camera: %s", self._camera.device)

    def __call__(self, frame: np.ndarray) -> bool:
        self._camera.send(np.ascontiguousarray(frame))
        self._camera.sleep_until_next_frame()
        return True

    def close(self) -> None:
        self._camera.close()


def window_unavailable_reason() -> str | None:
    try:
        import cv2
    except ImportError:
        return "OpenCV is not installed (pip install opencv-python)"
    gui = [line for line in cv2.getBuildInformation().splitlines() if line.strip().startswith("GUI:")]
    if gui and gui[0].split(":", 1)[1].strip().upper() == "NONE":
        return f"this OpenCV ({cv2.__version__}) has no GUI support (opencv-python-headless); install opencv-python"
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (DISPLAY is not set)"
    return None


def camera_frames(camera: str) -> Iterator[np.ndarray]:
    """RGB frames from an OpenCV capture device index or a video file/URL; fails clearly when none opens."""
    try:
        import cv2
    except ImportError as exc:
        raise BackendUnavailableError("the webcam needs OpenCV (pip install opencv-python-headless)") from exc
    source: int | str = int(camera) if camera.isdigit() else camera
    # OpenCV logs its failed attempts (one line per capture backend) to stderr; our error says it once.
    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        capture = cv2.VideoCapture(source)
    finally:
        cv2.utils.logging.setLogLevel(previous)
    if not capture.isOpened():
        capture.release()
        what = f"camera {source}" if isinstance(source, int) else source
        raise MediaError(f"{what} could not be opened (no camera here, or it is in use)")

    def frames() -> Iterator[np.ndarray]:
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    return
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        finally:
            capture.release()

    return frames()


def live_loop(frames: Iterable[np.ndarray], renderer, avatar, detector, open_sink, fps: float,
              side_by_side: bool, max_frames: int | None, caption: str | None = None) -> int:
    """camera frames -> landmarks (followed, One Euro smoothed, stable crop) -> rendered frames -> sink.

    ``open_sink(width, height)`` is called once the first frame's size is known (a virtual camera needs
    it); the sink returns False to stop. Frames where the face is lost repeat the last pose.
    Returns the number of frames shown.
    """
    from .landmarks import FaceFollower
    from .smoothing import LandmarkSmoother, StableCrop
    from .video import add_caption
    from .video import side_by_side as join

    follower = FaceFollower(detector)
    smoother, stable = LandmarkSmoother(fps), StableCrop(fps)
    use_boxes = _stable_crops_possible(renderer)
    sink = None
    shown, last, started = 0, None, time.perf_counter()
    try:
        for frame in frames:
            if max_frames is not None and shown >= max_frames:
                break
            landmarks = follower(frame)
            if landmarks is not None:
                now = time.perf_counter()  # a camera's frame rate varies: filter on real time
                landmarks = smoother(landmarks, now)
                last = (landmarks, stable(landmarks, now))
            if last is None:
                continue  # no face yet
            image = render_batch(renderer, avatar, last[0][None], [last[1]] if use_boxes else None)[0]
            if side_by_side:
                image = join(frame, image)
            if caption:
                image = add_caption(image, caption)
            if sink is None:
                sink = open_sink(image.shape[1], image.shape[0])
            shown += 1
            if not sink(image):
                break
    finally:
        if sink is not None:
            sink.close()
    elapsed = time.perf_counter() - started
    if shown:
        log.info("%d frames in %.1f s (%.1f fps)", shown, elapsed, shown / max(elapsed, 1e-9))
    return shown


def _virtual_camera_reason() -> str | None:
    return None if _import_ok("pyvirtualcam") else "--virtual-camera needs pyvirtualcam (pip install pyvirtualcam)"


def cmd_webcam(args) -> int:
    options = WebcamOptions(
        source=args.source or demo_asset("demo_source.jpg"),
        camera=args.camera,
        engine=_engine_options(args),
        detection=_detection_options(args),
        virtual_camera=args.virtual_camera,
        side_by_side=args.side_by_side,
        max_frames=args.max_frames,
    )
    source_lm = args.source_landmarks
    if args.source is None and source_lm is None:
        source_lm = demo_asset("demo_source_landmarks.npy")
    _require_file(options.source, "--source")
    if source_lm is not None:
        _require_file(source_lm, "--source-landmarks")
    # Where the frames go, and where they come from, are checked before the model loads.
    if options.virtual_camera:
        reason = _virtual_camera_reason()
        if reason:
            raise BackendUnavailableError(reason)
    else:
        reason = window_unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"cannot open a window: {reason}; try --virtual-camera")
    frames = camera_frames(options.camera)
    source = load_source(options.source, source_lm, options.detection)
    renderer = load_renderer(options.engine)
    avatar = make_avatar(renderer, source, enhance=False)
    detector = _detector(options.detection, video=True)
    if options.virtual_camera:
        def open_sink(width, height):
            return VirtualCameraSink(width, height, 30.0)
    else:
        def open_sink(width, height):
            return WindowSink()
    caption = weights_label(None) if options.engine.checkpoint is None else None
    live_loop(frames, renderer, avatar, detector, open_sink, 30.0, options.side_by_side, options.max_frames, caption)
    return 0


# --------------------------------------------------------------------------- info


def _backend_reasons() -> list[tuple[str, str | None]]:
    """(backend, None if usable here else why not), from the backends' own cheap probes."""
    try:
        from .backends import BACKENDS, CPU_BACKENDS, unavailable_reason
    except ImportError as exc:
        return [("backends", f"pybilayer.backends does not import: {exc}")]
    rows = []
    for name in BACKENDS:
        device = "cpu" if name in CPU_BACKENDS else "cuda"
        try:
            rows.append((name, unavailable_reason(name, device)))
        except Exception as exc:  # noqa: BLE001 - a probe that fails is itself the reason
            rows.append((name, f"{type(exc).__name__}: {exc}"))
    return rows


def _devices() -> str:
    cpu = f"cpu ({os.cpu_count()} threads)"
    try:
        import torch
    except ImportError:
        return f"{cpu}; cuda: unknown (torch is not installed)"
    if not torch.cuda.is_available():
        return f"{cpu}; cuda: none visible to torch {torch.__version__}"
    gpus = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return f"{cpu}; " + ", ".join(gpus)


def _native_capabilities():
    try:
        from .native import capabilities
    except ImportError:
        return None
    return capabilities()


def info_lines() -> list[str]:
    import platform

    lines = [f"pybilayer {__version__} (Python {platform.python_version()}, numpy {np.__version__}, "
             f"{platform.machine()}, {os.cpu_count()} CPU threads)"]
    caps = _native_capabilities()
    if caps is None:
        lines.append("native core: pybilayer.native is missing from this installation")
    else:
        native = f"yes, CPU kernels {caps.cpu_isas[-1]}" if caps.native else "no: " + str(caps.native_reason)
        lines.append(f"native core (pybilayer._C): {native}")
        lines.append(f"native CUDA twin: {'yes' if caps.cuda else 'no: ' + str(caps.cuda_reason)}")
    lines.append(f"devices: {_devices()}")
    lines.append("per-frame backends (auto picks tensorrt > cuda > onnxruntime):")
    for name, reason in _backend_reasons():
        lines.append(f"  {name:<12} {'usable' if reason is None else 'unavailable: ' + reason}")
    from .landmarks import detector_statuses

    lines.append("landmark detectors (auto picks the first usable):")
    for status in detector_statuses():
        state = "usable" if status.available else "unavailable: " + status.reason
        lines.append(f"  {status.name:<15} {state}; licence: {status.licence}")
    lines.append(f"video: {_video_status()}")
    camera = "yes" if _import_ok("cv2") else "no: OpenCV is not installed"
    window = window_unavailable_reason()
    virtual = "yes (pyvirtualcam installed; needs a virtual camera device)" if _import_ok("pyvirtualcam") \
        else "no: pyvirtualcam is not installed"
    lines.append(f"webcam: capture {camera}; window {'yes' if window is None else 'no: ' + window}; "
                 f"virtual camera {virtual}")
    return lines


def _import_ok(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _video_status() -> str:
    try:
        import av
    except ImportError:
        return "unavailable: PyAV is not installed (pip install av==18.1.0)"
    h264 = "libx264" in av.codecs_available
    version = ".".join(str(v) for v in av.library_versions.get("libavcodec", ()))
    return f"PyAV {av.__version__} (libavcodec {version}); H.264 encoder: {'yes' if h264 else 'no'}"


def cmd_info(args) -> int:
    for line in info_lines():
        print(line)
    return 0


# --------------------------------------------------------------------------- parser


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="MODEL",
                        help="model file (.safetensors); without it, random weights (said so on the output)")
    from .backends import BACKENDS

    parser.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS,
                        help="per-frame backend (default: auto: tensorrt > cuda > onnxruntime)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def _add_detection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detector", default="auto", choices=DETECTORS, help="landmark detector (default: auto)")
    parser.add_argument("--face-index", type=int, default=0, metavar="I",
                        help="which face when there are several: 0 = largest (default), 1 = next ...")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="One-shot bi-layer neural head avatars, rendered fast.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    p = commands.add_parser("animate", help="drive a photo with a video or landmark file; writes a video",
                            description="Without --source and --driver: the bundled demo "
                                        "(source | driver | result, random weights unless --checkpoint).")
    p.add_argument("--source", metavar="PHOTO", help="source photo, or an .avatar file")
    p.add_argument("--source-landmarks", metavar="NPY", help="68 landmarks of the source photo (skip detection)")
    p.add_argument("--driver", metavar="VIDEO|NPY", help="driving video, or (N, 68, 2) landmarks (.npy)")
    p.add_argument("--out", "-o", metavar="VIDEO",
                   help="output .mp4/.mov/.mkv, written atomically (demo default: pybilayer_demo.mp4)")
    _add_engine_arguments(p)
    _add_detection_arguments(p)
    p.add_argument("--side-by-side", action="store_true", help="write driver | result")
    p.add_argument("--smooth", default="auto", choices=("auto", "on", "off"),
                   help="One Euro smoothing of driver landmarks (auto: on for videos, off for .npy)")
    p.add_argument("--per-frame-crop", action="store_true",
                   help="re-centre the crop on every frame as the official code does (jitters)")
    p.add_argument("--fps", type=float, default=DEMO_FPS, help="frame rate of a .npy driver (default: 25)")
    p.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="frames per render call (default: 8)")
    p.add_argument("--enhance", action="store_true", help="run the texture enhancer when creating the avatar")
    p.add_argument("--still", metavar="PNG", help="also save the middle frame as an image")
    p.set_defaults(handler=cmd_animate)

    p = commands.add_parser("landmarks", help="68 landmarks of a video (or photo) into a .npy file")
    p.add_argument("input", metavar="VIDEO", help="a video or a photo")
    p.add_argument("-o", "--output", required=True, metavar="NPY", help="output (N, 68, 2) float32 .npy")
    _add_detection_arguments(p)
    p.add_argument("--no-smooth", action="store_true", help="raw per-frame detections (no One Euro filter)")
    p.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames")
    p.set_defaults(handler=cmd_landmarks)

    p = commands.add_parser("avatar", help="avatar files")
    avatar_commands = p.add_subparsers(dest="avatar_command", metavar="ACTION", parser_class=_Parser)
    avatar_commands.required = True
    p = avatar_commands.add_parser("create", help="create an avatar from one photo")
    p.add_argument("photo", help="source photo")
    p.add_argument("-o", "--output", required=True, metavar="AVATAR", help="output .avatar file")
    p.add_argument("--landmarks", metavar="NPY", help="68 landmarks of the photo (skip detection)")
    p.add_argument("--enhance", action="store_true", help="run the texture enhancer")
    _add_engine_arguments(p)
    _add_detection_arguments(p)
    p.set_defaults(handler=cmd_avatar_create)

    p = commands.add_parser("convert-official", help="convert saic-violet/bilayer-model checkpoints")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="run directory (or its checkpoints/ folder)")
    p.add_argument("--epoch", type=int, required=True, help="epoch of the base networks (2225 released)")
    p.add_argument("--enhancer-dir", metavar="DIR", help="run directory of the texture enhancer")
    p.add_argument("--enhancer-epoch", type=int, metavar="N", help="its epoch (1225 released)")
    p.add_argument("--config", metavar="JSON",
                   help="architecture (BilayerConfig fields as JSON) when it is not the released one")
    p.add_argument("-o", "--output", required=True, metavar="MODEL", help="output .safetensors")
    p.set_defaults(handler=cmd_convert_official)

    p = commands.add_parser("export", help="export the per-frame network to ONNX")
    p.add_argument("--checkpoint", metavar="MODEL", help="model file (default: random weights)")
    p.add_argument("-o", "--output", required=True, metavar="ONNX", help="output .onnx")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    p.set_defaults(handler=cmd_export)

    p = commands.add_parser("build-engine", help="build (or reuse) a TensorRT plan of the per-frame network")
    p.add_argument("--checkpoint", metavar="MODEL", help="model file (default: random weights)")
    p.add_argument("--precision", default="fp16", choices=("fp32", "fp16"))
    p.add_argument("--max-batch", type=int, default=8, metavar="N")
    p.add_argument("--cache-dir", metavar="DIR", help="engine cache (default: engines/cache or $PYBILAYER_ENGINE_DIR)")
    p.add_argument("--force", action="store_true", help="rebuild even when a valid plan is cached")
    p.set_defaults(handler=cmd_build_engine)

    p = commands.add_parser("webcam", help="camera -> landmarks -> avatar, live in a window or virtual camera")
    p.add_argument("--source", metavar="PHOTO", help="source photo or .avatar (default: the demo photo)")
    p.add_argument("--source-landmarks", metavar="NPY", help="68 landmarks of the source photo")
    p.add_argument("--camera", default="0", help="camera index or a video file/URL (default: 0)")
    p.add_argument("--virtual-camera", action="store_true", help="send to a virtual camera instead of a window")
    p.add_argument("--side-by-side", action="store_true", help="show camera | result")
    p.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames")
    _add_engine_arguments(p)
    _add_detection_arguments(p)
    p.set_defaults(handler=cmd_webcam)

    p = commands.add_parser("info", help="what is usable here (backends, devices, detectors) and why not")
    p.set_defaults(handler=cmd_info)
    return parser


# --------------------------------------------------------------------------- entry point


@contextlib.contextmanager
def _cli_logging(debug: bool, quiet: bool):
    """Log lines as ``pybilayer: ...`` on stderr while a command runs; afterwards the "pybilayer" logger is
    as it was, so calling main() from Python (or a test) leaves no handler behind on a closed stream."""
    logger = logging.getLogger("pybilayer")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    logger.handlers = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers, level, logger.propagate = saved[0], saved[1], saved[2]
        logger.setLevel(level)


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"


def _error_message(exc: BaseException) -> tuple[str, int]:
    if isinstance(exc, UsageError):
        return str(exc), 2
    if isinstance(exc, PybilayerError):
        return str(exc), 1
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return f"{where}{exc.strerror or exc}", 1
    if isinstance(exc, (ValueError, TypeError)):
        return str(exc), 1
    if isinstance(exc, MemoryError):
        return "out of memory", 1
    return f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 1 failure, 2 bad usage, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        with _cli_logging(args.debug, args.quiet):
            return int(args.handler(args) or 0)
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted (no partial output was kept)", file=sys.stderr)
        return 130
    except BaseException as exc:  # noqa: BLE001 - the one place every failure becomes one line
        if debug:
            import traceback

            traceback.print_exc()
        message, status = _error_message(exc)
        print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
        return status
