"""The demo image world: procedurally rendered scenes of one coloured shape, with captions.

Each image shows one main object, a coloured shape of a given kind, size and position, on a
textured background among a few tiny distractor shapes. Its caption names what is in it
("a photo of a large red triangle at the top left on a striped background.") and its class is the
object's colour × shape (8 colours × 6 shapes = 48 classes).

Everything is generated on the fly and is a pure function of ``(seed, split, index)``: no files.

Splits:

- ``train``: the 40 *seen* classes; what the demo CLIP was trained on.
- ``test``: the same 40 classes, new images (held out).
- ``unseen``: the 8 classes in :data:`UNSEEN` (one shape per colour), which never appear in
  ``train``, neither as the main object nor as a distractor nor in a caption: a compositional
  zero-shot test (the model knows "red" and "triangle" only from other combinations).

Labels index :data:`CLASSNAMES` (``colour_index * len(SHAPES) + shape_index``) in every split, so
one 48-way classifier serves all three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image, ImageDraw

from vitclt.errors import VitcltError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 70, 215),
    "yellow": (235, 215, 35),
    "purple": (135, 45, 180),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
"""Colour names and their base RGB; each object jitters around its base."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
"""Shape kinds, in label order within a colour."""

CLASSNAMES: list[str] = [f"{c} {s}" for c in COLOURS for s in SHAPES]
"""Class names in label order: ``"red circle", "red square", ..., "black ring"``."""

UNSEEN: frozenset[tuple[str, str]] = frozenset(
    (colour, SHAPES[(ci + 2) % len(SHAPES)]) for ci, colour in enumerate(COLOURS)
)
"""Held-out (colour, shape) combinations: one per colour, every shape at least once."""

SIZES: dict[str, tuple[float, float]] = {"small": (12.0, 16.0), "large": (20.0, 27.0)}
"""Size words and the range of the object's diameter, in pixels of a 32-pixel image."""

BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "striped", "checkered", "cloudy", "speckled")
"""Background textures; all are low-saturation, mid-luminance, so every colour stands out."""

POSITIONS: tuple[tuple[str, ...], ...] = (
    ("at the top left", "at the top", "at the top right"),
    ("on the left", "in the centre", "on the right"),
    ("at the bottom left", "at the bottom", "at the bottom right"),
)
"""Position phrases by (row, column) of the object's centre in a 3 × 3 grid (see `_third`)."""

PREFIXES: tuple[str, ...] = ("a photo of a", "a picture of a", "an image of a", "a rendering of a")
"""How captions begin; the zero-shot templates use the same openings."""

TEMPLATES: list[str] = [f"{p} {{}}." for p in PREFIXES]
"""Zero-shot prompt templates, matching the captions' style: ``"a photo of a {}."``, ..."""

SPLITS: dict[str, int] = {"train": 0, "test": 1, "unseen": 2}
"""Split names and the code that goes into each image's random seed."""

DEFAULT_SIZES: dict[str, int] = {"train": 1_000_000, "test": 2_000, "unseen": 800}
"""Number of images per split unless asked otherwise (any size works: images are generated)."""

IMAGE_SIZE = 32
"""Side of the rendered images, in pixels."""

_SUPERSAMPLE = 4  # shapes are drawn at 4× and downsampled, for antialiased edges
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
_MIN_DISTRACTOR, _MAX_DISTRACTOR = 4.0, 7.0  # always smaller than the smallest main object

SEEN_LABELS: list[int] = [i for i, n in enumerate(CLASSNAMES) if tuple(n.split()) not in UNSEEN]
"""Labels of the 40 classes that appear in training."""

UNSEEN_LABELS: list[int] = [i for i, n in enumerate(CLASSNAMES) if tuple(n.split()) in UNSEEN]
"""Labels of the 8 held-out classes."""


class WorldError(VitcltError, ValueError):
    """A bad split name, size or spec for the demo world; the message says what is accepted."""


@dataclass(frozen=True)
class Scene:
    """Everything about one image: the main object's attributes, its geometry, and the rest."""

    colour: str
    shape: str
    size: str
    row: int
    col: int
    background: str
    prefix: str
    centre_xy: tuple[float, float]
    diameter: float
    angle: float
    rgb: tuple[int, int, int]
    distractors: tuple[tuple[str, str, float, float, float, float], ...]
    """(colour, shape, x, y, diameter, angle) of each tiny distractor."""

    @property
    def label(self) -> int:
        """Index of the main object's class in :data:`CLASSNAMES`."""
        return CLASSNAMES.index(f"{self.colour} {self.shape}")

    @property
    def position(self) -> str:
        """The position phrase, e.g. ``"at the top left"``."""
        return POSITIONS[self.row][self.col]

    def caption(self, size: bool = True, position: bool = True, background: bool = True) -> str:
        """The caption; colour and shape are always named, the other attributes on request."""
        words = [self.prefix]
        if size:
            words.append(self.size)
        words += [self.colour, self.shape]
        if position:
            words.append(self.position)
        if background:
            words.append(f"on a {self.background} background")
        return " ".join(words) + "."


def sample_scene(rng: np.random.Generator, label: int) -> Scene:
    """Draw the attributes and geometry of a scene whose main object has class `label`."""
    colour, shape = CLASSNAMES[label].split()
    size = ("small", "large")[int(rng.integers(2))]
    diameter = float(rng.uniform(*SIZES[size]))
    # Keep the whole object inside the frame, with a one-pixel margin.
    lo, hi = diameter / 2 + 1, IMAGE_SIZE - diameter / 2 - 1
    cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
    base = np.array(COLOURS[colour], dtype=np.float64)
    rgb = np.clip(base * rng.uniform(0.85, 1.1) + rng.normal(0, 10, size=3), 0, 255)
    distractors = []
    for _ in range(int(rng.integers(0, 4))):
        d_label = SEEN_LABELS[int(rng.integers(len(SEEN_LABELS)))]
        d_colour, d_shape = CLASSNAMES[d_label].split()
        d_diam = float(rng.uniform(_MIN_DISTRACTOR, _MAX_DISTRACTOR))
        dx, dy = (float(v) for v in rng.uniform(d_diam / 2, IMAGE_SIZE - d_diam / 2, size=2))
        distractors.append((d_colour, d_shape, dx, dy, d_diam, float(rng.uniform(0, 360))))
    return Scene(
        colour=colour,
        shape=shape,
        size=size,
        row=_third((cy - lo) / (hi - lo)),
        col=_third((cx - lo) / (hi - lo)),
        background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        prefix=PREFIXES[int(rng.integers(len(PREFIXES)))],
        centre_xy=(cx, cy),
        diameter=diameter,
        angle=float(rng.uniform(0, 360)),
        rgb=tuple(int(v) for v in rgb),
        distractors=tuple(distractors),
    )


def _third(t: float) -> int:
    """Which third (0, 1, 2) a position in [0, 1] falls in.

    Positions are relative to the range the object's centre can take, so large objects, which can
    move only a few pixels, are spread over the nine position phrases as evenly as small ones.
    """
    return min(int(t * 3), 2)


def _shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape with circumradius `radius`, rotated by `angle` degrees."""
    if shape == "square":
        pts = [(math.cos(math.radians(45 + 90 * k)), math.sin(math.radians(45 + 90 * k))) for k in range(4)]
        scale = 0.9  # a square of circumradius r looks larger than a circle of radius r
        pts = [(scale * x, scale * y) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(math.radians(-90 + 120 * k)), math.sin(math.radians(-90 + 120 * k))) for k in range(3)]
        pts = [(x, y + 0.2) for x, y in pts]  # centre the bounding box, not the centroid
    elif shape == "star":
        pts = [
            ((1.0 if k % 2 == 0 else 0.42) * math.cos(math.radians(-90 + 36 * k)),
             (1.0 if k % 2 == 0 else 0.42) * math.sin(math.radians(-90 + 36 * k)))
            for k in range(10)
        ]
    elif shape == "cross":
        a, w = 1.0, 0.34
        pts = [(w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w), (-w, -a)]
    else:
        raise WorldError(f"unknown polygonal shape {shape!r}")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + radius * (c * x - s * y), cy + radius * (s * x + c * y)) for x, y in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, diameter: float, angle: float) -> None:
    """Draw `shape` as a filled 255-valued mask (coordinates already at drawing scale)."""
    r = diameter / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ri = 0.55 * r
        draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, angle), fill=255)


def _mask(shape: str, cx: float, cy: float, diameter: float, angle: float) -> np.ndarray:
    """Antialiased coverage of one shape as a (H, W) float array in [0, 1]."""
    k = _SUPERSAMPLE
    big = Image.new("L", (IMAGE_SIZE * k, IMAGE_SIZE * k), 0)
    _draw_shape(ImageDraw.Draw(big), shape, cx * k, cy * k, diameter * k, angle)
    return np.asarray(big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.float32) / 255.0


def object_mask(scene: Scene) -> np.ndarray:
    """Coverage of the scene's main object as a (H, W) float array in [0, 1] (what `render` blends with)."""
    return _mask(scene.shape, *scene.centre_xy, scene.diameter, scene.angle)


def _background(rng: np.random.Generator, kind: str) -> np.ndarray:
    """A (H, W, 3) float background texture: muted colours around mid grey, plus pixel noise."""
    n = IMAGE_SIZE
    base = rng.uniform(85, 170) + rng.normal(0, 12, size=3)
    other = rng.uniform(85, 170) + rng.normal(0, 12, size=3)
    yy, xx = _YY / n, _XX / n
    if kind == "plain":
        t = np.zeros((n, n), np.float32)
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        t = np.clip((np.cos(theta) * (xx - 0.5) + np.sin(theta) * (yy - 0.5)) + 0.5, 0, 1)
    elif kind == "striped":
        theta, period = rng.uniform(0, np.pi), rng.uniform(0.15, 0.3)
        t = (np.sin(2 * np.pi * (np.cos(theta) * xx + np.sin(theta) * yy) / period) > 0).astype(np.float32)
    elif kind == "checkered":
        cells = int(rng.integers(3, 7))
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float32)
    elif kind == "cloudy":
        coarse = rng.uniform(0, 1, size=(5, 5)).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse, mode="F").resize((n, n), Image.Resampling.BICUBIC))
        t = np.clip(t, 0, 1)
    elif kind == "speckled":
        t = (rng.uniform(0, 1, size=(n, n)) < 0.15).astype(np.float32)
    else:
        raise WorldError(f"unknown background {kind!r}")
    img = base[None, None, :] * (1 - t[..., None]) + other[None, None, :] * t[..., None]
    return img + rng.normal(0, 8, size=(n, n, 3))


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Render `scene` into a 32 × 32 RGB image; `rng` supplies the texture and pixel noise."""
    img = _background(rng, scene.background)
    for colour, shape, x, y, d, angle in scene.distractors:
        alpha = _mask(shape, x, y, d, angle)[..., None]
        img = img * (1 - alpha) + np.array(COLOURS[colour], np.float32) * alpha
    alpha = _mask(scene.shape, *scene.centre_xy, scene.diameter, scene.angle)[..., None]
    # A soft light gradient across the object, so its colour is not one flat value.
    shade = 1 + 0.12 * ((_XX - scene.centre_xy[0]) - (_YY - scene.centre_xy[1])) / max(scene.diameter, 1.0)
    obj = np.array(scene.rgb, np.float32)[None, None, :] * shade[..., None]
    obj = obj + rng.normal(0, 6, size=obj.shape)
    img = img * (1 - alpha) + obj * alpha
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")


class DemoWorld:
    """One split of the demo world: a sized, indexable dataset of ``(PIL RGB image, label)``.

    Image `i` is generated from ``numpy.random.default_rng([seed, split code, i])`` on every
    access, so the same ``(seed, split, i)`` always gives the same image bytes. Labels cycle
    through the split's classes (``classes[i % n_classes]``), so every prefix of a split is
    class-balanced.
    """

    template_set = "demo"
    """Name of this world's prompt templates (the list itself is :attr:`templates`)."""

    def __init__(self, split: str = "test", size: int | None = None, seed: int = 0):
        key = {"val": "test"}.get(split.lower(), split.lower())
        if key not in SPLITS:
            raise WorldError(f"unknown demo split {split!r}: expected one of {sorted(SPLITS)} ('val' means 'test')")
        n = DEFAULT_SIZES[key] if size is None else int(size)
        if n <= 0:
            raise WorldError(f"demo world size must be positive, got {size}")
        self.split = key
        self.seed = int(seed)
        self.n = n
        self.name = f"demo-{key}"
        self.classnames: list[str] = list(CLASSNAMES)
        self.templates: list[str] = list(TEMPLATES)
        self.split_labels: list[int] = list(UNSEEN_LABELS if key == "unseen" else SEEN_LABELS)

    def __len__(self) -> int:
        return self.n

    def label(self, i: int) -> int:
        """Class of image `i`, without rendering it."""
        return self.split_labels[self._index(i) % len(self.split_labels)]

    @cached_property
    def labels(self) -> np.ndarray:
        """Label of every image, in order (int64)."""
        k = np.asarray(self.split_labels, dtype=np.int64)
        return k[np.arange(self.n) % len(k)]

    def _index(self, i: int) -> int:
        i = int(i)
        if not -self.n <= i < self.n:
            raise IndexError(f"{self.name}: index {i} out of range for {self.n} images")
        return i % self.n

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS[self.split], self._index(i)])

    def scene(self, i: int) -> Scene:
        """The attributes and geometry of image `i`."""
        return sample_scene(self._rng(i), self.label(i))

    def caption(self, i: int) -> str:
        """The full caption of image `i`, naming size, colour, shape, position and background."""
        return self.scene(i).caption()

    def item(self, i: int) -> tuple[Image.Image, Scene]:
        """Image `i` together with its scene (cheaper than `self[i]` plus `self.scene(i)`)."""
        rng = self._rng(i)
        scene = sample_scene(rng, self.label(i))
        return render(scene, rng), scene

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        image, scene = self.item(i)
        return image, scene.label

    def __repr__(self) -> str:
        return f"DemoWorld(split={self.split!r}, size={self.n}, seed={self.seed})"


def load_demo_world(argument: str = "", split: str = "test", size: int | None = None, world_seed: int = 0) -> DemoWorld:
    """Dataset-registry entry for ``demo`` / ``demo:SPLIT``: the split in the spec wins over `split`."""
    return DemoWorld(argument or split, size=size, seed=world_seed)

