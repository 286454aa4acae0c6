"""Synthetic scenes for the demo corpus: 1-3 coloured shapes and a caption.

A scene is drawn only from the ``random.Random`` it is given, so the same RNG
state gives the same pixels, labels and caption on every machine. Objects never
overlap (their boxes are kept apart by a margin), so every pair of objects has
exactly one relation (left of / right of / above / below) read off the gap
between their boxes, and captions never contradict the picture.
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 180),
    "orange": (245, 135, 25),
}
# Box side as a fraction of the image side; each object jitters +-10% around it.
SIZES = {"small": 0.18, "large": 0.32}
RELATIONS = ("left of", "right of", "above", "below")
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_MAX_PLACEMENT_TRIES = 1000
_TRIES_PER_OBJECT = 20

# Caption templates: {a}, {b}, {c} are object phrases ("a small red circle"),
# {ab}/{cx} the relation of the first object to the second / the third to one of them.
_ONE = (
    "{a}.",
    "{a} on a plain background.",
    "there is {a}.",
    "a picture of {a}.",
    "{a} in the image.",
)
_TWO = (
    "{a} {ab} {b}.",
    "{a} is {ab} {b}.",
    "there is {a} {ab} {b}.",
    "{b} and {a} {ab} it.",
)
_THREE = (
    "{a} {ab} {b}, and {c} {cx}.",
    "{a} is {ab} {b}; {c} is {cx}.",
    "there is {a} {ab} {b} and {c} {cx}.",
)


def render_scene(
    rng: random.Random, image_size: int, num_objects: int | None = None
) -> tuple[Image.Image, dict, str]:
    """Draw one scene of ``num_objects`` (default: 1-3 at random) shapes.

    Returns (RGB image of image_size x image_size, labels, caption). labels has
    the main (first, described first) object's ``shape``, ``color`` and ``size``,
    ``num_objects``, ``objects`` (each with shape, color, size and its box
    [x0, y0, x1, y1] in pixels) and ``relations`` ([i, relation, j]: object i is
    <relation> object j).
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    n = num_objects if num_objects is not None else rng.randint(1, 3)
    if not 1 <= n <= 3:
        raise ValueError(f"num_objects must be 1-3, got {n}")
    objects = _place_objects(rng, image_size, _distinct_descriptions(rng, n))
    gray = rng.randint(205, 245)  # light, faintly tinted: never mistaken for a shape colour
    background = tuple(gray + rng.randint(-8, 8) for _ in range(3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_shape(draw, obj, _jitter_color(rng, COLORS[obj["color"]]))
    noise_std = rng.choice((0.0, 0.0, 0.0, 2.0, 4.0))  # mostly plain (noise bloats PNGs)
    noise_seed = rng.getrandbits(32)
    if noise_std:
        image = _add_noise(image, noise_std, noise_seed)
    relations = _relations(objects)
    main = objects[0]
    labels = {
        "shape": main["shape"], "color": main["color"], "size": main["size"],
        "num_objects": n, "objects": objects, "relations": relations,
    }
    return image, labels, caption_scene(rng, labels)


def caption_scene(rng: random.Random, labels: dict) -> str:
    """One caption (template chosen by ``rng``) stating every object's size,
    colour and shape and how they are placed relative to each other."""
    objects, n = labels["objects"], labels["num_objects"]
    phrases = [object_phrase(o) for o in objects]
    if n == 1:
        return rng.choice(_ONE).format(a=phrases[0])
    rel = {(i, j): r for i, r, j in labels["relations"]}
    fields = {"a": phrases[0], "b": phrases[1], "ab": rel[(0, 1)]}
    if n == 2:
        return rng.choice(_TWO).format(**fields)
    anchor = rng.randint(0, 1)  # the third object is placed relative to the first or second
    fields.update(c=phrases[2], cx=f"{rel[(2, anchor)]} the {object_phrase(objects[anchor])[2:]}")
    return rng.choice(_THREE).format(**fields)


def object_phrase(obj: dict) -> str:
    """'a small red circle' (both sizes start with a consonant, so always 'a')."""
    return f"a {obj['size']} {obj['color']} {obj['shape']}"


def _distinct_descriptions(rng: random.Random, n: int) -> list[dict]:
    """n objects with pairwise different (shape, colour, size), so a phrase names one object."""
    chosen: list[tuple[str, str, str]] = []
    while len(chosen) < n:
        d = (rng.choice(SHAPES), rng.choice(tuple(COLORS)), rng.choice(tuple(SIZES)))
        if d not in chosen:
            chosen.append(d)
    return [{"shape": s, "color": c, "size": z} for s, c, z in chosen]


def _place_objects(rng: random.Random, image_size: int, objects: list[dict]) -> list[dict]:
    """Give each object a square box inside the image, apart from the others.

    Each object gets a few tries to find a free spot; if one cannot, the whole
    layout starts over (three large shapes leave little room at small sizes).
    """
    margin = max(2, image_size // 24)
    for _ in range(_MAX_PLACEMENT_TRIES):
        boxes: list[list[int]] = []
        for obj in objects:
            side = round(image_size * SIZES[obj["size"]] * rng.uniform(0.9, 1.1))
            for _ in range(_TRIES_PER_OBJECT):
                x0 = rng.randint(margin, image_size - margin - side)
                y0 = rng.randint(margin, image_size - margin - side)
                box = [x0, y0, x0 + side, y0 + side]
                if all(_gap(box, other) >= margin for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(objects):
            return [dict(obj, box=box) for obj, box in zip(objects, boxes)]
    raise RuntimeError(f"could not place {len(objects)} objects in {image_size}px")


def _gap(a: list[int], b: list[int]) -> int:
    """Largest separation between two boxes along x or y (negative if they overlap)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def _relation(a: list[int], b: list[int]) -> str:
    """Where box a is relative to box b, along the axis with the larger gap."""
    gaps = {"left of": b[0] - a[2], "right of": a[0] - b[2], "above": b[1] - a[3], "below": a[1] - b[3]}
    return max(RELATIONS, key=lambda r: gaps[r])  # ties resolve in RELATIONS order


def _relations(objects: list[dict]) -> list[list]:
    out = []
    for i, a in enumerate(objects):
        for j, b in enumerate(objects):
            if i < j:
                r = _relation(a["box"], b["box"])
                out += [[i, r, j], [j, _INVERSE[r], i]]
    return sorted(out, key=lambda t: (t[0], t[2]))


def _jitter_color(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: dict, fill: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = obj["box"]
    if obj["shape"] == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj["shape"] == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:  # triangle pointing up, filling its box
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)


def _add_noise(image: Image.Image, std: float, seed: int) -> Image.Image:
    """Gaussian pixel noise from a numpy generator seeded by the scene RNG."""
    pixels = np.asarray(image, dtype=np.float32)
    noise = np.random.Generator(np.random.PCG64(seed)).normal(0.0, std, pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).round().astype(np.uint8), "RGB")


__all__ = ["SHAPES", "COLORS", "SIZES", "RELATIONS", "render_scene", "caption_scene", "object_phrase"]
