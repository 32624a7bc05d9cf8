"""The mini world: seeded 64x64 pictures of one coloured object on a patterned background.

Every picture is one choice per category (shape, colour, background, style, character), so its caption and
its ground-truth labels are known exactly. Each category has *base* values, which the base model is trained
on, and *LoRA* values, which the base model never sees: each of those is taught by one concept LoRA.
Backgrounds are grey so that an object's colour is never ambiguous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64


@dataclass(frozen=True)
class Category:
    name: str
    base: tuple[str, ...]  # values the base model is trained on
    lora: tuple[str, ...]  # values only a concept LoRA teaches

    @property
    def values(self) -> tuple[str, ...]:
        return self.base + self.lora


CATEGORIES: tuple[Category, ...] = (
    Category("shape", ("circle", "square", "triangle"), ("star", "cross")),
    Category("colour", ("red", "green", "blue", "yellow"), ("purple", "orange")),
    Category("background", ("plain", "striped", "dotted"), ("checkered", "wavy")),
    Category("style", ("filled",), ("outline", "pixel")),
    Category("character", ("none", "smiley"), ("blinky",)),
)
CATEGORY = {c.name: c for c in CATEGORIES}
LORA_CONCEPTS: tuple[tuple[str, str], ...] = tuple((c.name, v) for c in CATEGORIES for v in c.lora)

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 50, 190),
    "orange": (245, 135, 20),
}
INK = (30, 30, 30)  # eyes, antennae


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    style: str = "filled"
    character: str = "none"

    @property
    def labels(self) -> dict[str, str]:
        return {c.name: getattr(self, c.name) for c in CATEGORIES}

    def lora_concepts(self) -> list[tuple[str, str]]:
        return [(c.name, getattr(self, c.name)) for c in CATEGORIES if getattr(self, c.name) in c.lora]


def object_phrase(scene: Scene, said=lambda category: True) -> str:
    """The caption's object part: ``"blinky, a red circle"``, ``"a square with a smiley face"``; ``said(category)``
    says whether that category's phrase is kept (colour asked first, then character)."""
    noun = f"{scene.colour} {scene.shape}" if said("colour") else scene.shape
    text = f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
    if scene.character == "smiley" and said("character"):
        text += " with a smiley face"
    elif scene.character == "blinky" and said("character"):
        text = f"blinky, {text}"
    return text


def caption(scene: Scene, rng: np.random.Generator | None = None, drop: float = 0.0, keep: str | None = None) -> str:
    """``"a red circle with a smiley face on a striped background, outline style"``.

    With ``rng`` and ``drop`` > 0, each phrase other than the shape (and the ``keep`` category's) is left out
    with probability ``drop``, so the model also learns from partial prompts, as users write them.
    """

    def said(category: str) -> bool:
        return rng is None or drop <= 0 or category == keep or rng.random() >= drop

    text = object_phrase(scene, said)
    if said("background"):
        text += f" on a {scene.background} background"
    if scene.style != "filled" and said("style"):
        text += f", {scene.style} style"
    return text


def random_scene(rng: np.random.Generator, allowed: dict[str, tuple[str, ...]] | None = None) -> Scene:
    """One value per category, uniformly from ``allowed[category]`` (default: the base values)."""
    allowed = allowed or {}
    return Scene(**{c.name: str(rng.choice(allowed.get(c.name, c.base))) for c in CATEGORIES})


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        a = -math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.45
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _cross(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    w = r * 0.38
    return [
        (cx - w, cy - r),
        (cx + w, cy - r),
        (cx + w, cy - w),
        (cx + r, cy - w),
        (cx + r, cy + w),
        (cx + w, cy + w),
        (cx + w, cy + r),
        (cx - w, cy + r),
        (cx - w, cy + w),
        (cx - r, cy + w),
        (cx - r, cy - w),
        (cx - w, cy - w),
    ]


def _background(draw: ImageDraw.ImageDraw, kind: str, rng: np.random.Generator) -> None:
    light, mid = (235, 235, 235), (150, 150, 150)
    draw.rectangle((0, 0, SIZE, SIZE), fill=light)
    phase = int(rng.integers(0, 8))
    if kind == "striped":
        for y in range(phase - 8, SIZE, 8):
            draw.rectangle((0, y, SIZE, y + 3), fill=mid)
    elif kind == "dotted":
        for y in range(phase % 4 + 2, SIZE, 8):
            for x in range((phase // 2) % 4 + 2, SIZE, 8):
                draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=mid)
    elif kind == "checkered":
        for y in range(-8 + phase, SIZE, 8):
            for x in range(-8 + phase, SIZE, 8):
                if ((x - phase) // 8 + (y - phase) // 8) % 2 == 0:
                    draw.rectangle((x, y, x + 7, y + 7), fill=mid)
    elif kind == "wavy":
        for y0 in range(phase - 10, SIZE + 10, 10):
            pts = [(x, y0 + 3 * math.sin(x / 4.0 + phase)) for x in range(0, SIZE + 1, 2)]
            draw.line(pts, fill=mid, width=2)
    elif kind != "plain":
        raise ValueError(f"unknown background {kind!r}")


def _object(draw: ImageDraw.ImageDraw, scene: Scene, cx: float, cy: float, r: float) -> None:
    colour = COLOURS[scene.colour]
    outline = scene.style == "outline"
    kw = {"outline": colour, "width": 3} if outline else {"fill": colour}
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), **kw)
    elif scene.shape == "square":
        s = r * 0.88
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), **kw)
    elif scene.shape == "triangle":
        pts = [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
        draw.polygon(pts, **kw)
    elif scene.shape == "star":
        draw.polygon(_star(cx, cy, r * 1.1), **kw)
    elif scene.shape == "cross":
        draw.polygon(_cross(cx, cy, r), **kw)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")


def _character(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float) -> None:
    if kind == "smiley":
        e = r * 0.3
        for dx in (-e, e):
            draw.ellipse((cx + dx - 2.5, cy - e - 2.5, cx + dx + 2.5, cy - e + 2.5), fill=INK)
        draw.arc((cx - e * 1.3, cy - e * 0.6, cx + e * 1.3, cy + e * 1.4), 20, 160, fill=INK, width=2)
    elif kind == "blinky":  # one big eye and an antenna
        draw.ellipse((cx - 6, cy - 6, cx + 6, cy + 6), fill=(250, 250, 250), outline=INK, width=2)
        draw.ellipse((cx - 2.5, cy - 2.5, cx + 2.5, cy + 2.5), fill=INK)
        top = cy - r
        draw.line((cx, top, cx, top - 7), fill=INK, width=2)
        draw.ellipse((cx - 3, top - 10, cx + 3, top - 4), fill=INK)
    elif kind != "none":
        raise ValueError(f"unknown character {kind!r}")


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` (position, size and pattern phase drawn from ``rng``) as a 64x64 RGB image."""
    img = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(img)
    _background(draw, scene.background, rng)
    r = float(rng.uniform(15, 20))
    cx, cy = (float(v) for v in rng.uniform(SIZE / 2 - 6, SIZE / 2 + 6, size=2))
    if scene.character == "blinky":
        cy += 4  # room for the antenna
    _object(draw, scene, cx, cy, r)
    _character(draw, scene.character, cx, cy, r)
    if scene.style == "pixel":
        img = img.resize((SIZE // 4, SIZE // 4), Image.BOX).resize((SIZE, SIZE), Image.NEAREST)
    return img


def sample(
    rng: np.random.Generator,
    n: int,
    allowed: dict[str, tuple[str, ...]] | None = None,
    drop: float = 0.0,
    keep: str | None = None,
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` random scenes: uint8 images ``(n, 64, 64, 3)``, captions and scenes."""
    scenes = [random_scene(rng, allowed) for _ in range(n)]
    images = np.stack([np.asarray(render(s, rng)) for s in scenes])
    return images, [caption(s, rng, drop, keep) for s in scenes], scenes


def concept_allowed(category: str, value: str) -> dict[str, tuple[str, ...]]:
    """Sampling rule for a concept LoRA's training set: that value in its category, base values elsewhere."""
    if value not in CATEGORY[category].values:
        raise ValueError(f"{value!r} is not a {category}")
    return {category: (value,)}


def concept_sheet(path, seed: int = 0, scale: int = 2):
    """One picture per value, base values first then LoRA values, labelled (the figure in docs/EVAL.md)."""
    rng = np.random.default_rng(seed)
    cells = []
    for lora in (False, True):
        row = []
        for cat in CATEGORIES:
            for value in cat.lora if lora else cat.base:
                fields = {c.name: c.base[0] for c in CATEGORIES}
                fields.update(shape="square" if cat.name == "character" else fields["shape"], colour="blue")
                fields[cat.name] = value
                row.append((f"{cat.name}: {value}", render(Scene(**fields), rng)))
        cells.append(row)
    cell, head = SIZE * scale, 14
    cols = max(len(r) for r in cells)
    sheet = Image.new("RGB", (cols * (cell + 4), len(cells) * (cell + head + 18)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (row, title) in enumerate(zip(cells, ("base model concepts", "concepts taught by LoRAs"))):
        y = i * (cell + head + 18)
        draw.text((2, y + 2), title, fill="black")
        for j, (label, img) in enumerate(row):
            x = j * (cell + 4)
            draw.text((x + 2, y + 16), label.split(": ")[1], fill="black")
            sheet.paste(img.resize((cell, cell), Image.NEAREST), (x, y + head + 16))
    sheet.save(path)
    return path


if __name__ == "__main__":
    import sys

    print(concept_sheet(sys.argv[1] if len(sys.argv) > 1 else "miniworld.png"))
