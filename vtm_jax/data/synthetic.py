"""Procedural videos whose class is the motion: a TFDS builder that needs no download.

Every video shows a static background of large regions, each either one flat colour or a fine
stripe or checker texture, a static distractor shape, and one shape moving in a straight line
with wrap-around. The class is the direction (left, right, up, down) times the speed (slow,
fast). The start position, shapes, colours and background are drawn independently of the
class, so any single frame is distributed the same for every class: only the change between
frames tells the class. The flat and repeated regions, and the static background, give token
merging real spatial and temporal redundancy to exploit.

Generation is numpy only and deterministic: example ``i`` of a split depends only on
``(seed, split, i)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SPEEDS = ("slow", "fast")
CLASS_NAMES = tuple(f"{d}_{s}" for s in SPEEDS for d in DIRECTIONS)
SHAPES = ("square", "disc", "diamond")
# Saturated object colours, far from the muted background colours.
PALETTE = np.array(
    [[230, 40, 40], [40, 200, 40], [40, 80, 235], [235, 220, 40], [220, 40, 220], [40, 220, 225]],
    np.uint8,
)
_SPLIT_CODES = {"train": 0, "test": 1}


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
    """Video length and size, examples per split, and the seed."""

    frames: int = 16
    size: int = 32
    train_examples: int = 512
    test_examples: int = 128
    seed: int = 0
    object_scale: float = 0.1


def make_config(
    frames: int = 16,
    size: int = 32,
    train_examples: int = 512,
    test_examples: int = 128,
    seed: int = 0,
    object_scale: float = 0.1,
) -> SyntheticConfig:
    """A config named after its values, so that each variant is built in its own directory.

    ``object_scale`` is the shapes' radius as a fraction of the frame size.
    """
    if not 0 < object_scale <= 0.5:
        raise ValueError(f"object_scale must be in (0, 0.5], not {object_scale}")
    name = f"f{frames}_s{size}_n{train_examples}-{test_examples}_seed{seed}"
    if object_scale != 0.1:
        name += f"_obj{object_scale:g}"
    return SyntheticConfig(
        name=name,
        description="moving shapes over textured backgrounds; the class is the motion",
        frames=frames,
        size=size,
        train_examples=train_examples,
        test_examples=test_examples,
        seed=seed,
        object_scale=object_scale,
    )


def motion(label: int, size: int) -> tuple[int, int]:
    """Per-frame displacement ``(dy, dx)`` in pixels of class ``label``."""
    direction = DIRECTIONS[CLASS_NAMES[label].split("_")[0]]
    step = max(1, size // 32) * (1 if label < len(DIRECTIONS) else 2)
    return direction[0] * step, direction[1] * step


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Four large regions split at random lines, each flat or finely textured."""
    image = np.empty((size, size, 3), np.float32)
    cut_y = int(rng.integers(size // 4, 3 * size // 4 + 1))
    cut_x = int(rng.integers(size // 4, 3 * size // 4 + 1))
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(2, size // 8)
    for ys in (slice(0, cut_y), slice(cut_y, size)):
        for xs in (slice(0, cut_x), slice(cut_x, size)):
            base = rng.uniform(70, 170, 3)
            kind = rng.integers(0, 4)  # flat, horizontal stripes, vertical stripes, checker
            if kind == 0:
                image[ys, xs] = base
                continue
            phase = {1: yy // period, 2: xx // period, 3: yy // period + xx // period}[int(kind)]
            contrast = rng.uniform(15, 35)
            image[ys, xs] = base + contrast * ((phase[ys, xs] % 2)[..., None] - 0.5)
    return image


def _mask(shape: str, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    if shape == "square":
        return np.maximum(np.abs(dy), np.abs(dx)) <= radius
    if shape == "disc":
        return dy**2 + dx**2 <= radius**2
    return np.abs(dy) + np.abs(dx) <= 1.4 * radius


def _offsets(size: int, cy: np.ndarray, cx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Wrapped offsets ``[T, H, W]`` of every pixel from the centres ``(cy[t], cx[t])``."""
    grid = np.arange(size)
    dy = (grid[None, :, None] - cy[:, None, None] + size // 2) % size - size // 2
    dx = (grid[None, None, :] - cx[:, None, None] + size // 2) % size - size // 2
    return dy, dx


def render(
    label: int, rng: np.random.Generator, frames: int, size: int, object_scale: float = 0.1
) -> np.ndarray:
    """One video of class ``label`` as uint8 ``[frames, size, size, 3]``."""
    background = _background(rng, size)
    video = np.broadcast_to(background, (frames, size, size, 3)).copy()
    radius = max(1.5, size * object_scale)
    colours = rng.permutation(len(PALETTE))[:2]
    # The distractor stays where it is; it makes "which shape moves" part of the task.
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    centre = rng.integers(0, size, 2)
    dy, dx = _offsets(size, np.full(frames, centre[0]), np.full(frames, centre[1]))
    video[_mask(shape, dy, dx, radius)] = PALETTE[colours[1]]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    start = rng.integers(0, size, 2)
    step = np.array(motion(label, size))
    t = np.arange(frames)
    dy, dx = _offsets(size, start[0] + step[0] * t, start[1] + step[1] * t)
    video[_mask(shape, dy, dx, radius)] = PALETTE[colours[0]]
    return np.clip(np.round(video), 0, 255).astype(np.uint8)


def generate(split: str, index: int, config: SyntheticConfig) -> dict[str, object]:
    """Example ``index`` of ``split``: classes cycle through the indices, so splits are balanced."""
    label = index % len(CLASS_NAMES)
    rng = np.random.default_rng([config.seed, _SPLIT_CODES[split], index])
    return {
        "video": render(label, rng, config.frames, config.size, config.object_scale),
        "label": label,
        "video_id": f"{split}_{index:06d}",
    }


class SyntheticVideos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Moving-shape videos classified by direction and speed of motion (8 classes)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [make_config()]
    # TFDS finds a checksums file beside a packaged builder's code through `importlib_resources`,
    # which it imports always but declares only for Python < 3.9; nothing is downloaded here.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        shape = (config.frames, config.size, config.size, 3)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "video": tfds.features.Tensor(shape=shape, dtype=np.uint8),
                    "label": tfds.features.Tensor(shape=(), dtype=np.int64),
                    "video_id": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(labels=list(CLASS_NAMES), missing={}),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        config = self.builder_config
        return {
            "train": self._generate_examples("train", config.train_examples),
            "test": self._generate_examples("test", config.test_examples),
        }

    def _generate_examples(self, split: str, count: int) -> Iterator[tuple[int, dict]]:
        for index in range(count):
            yield index, generate(split, index, self.builder_config)
