"""Procedural scenes for the demo model: 1-3 flat-coloured shapes on a black background, a caption
naming them, and an exact mask per object.

Every scene is a pure function of ``(seed, index)``, so a data set is reproducible and can be
indexed without generating what comes before. Pixels are rasterised at their centres without
anti-aliasing, so each object's mask is exactly the set of pixels painted in its colour.

Within a scene colours are distinct and shapes are distinct, so each colour word and each shape
word occurs at most once in a caption and names exactly one object (a word map then has one
unambiguous ground-truth mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "SIZE",
    "BACKGROUND",
    "COLOURS",
    "SHAPES",
    "Obj",
    "Scene",
    "caption_for",
    "render",
    "random_scene",
    "make_dataset",
    "segment_by_colour",
]

SIZE = 32
BACKGROUND = (0, 0, 0)
# Saturated and far apart in RGB, so nearest-colour segmentation of a generated image is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 235),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
_MIN_R, _MAX_R = 4.0, 7.0  # object "radius" in pixels: 8-14 px wide on a 32 px canvas


@dataclass(frozen=True)
class Obj:
    """One object: its colour and shape names, centre (x, y) and radius in pixels."""

    colour: str
    shape: str
    cx: float
    cy: float
    r: float


@dataclass
class Scene:
    """A rendered scene.

    ``image``: uint8 ``[SIZE, SIZE, 3]``; ``masks``: bool ``[n_objects, SIZE, SIZE]``, disjoint,
    in the order of ``objects`` (which is also the caption's order).
    """

    objects: list[Obj]
    caption: str
    image: np.ndarray
    masks: np.ndarray

    def word_masks(self) -> dict[str, np.ndarray]:
        """Ground-truth mask (bool ``[SIZE, SIZE]``) of every colour and shape word in the caption."""
        out: dict[str, np.ndarray] = {}
        for obj, m in zip(self.objects, self.masks, strict=True):
            out[obj.colour] = m
            out[obj.shape] = m
        return out


def caption_for(objects: list[Obj] | list[tuple[str, str]]) -> str:
    """``"a red circle and a blue square"``: objects in the given order, joined by "and"."""
    pairs = [(o.colour, o.shape) if isinstance(o, Obj) else tuple(o) for o in objects]
    return " and ".join(f"a {c} {s}" for c, s in pairs)


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    # Pixel centres at +0.5, so a shape's mask does not depend on sub-pixel conventions elsewhere.
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        s = 0.85 * r  # a little smaller than the circle's bounding box, so the areas are comparable
        return (np.abs(x - cx) <= s) & (np.abs(y - cy) <= s)
    if shape == "triangle":
        # Upright isosceles triangle: apex (cx, cy - r), base from (cx - r, cy + 0.8 r) to (cx + r, cy + 0.8 r).
        top, base = cy - r, cy + 0.8 * r
        half_width = r * (y - top) / (base - top)
        return (y >= top) & (y <= base) & (np.abs(x - cx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(objects: list[Obj], size: int = SIZE) -> Scene:
    """Paint ``objects`` on the background. Raises ``ValueError`` if two of them overlap."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    masks = np.zeros((len(objects), size, size), bool)
    for i, o in enumerate(objects):
        m = _shape_mask(o.shape, o.cx, o.cy, o.r, size)
        if (m & masks[:i].any(0)).any():
            raise ValueError(f"object {i} ({o.colour} {o.shape}) overlaps an earlier one")
        masks[i] = m
        image[m] = COLOURS[o.colour]
    return Scene(list(objects), caption_for(objects), image, masks)


def _dilate(m: np.ndarray) -> np.ndarray:
    d = m.copy()
    d[1:] |= m[:-1]
    d[:-1] |= m[1:]
    d[:, 1:] |= m[:, :-1]
    d[:, :-1] |= m[:, 1:]
    return d


def random_scene(seed: int, index: int = 0, n_objects: int | None = None, size: int = SIZE) -> Scene:
    """The scene number ``index`` of the data set ``seed``: 1-3 objects (or ``n_objects``), distinct
    colours and shapes, at least one background pixel between any two objects, in random order."""
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    if not 1 <= n <= len(SHAPES):
        raise ValueError(f"n_objects must be in 1..{len(SHAPES)}, got {n}")
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    shapes = rng.choice(SHAPES, size=n, replace=False)
    while True:  # rejection sampling; three objects of <= 14 px fit on 32 px in a few tries
        objs, taken = [], np.zeros((size, size), bool)
        for c, s in zip(colours, shapes, strict=True):
            r = float(rng.uniform(_MIN_R, _MAX_R))
            for _ in range(50):
                cx, cy = rng.uniform(r, size - r, size=2)
                m = _shape_mask(str(s), float(cx), float(cy), r, size)
                if not (_dilate(m) & taken).any():
                    break
            else:
                break
            objs.append(Obj(str(c), str(s), float(cx), float(cy), r))
            taken |= m
        if len(objs) == n:
            return render(objs, size)


def make_dataset(n: int, seed: int, size: int = SIZE):
    """``n`` scenes of data set ``seed`` as arrays.

    Returns ``(images, labels, captions, objects)``: images uint8 ``[n, size, size, 3]``; labels int8
    ``[n, size, size]`` with -1 for background and k for the k-th object of the caption; captions a
    list of str; objects a list of lists of :class:`Obj`.
    """
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.full((n, size, size), -1, np.int8)
    captions, objects = [], []
    for i in range(n):
        sc = random_scene(seed, i, size=size)
        images[i] = sc.image
        for k, m in enumerate(sc.masks):
            labels[i][m] = k
        captions.append(sc.caption)
        objects.append(sc.objects)
    return images, labels, captions, objects


def segment_by_colour(image: np.ndarray, max_dist: float = 120.0) -> dict[str, np.ndarray]:
    """Masks of a (generated) image by nearest palette colour.

    ``image``: uint8 ``[H, W, 3]``. Returns ``{colour name: bool [H, W]}`` for every palette colour;
    a pixel belongs to the colour nearest to it in RGB, or to none (background) if the background
    is nearer or the nearest colour is further than ``max_dist``.
    """
    names = ["background", *COLOURS]
    palette = np.array([BACKGROUND, *COLOURS.values()], np.float64)
    d = np.linalg.norm(image.astype(np.float64)[:, :, None, :] - palette[None, None], axis=-1)
    nearest = d.argmin(-1)
    ok = d.min(-1) <= max_dist
    return {name: (nearest == i) & ok for i, name in enumerate(names) if i > 0}
