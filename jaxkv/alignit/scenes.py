"""Procedural scenes for AlignIT's test bed: shapes x colours x sizes x positions x backgrounds,
rendered at 32-64 px, with captions from a small grammar and the ground-truth attributes.

A scene holds one object, or two in opposite positions (left and right, top and bottom; they
never overlap), on a plain background. ``caption(scene)`` writes it in the
grammar

    a {size} {colour} {shape} {position} [and a {size} {colour} {shape} {position}] on a {background} background

(``position``: "on the left", "on the right", "at the top", "at the bottom", "in the middle") and
``parse_caption`` reads it back. ``render(scene, px)`` draws it (anti-aliased by 4x4
supersampling, NumPy). ``TRAIN_SHAPES`` make the generator's training data; ``CONCEPT_SHAPES``
(a star, a heart) are held out of it: they are the concepts a customization method learns from a
handful of images. ``sample_scenes(n, seed)`` draws a reproducible data set.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from jaxkv.errors import UserError

__all__ = ["TRAIN_SHAPES", "CONCEPT_SHAPES", "COLOURS", "SIZES", "POSITIONS", "BACKGROUNDS", "SceneObject", "Scene",
           "caption", "parse_caption", "render", "sample_scene", "sample_scenes", "shape_mask"]

TRAIN_SHAPES = ("circle", "square", "triangle", "cross", "ring")
CONCEPT_SHAPES = ("star", "heart")
COLOURS = {"red": (220, 50, 47), "green": (60, 180, 75), "blue": (50, 90, 230), "yellow": (240, 210, 40),
           "purple": (150, 60, 200), "orange": (245, 130, 30), "white": (245, 245, 245)}
SIZES = {"small": 0.13, "large": 0.21}  # radius, as a share of the image side
_OPPOSITE = {"on the left": "on the right", "on the right": "on the left", "at the top": "at the bottom",
             "at the bottom": "at the top"}  # a second object sits opposite the first: they never overlap
POSITIONS = {"on the left": (0.28, 0.5), "on the right": (0.72, 0.5), "at the top": (0.5, 0.28),
             "at the bottom": (0.5, 0.72), "in the middle": (0.5, 0.5)}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (120, 120, 120), "beige": (225, 210, 170), "teal": (20, 110, 110)}
_SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self):
        for name, value, allowed in (("shape", self.shape, TRAIN_SHAPES + CONCEPT_SHAPES), ("colour", self.colour, COLOURS),
                                     ("size", self.size, SIZES), ("position", self.position, POSITIONS)):
            if value not in allowed:
                raise UserError(f"unknown {name} {value!r}; one of {', '.join(allowed)}")


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str

    def __post_init__(self):
        if not 1 <= len(self.objects) <= 2:
            raise UserError(f"a scene holds one or two objects, got {len(self.objects)}")
        if len(self.objects) == 2 and _OPPOSITE.get(self.objects[0].position) != self.objects[1].position:
            raise UserError("two objects of a scene sit in opposite positions (left and right, or top and bottom)")
        if self.background not in BACKGROUNDS:
            raise UserError(f"unknown background {self.background!r}; one of {', '.join(BACKGROUNDS)}")


def caption(scene: Scene) -> str:
    """The scene in the caption grammar."""
    parts = [f"a {o.size} {o.colour} {o.shape} {o.position}" for o in scene.objects]
    return " and ".join(parts) + f" on a {scene.background} background"


_OBJECT = (r"a (?P<size{i}>{sizes}) (?P<colour{i}>{colours}) (?P<shape{i}>{shapes}) (?P<position{i}>{positions})")


def _pattern() -> re.Pattern:
    alt = lambda xs: "|".join(re.escape(x) for x in xs)  # noqa: E731
    fields = dict(sizes=alt(SIZES), colours=alt(COLOURS), shapes=alt(TRAIN_SHAPES + CONCEPT_SHAPES),
                  positions=alt(POSITIONS))
    one, two = _OBJECT.format(i=0, **fields), _OBJECT.format(i=1, **fields)
    return re.compile(rf"^{one}(?: and {two})? on a (?P<background>{alt(BACKGROUNDS)}) background$")


def parse_caption(text: str) -> Scene:
    """The scene a caption of the grammar describes (a one-line error naming the caption if it
    is not one)."""
    m = _pattern().match(text.strip())
    if m is None:
        raise UserError(f"not a caption of the scene grammar: {text!r}")
    objects = [SceneObject(m[f"shape{i}"], m[f"colour{i}"], m[f"size{i}"], m[f"position{i}"])
               for i in (0, 1) if m[f"shape{i}"]]
    return Scene(tuple(objects), m["background"])


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Inside-ness of ``shape`` at offsets ``(dx, dy)`` from its centre, in units of its radius
    (y grows downwards)."""
    r = np.hypot(dx, dy)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.75
    if shape == "triangle":  # pointing up, base at dy = 0.75
        return (dy <= 0.75) & (dy >= -1.0) & (np.abs(dx) <= (dy + 1.0) * 0.6)
    if shape == "cross":
        return ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 1.0)) | ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 1.0))
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "star":  # five points: the radius swings between 0.45 and 1.0 with the angle
        theta = np.arctan2(dx, -dy)
        return r <= 0.45 + 0.55 * np.abs(np.cos(2.5 * theta)) ** 3
    if shape == "heart":  # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y up, scaled to the radius
        x, y = dx * 1.15, -dy * 1.15 + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    raise UserError(f"unknown shape {shape!r}")


def render(scene: Scene, px: int = 32) -> np.ndarray:
    """The scene as ``uint8 [px, px, 3]`` (anti-aliased: each pixel the mean of 4x4 samples)."""
    if not isinstance(px, int) or not 8 <= px <= 512:
        raise UserError(f"px must be an integer in [8, 512], got {px!r}")
    n = px * _SUPERSAMPLE
    c = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(c, c)
    img = np.broadcast_to(np.array(BACKGROUNDS[scene.background], np.float64), (n, n, 3)).copy()
    for o in scene.objects:
        cx, cy = POSITIONS[o.position]
        rad = SIZES[o.size]
        inside = shape_mask(o.shape, (x - cx) / rad, (y - cy) / rad)
        img[inside] = COLOURS[o.colour]
    img = img.reshape(px, _SUPERSAMPLE, px, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def sample_scene(rng: np.random.Generator, *, shapes: Sequence[str] = TRAIN_SHAPES, two_objects: float = 0.3) -> Scene:
    """One scene: a random object (of ``shapes``), with probability ``two_objects`` a second one
    in the opposite position, a random background."""
    def obj(positions):
        return SceneObject(str(rng.choice(list(shapes))), str(rng.choice(list(COLOURS))), str(rng.choice(list(SIZES))),
                           str(rng.choice(positions)))

    if rng.random() < two_objects:
        first = obj(list(_OPPOSITE))
        objects = (first, obj([_OPPOSITE[first.position]]))
    else:
        objects = (obj(list(POSITIONS)),)
    return Scene(objects, str(rng.choice(list(BACKGROUNDS))))


def sample_scenes(n: int, *, seed: int = 0, px: int = 32, shapes: Sequence[str] = TRAIN_SHAPES,
                  two_objects: float = 0.3) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` scenes drawn with ``seed``: images ``uint8 [n, px, px, 3]``, captions and scenes."""
    if not isinstance(n, int) or n < 1:
        raise UserError(f"n must be a positive integer, got {n!r}")
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, shapes=shapes, two_objects=two_objects) for _ in range(n)]
    return np.stack([render(s, px) for s in scenes]), [caption(s) for s in scenes], scenes
