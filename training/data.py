"""The official data layout, read without the official loader's defects.

Layout (official_bilayer.md section 3.4)::

    DATA_ROOT/imgs/SPLIT/PERSON/VIDEO/SEQ/FRAME.jpg       square crop, any size
    DATA_ROOT/keypoints/SPLIT/PERSON/VIDEO/SEQ/FRAME.npy  (>=68, >=2) float, pixels of the stored image
    DATA_ROOT/segs/SPLIT/PERSON/VIDEO/SEQ/FRAME.png       single-channel mask (optional tree)

An item is a PERSON/VIDEO directory; its frames are the SEQ/FRAME names present in every tree.
Frames are drawn with the official low-discrepancy sequence ``cur = (cur + sqrt 5) mod 1``,
``frame = round(cur * (len - 1))``, but statelessly: the official loader advanced ``cur`` inside
``__getitem__``, which differs between DataLoader workers and cannot be resumed. Here the n-th draw
of the whole sample stream is ``frac(offset + n * sqrt 5)``, so a sample is a pure function of its
global number ``g`` (and the seed), and ``g`` is all a checkpoint needs to continue exactly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

log = logging.getLogger("pybilayer.training")

SQRT5 = math.sqrt(5.0)
NUM_KEYPOINTS = 68
TREES = ("imgs", "keypoints", "segs")
SUFFIXES = {"imgs": ".jpg", "keypoints": ".npy", "segs": ".png"}


class CorruptSampleError(ValueError):
    """A frame's image, keypoints or mask cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class VideoItem:
    name: str  # PERSON/VIDEO
    frames: tuple[str, ...]  # SEQ/FRAME stems, sorted


def low_discrepancy_frame(draw: int, num_frames: int, offset: float) -> int:
    """Frame index of the ``draw``-th draw of the official sequence started at ``offset``."""
    cur = math.fmod(offset + (draw + 1) * SQRT5, 1.0)
    return int(round(cur * (num_frames - 1)))


def index_split(root: str | Path, split: str) -> tuple[list[VideoItem], bool]:
    """Items of one split, and whether a segs tree exists. Frames missing from a tree are dropped."""
    root = Path(root)
    img_dir = root / "imgs" / split
    if not img_dir.is_dir():
        raise FileNotFoundError(f"data root {str(root)!r} has no imgs/{split} directory (official layout expected)")
    if not (root / "keypoints" / split).is_dir():
        raise FileNotFoundError(f"data root {str(root)!r} has no keypoints/{split} directory")
    has_segs = (root / "segs" / split).is_dir()
    trees = TREES if has_segs else TREES[:2]
    items = []
    for video_dir in sorted(p for p in img_dir.glob("*/*") if p.is_dir()):
        name = video_dir.relative_to(img_dir).as_posix()
        stems = None
        for tree in trees:
            base = root / tree / split / name
            found = {p.relative_to(base).with_suffix("").as_posix() for p in base.glob(f"*/*{SUFFIXES[tree]}")}
            stems = found if stems is None else stems & found
        if stems:
            items.append(VideoItem(name, tuple(sorted(stems))))
        else:
            log.warning("data: %s/%s has no frame present in all of %s; skipped", split, name, list(trees))
    if not items:
        raise FileNotFoundError(f"data root {str(root)!r}: split {split!r} holds no usable PERSON/VIDEO item")
    return items, has_segs


def load_image(path: Path, size: int) -> tuple[torch.Tensor, int]:
    """(3, size, size) float in [-1, 1] (bicubic resize) and the stored side length."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            width, height = img.size
            if width != height:
                raise CorruptSampleError(f"{path}: image is {width}x{height}, the layout stores square crops")
            if width != size:
                img = img.resize((size, size), Image.BICUBIC)
            array = np.asarray(img, dtype=np.float32)
    except CorruptSampleError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:  # PIL: UnidentifiedImageError is an OSError
        raise CorruptSampleError(f"{path}: unreadable image ({exc})") from exc
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).contiguous(), width


def load_keypoints(path: Path, side: int) -> torch.Tensor:
    """(68, 2) float in [-1, 1]: the first 68 rows and x, y columns, divided by the image side."""
    try:
        points = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CorruptSampleError(f"{path}: unreadable keypoints ({exc})") from exc
    if points.ndim != 2 or points.shape[0] < NUM_KEYPOINTS or points.shape[1] < 2:
        raise CorruptSampleError(f"{path}: keypoints must be (>=68, >=2), got shape {points.shape}")
    points = points[:NUM_KEYPOINTS, :2].astype(np.float32)
    if not np.isfinite(points).all():
        raise CorruptSampleError(f"{path}: keypoints hold NaN or inf")
    return torch.from_numpy((points / side - 0.5) * 2.0)


def load_mask(path: Path, size: int) -> torch.Tensor:
    """(1, size, size) float in [0, 1]. RGB files are accepted only when their channels agree."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "1", "I", "I;16", "F"):
                channels = np.asarray(img.convert("RGB"))
                if not (np.array_equal(channels[..., 0], channels[..., 1]) and np.array_equal(channels[..., 0], channels[..., 2])):
                    raise CorruptSampleError(
                        f"{path}: segmentation must be single-channel (got mode {img.mode} with differing "
                        "channels, e.g. a colour-coded parsing map; save the foreground probability as 'L')"
                    )
            img = img.convert("L")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BICUBIC)
            array = np.asarray(img, dtype=np.float32) / 255.0
    except CorruptSampleError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptSampleError(f"{path}: unreadable mask ({exc})") from exc
    return torch.from_numpy(np.clip(array, 0.0, 1.0))[None]


class BilayerFrames(Dataset):
    """Samples of ``num_frames`` frames (source first, then targets) of one PERSON/VIDEO item.

    ``dataset[g]`` is the g-th sample of an endless, epoch-shuffled stream: epoch ``g // len(items)``,
    item ``permutation(seed, epoch)[g % len(items)]`` (the test split is not shuffled and its draws
    start at 0, as released). A corrupt frame is skipped with a warning: the sample moves to the
    next item, up to ``max_retries`` times.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int,
        num_frames: int = 2,
        shuffle: bool = True,
        seed: int = 0,
        max_retries: int = 8,
        with_stickmen: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.num_frames = num_frames
        self.shuffle = shuffle
        self.seed = seed
        self.max_retries = max_retries
        self.with_stickmen = with_stickmen  # the official stickman of each frame's keypoints (drawn here, in workers)
        self.items, self.has_masks = index_split(self.root, split)
        # The official training sequence starts at a random point; the test one at 0.
        self.offset = float(np.random.default_rng(seed).random()) if shuffle else 0.0

    @property
    def num_items(self) -> int:
        return len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def item_index(self, g: int) -> int:
        epoch, position = divmod(g, len(self.items))
        if not self.shuffle:
            return position
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
        return int(order[position])

    def load_frame(self, item: VideoItem, stem: str) -> dict:
        image, side = load_image(self.root / "imgs" / self.split / item.name / f"{stem}.jpg", self.image_size)
        keypoints = load_keypoints(self.root / "keypoints" / self.split / item.name / f"{stem}.npy", side)
        if self.has_masks:
            mask = load_mask(self.root / "segs" / self.split / item.name / f"{stem}.png", self.image_size)
        else:
            mask = torch.ones(1, self.image_size, self.image_size)
        frame = {"image": image, "keypoints": keypoints, "mask": mask}
        if self.with_stickmen:
            from pybilayer.geometry import draw_stickman

            frame["stickman"] = torch.from_numpy(draw_stickman(keypoints.numpy(), self.image_size))
        return frame

    def __getitem__(self, g: int) -> dict:
        index = self.item_index(int(g))
        errors = []
        for attempt in range(self.max_retries + 1):
            item = self.items[(index + attempt) % len(self.items)]
            draws = [int(g) * self.num_frames + k for k in range(self.num_frames)]
            frames = [item.frames[low_discrepancy_frame(d, len(item.frames), self.offset)] for d in draws]
            try:
                loaded = [self.load_frame(item, stem) for stem in frames]
            except CorruptSampleError as exc:
                log.warning("data: skipping corrupt sample: %s", exc)
                errors.append(str(exc))
                continue
            return {key: torch.stack([f[key] for f in loaded]) for key in loaded[0]}
        raise CorruptSampleError(f"{self.max_retries + 1} consecutive corrupt samples; last: {errors[-1]}")


class StreamBatchSampler(Sampler[list[int]]):
    """Batches of global sample numbers for one rank, starting at ``start_step``.

    Step s of a run with global batch G takes samples [s*G, (s+1)*G); rank r of W takes its
    contiguous share, so W processes see together exactly the batch that one process would.
    """

    def __init__(self, global_batch: int, rank: int, world_size: int, start_step: int = 0,
                 num_steps: Optional[int] = None) -> None:
        if global_batch % world_size:
            raise ValueError(f"batch_size {global_batch} is not divisible by the {world_size} processes")
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.start_step = start_step
        self.num_steps = num_steps

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            first = step * self.global_batch + self.rank * self.local_batch
            yield list(range(first, first + self.local_batch))
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless StreamBatchSampler has no length")
        return self.num_steps
