"""Video and image input/output through PyAV (which bundles FFmpeg).

- :class:`VideoReader` yields uint8 RGB (H, W, 3) frames; anything unreadable raises MediaError.
- :class:`VideoWriter` encodes H.264 into .mp4/.mov/.mkv atomically: frames go to a temporary file in the
  destination's directory, the driver's audio (if any) is added at the end, and only then is the file
  renamed to its final name (``os.replace``). An interrupted run leaves nothing under the final name.
- :func:`read_image`, :func:`write_image`, :func:`side_by_side`, :func:`add_caption` for the CLI.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .errors import MediaError
from .fileio import atomic_path

VIDEO_CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}
# Audio codecs each container takes as they are; anything else is re-encoded to AAC.
_COPYABLE_AUDIO = {
    "mp4": {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"},
    "mov": {"aac", "mp3", "alac", "ac3", "pcm_s16le", "pcm_s24le"},
    "matroska": None,  # takes everything
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def _av():
    try:
        import av
    except ImportError as exc:
        raise MediaError("video input/output needs PyAV (pip install av==18.1.0)") from exc
    return av


# --------------------------------------------------------------------------- images


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3); EXIF rotation applied. MediaError if unreadable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MediaError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: not a readable image ({exc})") from exc


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a uint8 RGB image atomically (format from the suffix)."""
    from PIL import Image

    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in IMAGE_SUFFIXES:
        raise MediaError(f"{path}: unsupported image type {suffix!r}; use one of {sorted(IMAGE_SUFFIXES)}")
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format=Image.registered_extensions()[suffix])


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int
    height: int
    fps: float
    frame_count: int  # from the container; an estimate (0 when unknown)
    has_audio: bool


class VideoReader:
    """Decode a video file frame by frame: ``for frame in VideoReader(path)`` -> uint8 RGB (H, W, 3)."""

    def __init__(self, path: str | os.PathLike):
        av = _av()
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise MediaError(f"{self.path}: no such file")
        try:
            self._container = av.open(self.path, "r")
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise MediaError(f"{self.path}: not a readable video ({exc})") from exc
        if not self._container.streams.video:
            self._container.close()
            raise MediaError(f"{self.path}: contains no video stream")
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        frame_count = int(stream.frames or 0)
        if not frame_count:
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = (self._container.duration or 0) / av.time_base
            frame_count = int(round(seconds * float(rate)))
        self.info = VideoInfo(
            path=self.path,
            width=int(stream.codec_context.width),
            height=int(stream.codec_context.height),
            fps=float(rate),
            frame_count=frame_count,
            has_audio=bool(self._container.streams.audio),
        )
        self._stream = stream

    def __iter__(self) -> Iterator[np.ndarray]:
        av = _av()
        try:
            for frame in self._container.decode(self._stream):
                yield frame.to_ndarray(format="rgb24")
        except (av.error.FFmpegError, ValueError) as exc:
            raise MediaError(f"{self.path}: decoding failed ({exc})") from exc

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- writing


def container_for(path: str | os.PathLike) -> str:
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in VIDEO_CONTAINERS:
        raise MediaError(
            f"{path}: unsupported video type {suffix or '(no suffix)'!r}; use one of "
            f"{', '.join(VIDEO_CONTAINERS)}"
        )
    return VIDEO_CONTAINERS[suffix]


class VideoWriter:
    """H.264 video written atomically, with the audio of ``audio_from`` (if it has any) copied in.

    Use as a context manager: a clean exit finishes and renames the file; an exception (Ctrl-C included)
    deletes the temporary file and leaves the final name untouched.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float,
        *,
        audio_from: str | os.PathLike | None = None,
        metadata: dict[str, str] | None = None,
        crf: int = 18,
    ):
        av = _av()
        self.path = os.fspath(path)
        self._format = container_for(self.path)
        if not fps > 0:
            raise MediaError(f"fps must be positive, got {fps}")
        self.fps = Fraction(fps).limit_denominator(1001)
        self.audio_from = os.fspath(audio_from) if audio_from is not None else None
        self.metadata = dict(metadata or {})
        self.frames_written = 0
        self._crf = crf
        self._final = atomic_path(self.path)
        self._video_tmp = atomic_path(self.path)  # video-only stage when audio is muxed in afterwards
        try:
            self._container = av.open(self._video_tmp.tmp, "w", format=self._format)
        except (av.error.FFmpegError, OSError) as exc:
            self._final.discard()
            self._video_tmp.discard()
            raise MediaError(f"{self.path}: cannot write ({exc})") from exc
        self._stream = None
        self._size: tuple[int, int] | None = None

    def write(self, frame: np.ndarray) -> None:
        av = _av()
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise MediaError(f"frame: expected uint8 (H, W, 3) RGB, got {frame.dtype} {frame.shape}")
        # yuv420p needs even sides: replicate the last row/column when odd.
        pad = ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0))
        if any(p[1] for p in pad):
            frame = np.pad(frame, pad, mode="edge")
        height, width = frame.shape[:2]
        if self._stream is None:
            self._stream = self._container.add_stream("libx264", rate=self.fps)
            self._stream.width, self._stream.height = width, height
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self._crf), "preset": "medium"}
            self._size = (width, height)
            for key, value in self.metadata.items():
                self._container.metadata[key] = value
        elif (width, height) != self._size:
            raise MediaError(f"frame {self.frames_written}: size {width}x{height} differs from {self._size}")
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        for packet in self._stream.encode(video_frame):
            self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        """Flush, add the audio, and move the file to its final name."""
        if self.frames_written == 0:
            self.abort()
            raise MediaError(f"{self.path}: no frames to write")
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        if self.audio_from is not None and _has_audio(self.audio_from):
            av = _av()
            try:
                with self._final as tmp:
                    _mux_audio(
                        self._video_tmp.tmp, self.audio_from, tmp, self._format, self.metadata,
                        max_seconds=self.frames_written / float(self.fps),
                    )
            except (av.error.FFmpegError, ValueError) as exc:
                raise MediaError(f"{self.path}: cannot add the audio of {self.audio_from} ({exc})") from exc
            finally:
                self._video_tmp.discard()
        else:
            self._final.discard()
            with self._video_tmp:  # renames the finished video-only file
                pass

    def abort(self) -> None:
        try:
            self._container.close()
        except Exception:  # closing a half-written container may fail; the file goes anyway
            pass
        self._video_tmp.discard()
        self._final.discard()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _has_audio(path: str) -> bool:
    av = _av()
    try:
        with av.open(path, "r") as container:
            return bool(container.streams.audio)
    except (av.error.FFmpegError, OSError):
        return False


def _mux_audio(
    video_path: str, audio_path: str, out_path: str, fmt: str, metadata: dict[str, str], max_seconds: float
) -> None:
    """Remux ``video_path``'s video and ``audio_path``'s first audio stream into ``out_path``.

    The audio is copied when the container takes its codec, else re-encoded to AAC; it is cut at the
    video's length. Packets are interleaved by time so the muxer never buffers a whole stream.
    """
    av = _av()
    with av.open(video_path, "r") as video_in, av.open(audio_path, "r") as audio_in, av.open(
        out_path, "w", format=fmt
    ) as out:
        for key, value in metadata.items():
            out.metadata[key] = value
        video_src = video_in.streams.video[0]
        audio_src = audio_in.streams.audio[0]
        video_dst = out.add_stream_from_template(video_src)
        copyable = _COPYABLE_AUDIO[fmt]
        copy_audio = copyable is None or audio_src.codec_context.name in copyable
        if copy_audio:
            audio_dst = out.add_stream_from_template(audio_src)
        else:
            audio_dst = out.add_stream("aac", rate=audio_src.codec_context.sample_rate or 48000)

        def timed(packets, dst, kind):
            for packet in packets:
                if packet.size == 0:  # the demuxer's end-of-stream packet carries no data
                    continue
                # Matroska stores no dts for some packets; the pts orders them as well for interleaving.
                stamp = packet.dts if packet.dts is not None else packet.pts
                seconds = float(stamp * packet.time_base) if stamp is not None and packet.time_base else 0.0
                yield seconds, kind, packet, dst

        video_packets = timed(video_in.demux(video_src), video_dst, 0)
        if copy_audio:
            audio_packets = timed(audio_in.demux(audio_src), audio_dst, 1)
        else:
            audio_packets = _reencoded_audio(audio_in, audio_src, audio_dst, max_seconds)
        for seconds, kind, packet, dst in heapq.merge(
            video_packets, audio_packets, key=lambda item: (item[0], item[1])
        ):
            if kind == 1 and seconds >= max_seconds:
                continue
            packet.stream = dst
            out.mux(packet)
        if not copy_audio:
            for packet in audio_dst.encode(None):
                if packet.dts is not None and float(packet.dts * packet.time_base) < max_seconds:
                    out.mux(packet)


def _reencoded_audio(audio_in, audio_src, audio_dst, max_seconds: float):
    samples = 0
    for frame in audio_in.decode(audio_src):
        if samples / frame.sample_rate >= max_seconds:
            break
        # Number samples from 0 so the encoder's packets carry timestamps the muxer can interleave.
        frame.pts, frame.time_base = samples, Fraction(1, frame.sample_rate)
        samples += frame.samples
        for packet in audio_dst.encode(frame):
            if packet.dts is None:
                continue
            yield float(packet.dts * packet.time_base), 1, packet, audio_dst


# --------------------------------------------------------------------------- frame helpers


def resize_to_height(image: np.ndarray, height: int) -> np.ndarray:
    from PIL import Image

    if image.shape[0] == height:
        return image
    width = max(1, int(round(image.shape[1] * height / image.shape[0])))
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``left | right``, ``left`` scaled to ``right``'s height."""
    return np.concatenate([resize_to_height(left, right.shape[0]), right], axis=1)


def add_caption(frame: np.ndarray, text: str) -> np.ndarray:
    """The frame with a black strip below it holding ``text`` in white (the picture is not covered)."""
    import cv2

    width = frame.shape[1]
    scale = 0.4
    (text_w, text_h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    # Shrink long captions to fit; below ~0.25 Hershey text is unreadable anyway, so wrap is not attempted.
    if text_w > width - 8:
        scale = max(0.25, scale * (width - 8) / text_w)
        (text_w, text_h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    strip_h = text_h + baseline + 8
    strip_h += strip_h % 2
    strip = np.zeros((strip_h, width, 3), np.uint8)
    cv2.putText(strip, text, (4, 4 + text_h), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([frame, strip], axis=0)
