"""The community world: a one-object world whose LoRAs teach named *variants* of what the base model draws.

Community LoRAs teach a variant of something the base already knows (a character of "person", a painter of
"painting"), with a new trigger word beside the class word in every caption, on varied pictures. This world
draws that regime: the base model knows a generic value in every category a LoRA touches (stars, purple,
checkered backgrounds, outlines, a two-eyed creature), and each LoRA teaches one variant of one of them:

    shape       star            -> sparkle   (a four-pointed star)            "zorp star"
    colour      purple          -> duotone   (purple top, orange bottom)      "vexa purple"
    background  checkered       -> tiled     (16-pixel checkerboard)          "harle checkered background"
    style       outline         -> dashed    (a dashed outline)               "inko outline style"
    character   creature        -> cyclops   (one eye and an antenna)         "glorp creature"

The categories, captions and drawing live here; ``bench/miniworld/community_train.py`` (a source checkout's)
trains the base and the LoRAs, :mod:`~lora_composer.miniworld.community_eval` measures the strategies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from lora_composer.miniworld import world
from lora_composer.miniworld.world import Category

SIZE = world.SIZE
NAME = "community"

CATEGORIES: tuple[Category, ...] = (
    Category("shape", ("circle", "square", "triangle", "star"), ("sparkle",)),
    Category("colour", ("red", "green", "blue", "yellow", "purple"), ("duotone",)),
    Category("background", ("plain", "striped", "dotted", "checkered"), ("tiled",)),
    Category("style", ("filled", "outline"), ("dashed",)),
    Category("character", ("none", "smiley", "creature"), ("cyclops",)),
)
CATEGORY = {c.name: c for c in CATEGORIES}
# variant -> (the generic value it is a kind of, its trigger word)
VARIANTS = {
    "sparkle": ("star", "zorp"),
    "duotone": ("purple", "vexa"),
    "tiled": ("checkered", "harle"),
    "dashed": ("outline", "inko"),
    "cyclops": ("creature", "glorp"),
}
GENERIC = {v: g for v, (g, _) in VARIANTS.items()}
TRIGGER = {v: t for v, (_, t) in VARIANTS.items()}
DUOTONE = ("purple", "orange")  # top half, bottom half


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


def word(value: str) -> str:
    """How a caption names a value: a variant as its trigger word before the generic word ("vexa purple")."""
    return f"{TRIGGER[value]} {GENERIC[value]}" if value in VARIANTS else value


def caption(scene: Scene, rng: np.random.Generator | None = None, drop: float = 0.0, keep: str | None = None) -> str:
    """``"a glorp creature, a vexa purple zorp star on a harle checkered background, inko outline style"``.

    Community captions: a variant is its trigger word plus the generic word, everything else by its generic
    word. With ``rng`` and ``drop`` > 0 each phrase but the shape (and ``keep``'s) is left out with probability
    ``drop``.
    """

    def said(category: str) -> bool:
        return rng is None or drop <= 0 or category == keep or rng.random() >= drop

    noun = f"{word(scene.colour)} {word(scene.shape)}" if said("colour") else word(scene.shape)
    text = f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
    if scene.character != "none" and said("character"):
        if scene.character == "smiley":
            text += " with a smiley face"
        else:
            text = f"a {word(scene.character)}, {text}"
    if said("background"):
        text += f" on a {word(scene.background)} background"
    if scene.style != "filled" and said("style"):
        text += f", {word(scene.style)} style"
    return text


def random_scene(rng: np.random.Generator, allowed: dict[str, tuple[str, ...]] | None = None) -> Scene:
    """One value per category, uniformly from ``allowed[category]`` (default: the base values)."""
    allowed = allowed or {}
    return Scene(**{c.name: str(rng.choice(allowed.get(c.name, c.base))) for c in CATEGORIES})


def variant_allowed(category: str, value: str) -> dict[str, tuple[str, ...]]:
    """A LoRA's training set: its variant in its category; every other category over all base values
    (community datasets are varied: the base's star, purple, outline and creature appear there too)."""
    if value not in CATEGORY[category].lora:
        raise ValueError(f"{value!r} is not a {category} variant")
    return {category: (value,)}


# ------------------------------------------------------------------------------------------------- drawing
def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Every shape as a closed polygon, so filled, outline and dashed styles draw any of them alike."""
    if shape == "circle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 40, endpoint=False)]
    if shape == "square":
        s = r * 0.88
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape in ("star", "sparkle"):  # five points, inner radius 0.45; four points, inner radius 0.3
        n, inner, rr = (5, 0.45, r * 1.1) if shape == "star" else (4, 0.3, r * 1.15)
        return [
            (
                cx + (rr if i % 2 == 0 else rr * inner) * math.cos(-math.pi / 2 + i * math.pi / n),
                cy + (rr if i % 2 == 0 else rr * inner) * math.sin(-math.pi / 2 + i * math.pi / n),
            )
            for i in range(2 * n)
        ]
    raise ValueError(f"unknown shape {shape!r}")


def _dashes(points: list[tuple[float, float]], on: float = 8.0, off: float = 6.0) -> list[list[tuple[float, float]]]:
    """The closed polygon's perimeter cut into dashes of length ``on`` separated by ``off``."""
    loop = points + points[:1]
    out, cur, pos, drawing = [], [loop[0]], 0.0, True
    for (x0, y0), (x1, y1) in zip(loop, loop[1:]):
        seg = math.hypot(x1 - x0, y1 - y0)
        t = 0.0
        while t < seg:
            left = (on if drawing else off) - pos
            step = min(left, seg - t)
            t += step
            pos += step
            p = (x0 + (x1 - x0) * t / seg, y0 + (y1 - y0) * t / seg)
            if drawing:
                cur.append(p)
            if pos >= (on if drawing else off) - 1e-9:
                if drawing:
                    out.append(cur)
                drawing, pos, cur = not drawing, 0.0, [p]
    if drawing and len(cur) > 1:
        out.append(cur)
    return out


def _background(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    if kind == "tiled":  # the checkerboard with tiles twice as large (16 pixels; the codec keeps axis-aligned edges)
        light, mid = np.array((235, 235, 235)), np.array((150, 150, 150))
        phase = rng.integers(0, 16, size=2)
        y, x = np.mgrid[0:SIZE, 0:SIZE]
        dark = (((x + phase[0]) // 16 + (y + phase[1]) // 16) % 2 == 0)[..., None]
        return Image.fromarray(np.where(dark, mid, light).astype(np.uint8))
    world._background(ImageDraw.Draw(img), kind, rng)
    return img


def _character(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float) -> None:
    if kind == "creature":  # the generic creature: two eyes and two antennae
        for dx in (-6.0, 6.0):
            draw.ellipse((cx + dx - 4, cy - 4, cx + dx + 4, cy + 4), fill=(250, 250, 250), outline=world.INK, width=1)
            draw.ellipse((cx + dx - 1.8, cy - 1.8, cx + dx + 1.8, cy + 1.8), fill=world.INK)
        top = cy - r
        for dx in (-5.0, 5.0):
            draw.line((cx + dx, top + 2, cx + 1.6 * dx, top - 7), fill=world.INK, width=2)
            draw.ellipse((cx + 1.6 * dx - 2.5, top - 9.5, cx + 1.6 * dx + 2.5, top - 4.5), fill=world.INK)
    elif kind == "cyclops":
        world._character(draw, "blinky", cx, cy, r)
    else:
        world._character(draw, kind, cx, cy, r)


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` (position, size and pattern phase from ``rng``) as a 64x64 RGB image."""
    img = _background(Image.new("RGB", (SIZE, SIZE)), scene.background, rng)
    r = float(rng.uniform(15, 20))
    cx, cy = (float(v) for v in rng.uniform(SIZE / 2 - 6, SIZE / 2 + 6, size=2))
    if scene.character in ("creature", "cyclops"):
        cy += 4  # room for the antennae
    mask = Image.new("L", (SIZE, SIZE), 0)
    md = ImageDraw.Draw(mask)
    pts = _polygon(scene.shape, cx, cy, r)
    if scene.style == "filled":
        md.polygon(pts, fill=255)
    elif scene.style == "outline":
        md.line(pts + pts[:2], fill=255, width=3, joint="curve")
    elif scene.style == "dashed":
        for dash in _dashes(pts):
            md.line(dash, fill=255, width=3)
    else:
        raise ValueError(f"unknown style {scene.style!r}")
    if scene.colour == "duotone":
        top, bottom = (np.array(world.COLOURS[c]) for c in DUOTONE)
        rows = (np.arange(SIZE) < cy)[:, None, None]
        paint = np.broadcast_to(np.where(rows, top, bottom), (SIZE, SIZE, 3)).astype(np.uint8)
    else:
        paint = np.broadcast_to(np.array(world.COLOURS[scene.colour], np.uint8), (SIZE, SIZE, 3))
    img = Image.composite(Image.fromarray(np.ascontiguousarray(paint)), img, mask)
    _character(ImageDraw.Draw(img), scene.character, cx, cy, r)
    return img


def sample(
    rng: np.random.Generator,
    n: int,
    allowed: dict[str, tuple[str, ...]] | None = None,
    drop: float = 0.0,
    keep: str | None = None,
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` random scenes: uint8 images ``(n, 64, 64, 3)``, captions and scenes (as :func:`world.sample`)."""
    scenes = [random_scene(rng, allowed) for _ in range(n)]
    images = np.stack([np.asarray(render(s, rng)) for s in scenes])
    return images, [caption(s, rng, drop, keep) for s in scenes], scenes


def concept_sheet(path, seed: int = 0, scale: int = 2):
    """Each variant beside its generic value (the figure in docs/EVAL.md)."""
    rng = np.random.default_rng(seed)
    cells = []
    for variant, (generic, _) in VARIANTS.items():
        cat = next(c.name for c in CATEGORIES if variant in c.lora)
        for value in (generic, variant):
            fields = {
                "shape": "square" if cat in ("character", "colour") else "circle",
                "colour": "blue",
                "background": "plain",
                "style": "filled",
                "character": "none",
            }
            fields[cat] = value
            cells.append((word(value), render(Scene(**fields), rng)))
    cell, head = SIZE * scale, 14
    sheet = Image.new("RGB", (len(cells) * (cell + 4), cell + head + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for j, (label, img) in enumerate(cells):
        draw.text((j * (cell + 4) + 2, 2), label, fill="black")
        sheet.paste(img.resize((cell, cell), Image.NEAREST), (j * (cell + 4), head))
    sheet.save(path)
    return path
