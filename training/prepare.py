"""Turn a folder of videos or image sequences into the official training layout.

    python training/prepare.py INPUT_DIR DATA_ROOT [--split train] [--size 256] [--every 1]
        [--detector auto] [--masks auto|mediapipe|none]

Inputs: every video file (.mp4 .avi .mov .mkv .webm) and every directory of images found under
INPUT_DIR. A clip at INPUT_DIR/PERSON/CLIP becomes PERSON/CLIP; one directly in INPUT_DIR becomes
CLIP/CLIP. Per frame: 68 landmarks (pybilayer.landmarks; the largest face), the official crop
(pybilayer.geometry.crop_box, black outside the frame, bicubic to ``--size``), the keypoints in pixels
of the stored crop, and a soft person mask from MediaPipe selfie segmentation when it is installed.
Frames without a face end the current sequence (SEQ); the next face starts a new one.

Output: DATA_ROOT/{imgs,keypoints,segs}/SPLIT/PERSON/CLIP/SEQ/FRAME.{jpg,npy,png}. Every file is
written atomically, and a clip is marked done (DATA_ROOT/.prepare/...) only when it is complete, so
an interrupted run resumes where it stopped. Unreadable inputs and frames without a face are skipped
with the reason logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pybilayer.fileio import atomic_path  # noqa: E402

log = logging.getLogger("pybilayer.prepare")

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
JPEG_QUALITY = 95


@dataclass(frozen=True)
class ClipSource:
    person: str
    video: str
    path: Path  # a video file or a directory of images

    @property
    def name(self) -> str:
        return f"{self.person}/{self.video}"


def discover_inputs(input_root: str | Path) -> list[ClipSource]:
    """Video files and image directories under ``input_root``, named PERSON/VIDEO (sorted)."""
    root = Path(input_root)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {str(root)!r} does not exist")
    sources = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
            pass
        elif path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir() if p.is_file()):
            pass
        else:
            continue
        relative = path.relative_to(root)
        video = relative.stem if path.is_file() else relative.name
        person = relative.parts[0] if len(relative.parts) > 1 else video
        sources.append(ClipSource(_safe(person), _safe(video), path))
    return sources


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def iter_frames(source: Path) -> Iterator[tuple[int, np.ndarray]]:
    """(index, uint8 RGB HxWx3) of a video file or of the sorted images of a directory.

    An unreadable image in a sequence is skipped (logged); an unreadable video raises MediaError."""
    from pybilayer.errors import MediaError
    from pybilayer.video import VideoReader, read_image

    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for index, path in enumerate(files):
            try:
                yield index, read_image(path)
            except MediaError as exc:
                log.warning("prepare: skipped an unreadable image: %s", exc)
        return
    with VideoReader(source) as reader:
        yield from enumerate(reader)


class SelfieSegmenter:
    """MediaPipe selfie segmentation (model inside the wheel): a soft person mask in [0, 1]."""

    def __init__(self) -> None:
        from mediapipe.python.solutions import selfie_segmentation

        self._model = selfie_segmentation.SelfieSegmentation(model_selection=0)

    def __call__(self, image_uint8: np.ndarray) -> np.ndarray:
        result = self._model.process(np.ascontiguousarray(image_uint8))
        if result.segmentation_mask is None:
            return np.zeros(image_uint8.shape[:2], np.float32)
        return np.clip(result.segmentation_mask.astype(np.float32), 0.0, 1.0)

    def close(self) -> None:
        self._model.close()


def create_segmenter(kind: str) -> Optional[SelfieSegmenter]:
    """``"none"``: no masks; ``"mediapipe"``: required; ``"auto"``: MediaPipe if importable."""
    if kind == "none":
        return None
    try:
        return SelfieSegmenter()
    except ImportError as exc:
        if kind == "mediapipe":
            raise RuntimeError(f"--masks mediapipe needs mediapipe==0.10.21 ({exc})") from exc
        log.warning("prepare: mediapipe is not installed; writing no segs tree (masks are optional)")
        return None


def crop_frame(image: np.ndarray, landmarks_px: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The official crop (uint8 size x size x 3) and the landmarks in pixels of that crop (68, 2)."""
    from pybilayer.geometry import crop_box, crop_image, normalize_keypoints

    box = crop_box(landmarks_px)
    crop = crop_image(image, box, size)
    keypoints = (normalize_keypoints(landmarks_px, box) + 1.0) / 2.0 * size
    return crop, keypoints.astype(np.float32)


def _atomic(path: Path, write) -> None:
    with atomic_path(path, make_parents=True) as tmp:
        write(Path(tmp))


def write_sample(root: Path, split: str, name: str, seq: str, frame: str, crop: np.ndarray,
                 keypoints_px: np.ndarray, mask: Optional[np.ndarray]) -> None:
    """One frame of the layout: imgs .jpg, keypoints .npy (68, 2) float32 pixels, segs .png ('L')."""
    from PIL import Image

    stem = Path(split) / name / seq / frame

    def save_jpg(tmp: Path) -> None:
        Image.fromarray(crop).save(tmp, format="JPEG", quality=JPEG_QUALITY)

    def save_npy(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(keypoints_px, np.float32))

    _atomic(root / "imgs" / stem.with_suffix(".jpg"), save_jpg)
    _atomic(root / "keypoints" / stem.with_suffix(".npy"), save_npy)
    if mask is not None:
        mask_u8 = np.clip(np.round(np.asarray(mask, np.float32) * 255.0), 0, 255).astype(np.uint8)
        _atomic(root / "segs" / stem.with_suffix(".png"), lambda tmp: Image.fromarray(mask_u8, mode="L").save(tmp, format="PNG"))


@dataclass
class ClipReport:
    frames_read: int = 0
    frames_written: int = 0
    faceless: int = 0
    sequences: int = 0
    error: Optional[str] = None


def prepare_clip(source: ClipSource, root: Path, split: str, detector, segmenter, size: int, every: int,
                 max_frames: Optional[int] = None) -> ClipReport:
    from pybilayer.errors import NoFaceError
    from pybilayer.landmarks import detect_one

    report = ClipReport()
    seq_index, in_sequence = 0, False
    try:
        for index, image in iter_frames(source.path):
            if index % every:
                continue
            if max_frames is not None and report.frames_read >= max_frames:
                break
            report.frames_read += 1
            try:
                landmarks = detect_one(image, detector=detector)
            except NoFaceError:
                report.faceless += 1
                if in_sequence:
                    seq_index, in_sequence = seq_index + 1, False
                continue
            crop, keypoints = crop_frame(image, landmarks, size)
            mask = segmenter(crop) if segmenter is not None else None
            write_sample(root, split, source.name, f"{seq_index:05d}", f"{index:06d}", crop, keypoints, mask)
            report.frames_written += 1
            in_sequence = True
    except (OSError, ValueError) as exc:
        report.error = f"{type(exc).__name__}: {exc}"
    report.sequences = seq_index + (1 if in_sequence else 0)
    return report


def _marker(root: Path, split: str, source: ClipSource) -> Path:
    return root / ".prepare" / split / source.person / f"{source.video}.json"


def prepare(input_root: str | Path, data_root: str | Path, split: str = "train", size: int = 256, every: int = 1,
            detector: str | object = "auto", masks: str = "auto", max_frames: Optional[int] = None,
            progress: bool = True) -> dict[str, ClipReport]:
    """Prepare every clip under ``input_root``; clips already marked done are skipped (resume)."""
    from pybilayer.landmarks import create_detector

    root = Path(data_root)
    sources = discover_inputs(input_root)
    if not sources:
        raise FileNotFoundError(f"no video file or image folder under {str(input_root)!r}")
    todo = [s for s in sources if not _marker(root, split, s).is_file()]
    if len(todo) < len(sources):
        log.info("prepare: %d of %d clips already done, resuming", len(sources) - len(todo), len(sources))
    detector = create_detector(detector, video=False) if isinstance(detector, str) else detector
    segmenter = create_segmenter(masks)
    reports: dict[str, ClipReport] = {}
    bar = _progress(len(sources), len(sources) - len(todo), progress)
    try:
        for source in todo:
            report = prepare_clip(source, root, split, detector, segmenter, size, every, max_frames)
            reports[source.name] = report
            if report.error:
                log.warning("prepare: %s skipped: unreadable input (%s)", source.path, report.error)
            elif report.frames_written == 0:
                log.warning("prepare: %s skipped: no face in any of its %d frames", source.path, report.frames_read)
            elif report.faceless:
                log.info("prepare: %s: %d of %d frames had no face and were skipped", source.path,
                         report.faceless, report.frames_read)
            _atomic(_marker(root, split, source),
                    lambda tmp, r=report: tmp.write_text(json.dumps(r.__dict__, indent=1)))
            if bar is not None:
                bar.set_postfix_str(source.name)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if segmenter is not None:
            segmenter.close()
    return reports


def _progress(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, unit="clip", desc="prepare")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("input", help="folder of videos and/or image-sequence folders")
    parser.add_argument("data_root", help="output DATA_ROOT (official layout)")
    parser.add_argument("--split", default="train", help="train or test (default train)")
    parser.add_argument("--size", type=int, default=256, help="side of the stored crops (default 256)")
    parser.add_argument("--every", type=int, default=1, help="keep every N-th frame (default 1)")
    parser.add_argument("--max-frames", type=int, default=None, help="at most this many frames read per clip")
    parser.add_argument("--detector", default="auto", help="auto, face-alignment, dlib or mediapipe")
    parser.add_argument("--masks", default="auto", choices=("auto", "mediapipe", "none"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.size < 8 or args.every < 1:
        parser.error("--size must be >= 8 and --every >= 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    reports = prepare(args.input, args.data_root, args.split, args.size, args.every, args.detector, args.masks,
                      args.max_frames, progress=not args.no_progress)
    written = sum(r.frames_written for r in reports.values())
    skipped = sum(1 for r in reports.values() if r.error or r.frames_written == 0)
    log.info("prepare: %d clips processed, %d frames written, %d clips skipped", len(reports), written, skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
