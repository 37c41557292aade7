"""Procedural, seeded scenes: cube stacks (fine-tuning) and flat shapes (pretraining).

Everything is drawn at RENDER_SIZE (128 px) with PIL and numpy, then optionally downscaled.
Every random choice comes from the `np.random.Generator` you pass, so a seed fixes the pixels.

Cube scenes (the fine-tuning domain). A scene is a `stack`: a tuple of colours, TOP FIRST.
    ()                  -> "no block is present in the image"
    ("red",)            -> "a single red cube"
    ("blue", "green")   -> "a blue cube stacked on a green cube"   (blue sits on green)

Shape scenes (the pretraining domain, a different caption style and vocabulary). A scene is
`(objects, relation)`: objects are `(shape, colour)` pairs named in reading order, so the
relation is "left of" (side by side) or "above" (one over the other). Reading order makes the
caption of an image unique ("a red square above a blue square" and "a blue square below a red
square" would both be right, which caps exact match near 50%).
    ((), None)                                         -> "an empty canvas"
    ((("triangle", "purple"),), None)                  -> "a lone purple triangle"
    ((("circle", "red"), ("square", "green")), "left of") -> "a red circle left of a green square"

Public API
    COLOURS, SHAPES, RELATIONS, RENDER_SIZE, STACK_PAIRS
    cube_caption(stack) -> str
    render_cube_scene(stack, rng, size=RENDER_SIZE) -> PIL.Image.Image
    shape_caption(objects, relation) -> str
    render_shape_scene(objects, relation, rng, size=RENDER_SIZE) -> PIL.Image.Image
    sample_shape_scene(rng) -> (objects, relation)

Squares are sized and placed like cube front faces, and "square above square" pairs touch, so
a model pretrained on shapes has seen every two-colour vertical arrangement before it sees cubes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

RENDER_SIZE = 128
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 75, 205),
    "yellow": (235, 205, 40),
    "purple": (135, 55, 175),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
# reading order: the first object named is the left or the upper one (one caption per image)
RELATIONS = ("left of", "above")
# every ordered (top, bottom) pair of two different colours: 6 * 5 = 30
STACK_PAIRS: tuple[tuple[str, str], ...] = tuple(itertools.permutations(COLOURS, 2))

Shape = tuple[str, str]  # (shape, colour)
RGB = tuple[int, int, int]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def cube_caption(stack: Sequence[str]) -> str:
    """Caption of a cube stack given top-first: 0, 1 or 2 colours."""
    if len(stack) == 0:
        return "no block is present in the image"
    if len(stack) == 1:
        return f"a single {stack[0]} cube"
    if len(stack) == 2:
        top, bottom = stack
        return f"{_article(top)} {top} cube stacked on {_article(bottom)} {bottom} cube"
    raise ValueError(f"stack has {len(stack)} cubes; at most 2 are supported")


def shape_caption(objects: Sequence[Shape], relation: str | None) -> str:
    """Caption of a shape scene: empty, one lone shape, or two shapes in a relation."""
    if len(objects) == 0:
        return "an empty canvas"
    if len(objects) == 1:
        shape, colour = objects[0]
        return f"a lone {colour} {shape}"
    if len(objects) == 2 and relation in RELATIONS:
        (s1, c1), (s2, c2) = objects
        return f"{_article(c1)} {c1} {s1} {relation} {_article(c2)} {c2} {s2}"
    raise ValueError(f"bad shape scene: {objects!r}, relation={relation!r}")


# ---------------------------------------------------------------- drawing helpers


def _background(rng: np.random.Generator) -> tuple[Image.Image, RGB]:
    """A plain light canvas whose grey level and tint vary a little per image."""
    grey = rng.integers(195, 236)
    colour = tuple(int(np.clip(grey + rng.integers(-8, 9), 0, 255)) for _ in range(3))
    return Image.new("RGB", (RENDER_SIZE, RENDER_SIZE), colour), colour


def _jitter(colour: str, rng: np.random.Generator) -> RGB:
    return tuple(int(np.clip(v + rng.integers(-14, 15), 0, 255)) for v in COLOURS[colour])


def _shade(rgb: RGB, factor: float) -> RGB:
    """factor > 1 blends toward white, < 1 darkens: the lit top and shadowed side of a cube."""
    if factor >= 1:
        return tuple(int(v + (255 - v) * (factor - 1)) for v in rgb)
    return tuple(int(v * factor) for v in rgb)


def _finish(img: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """Add mild Gaussian pixel noise, then downscale (box filter) to `size` if needed."""
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 4.0, (RENDER_SIZE, RENDER_SIZE, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB")
    return img if size == RENDER_SIZE else img.resize((size, size), Image.Resampling.BOX)


def _draw_cube(draw: ImageDraw.ImageDraw, x: int, y: int, s: int, rgb: RGB) -> None:
    """Cube whose front face has top-left (x, y) and side s; top and side faces recede by d."""
    d = round(0.35 * s)
    draw.polygon([(x, y), (x + d, y - d), (x + s + d, y - d), (x + s, y)], fill=_shade(rgb, 1.45))
    draw.polygon(
        [(x + s, y), (x + s + d, y - d), (x + s + d, y + s - d), (x + s, y + s)],
        fill=_shade(rgb, 0.6),
    )
    draw.rectangle([x, y, x + s - 1, y + s - 1], fill=rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, s: int, rgb: RGB) -> None:
    """Flat shape inside the s x s box with top-left (x, y)."""
    if shape == "square":
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=rgb)
    elif shape == "circle":
        draw.ellipse([x, y, x + s - 1, y + s - 1], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(x + s / 2, y), (x + s - 1, y + s - 1), (x, y + s - 1)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


# ---------------------------------------------------------------- scenes


def render_cube_scene(
    stack: Sequence[str], rng: np.random.Generator, size: int = RENDER_SIZE
) -> Image.Image:
    """Render 0, 1 or 2 shaded cubes (top-first colours), the top one resting on the bottom."""
    cube_caption(stack)  # validates the stack
    for c in stack:
        if c not in COLOURS:
            raise ValueError(f"unknown colour {c!r}; expected one of {list(COLOURS)}")
    img, _ = _background(rng)
    draw = ImageDraw.Draw(img)
    if stack:
        s = int(rng.integers(26, 35))
        d = round(0.35 * s)
        height = s * len(stack) + d  # front faces plus the top face of the upper cube
        x = int(rng.integers(8, RENDER_SIZE - s - d - 8 + 1))
        y_bottom = int(rng.integers(height + 6, RENDER_SIZE - 6 + 1))  # lower edge of the stack
        y = y_bottom - s
        for colour in reversed(stack):  # bottom cube first so the top cube is drawn over it
            _draw_cube(draw, x, y, s, _jitter(colour, rng))
            x += int(rng.integers(-3, 4))  # the upper cube sits a little off-centre
            y -= s
    return _finish(img, rng, size)


def render_shape_scene(
    objects: Sequence[Shape],
    relation: str | None,
    rng: np.random.Generator,
    size: int = RENDER_SIZE,
) -> Image.Image:
    """Render 0, 1 or 2 flat shapes; with two, the first is `relation` the second."""
    shape_caption(objects, relation)  # validates the scene
    img, _ = _background(rng)
    draw = ImageDraw.Draw(img)
    boxes = []  # (x, y, side) per object
    if len(objects) == 1:
        s = int(rng.integers(24, 35))
        x, y = (int(v) for v in rng.integers(6, RENDER_SIZE - s - 5, size=2))
        boxes.append((x, y, s))
    elif len(objects) == 2:
        boxes = _pair_boxes(objects, relation, rng)
    for (shape, colour), (x, y, s) in zip(objects, boxes, strict=True):
        _draw_shape(draw, shape, x, y, s, _jitter(colour, rng))
    return _finish(img, rng, size)


def _pair_boxes(
    objects: Sequence[Shape], relation: str, rng: np.random.Generator
) -> list[tuple[int, int, int]]:
    """Boxes (x, y, side) for two objects, the first `relation` the second."""
    s1, s2 = int(rng.integers(24, 35)), int(rng.integers(24, 35))
    vertical = relation == "above"
    # two squares stacked vertically touch (gap 0..2 px), like cube front faces in a stack
    both_squares = all(shape == "square" for shape, _ in objects)
    gap = int(rng.integers(0, 3)) if vertical and both_squares else int(rng.integers(4, 21))
    if vertical:
        w, h = max(s1, s2) + 6, s1 + s2 + gap
    else:
        w, h = s1 + s2 + gap, max(s1, s2) + 6
    x0 = int(rng.integers(6, RENDER_SIZE - w - 5))
    y0 = int(rng.integers(6, RENDER_SIZE - h - 5))
    sa, sb = s1, s2  # a: first object (left / upper), b: second
    if vertical:
        if both_squares:  # centre both squares on one axis (+-3 px), like a cube stack
            cx = x0 + w // 2
            xa, xb = (cx - s // 2 + int(rng.integers(-3, 4)) for s in (sa, sb))
        else:
            xa, xb = (x0 + int(rng.integers(0, w - s + 1)) for s in (sa, sb))
        a, b = (xa, y0, sa), (xb, y0 + sa + gap, sb)
    else:
        ya, yb = y0 + int(rng.integers(0, h - sa + 1)), y0 + int(rng.integers(0, h - sb + 1))
        a, b = (x0, ya, sa), (x0 + sa + gap, yb, sb)
    return [a, b]


def sample_shape_scene(rng: np.random.Generator) -> tuple[tuple[Shape, ...], str | None]:
    """Draw a pretraining scene: empty 5%, lone 20%, square over square 35%, any pair 40%."""
    u = rng.random()
    colours, shapes = list(COLOURS), list(SHAPES)
    if u < 0.05:
        return (), None
    if u < 0.25:
        return ((shapes[rng.integers(3)], colours[rng.integers(6)]),), None
    if u < 0.60:  # all 30 ordered colour pairs of vertically adjacent squares
        top, bottom = STACK_PAIRS[rng.integers(len(STACK_PAIRS))]
        return (("square", top), ("square", bottom)), "above"
    first = (shapes[rng.integers(3)], colours[rng.integers(6)])
    second = (shapes[rng.integers(3)], colours[rng.integers(6)])
    return (first, second), RELATIONS[rng.integers(len(RELATIONS))]
