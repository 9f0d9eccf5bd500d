"""Photographs of the official test images, rendered the ways people take them, as the files they upload.

Every rendering starts from one ``uint8 [28, 28]`` test image (light on dark) and prints it as dark ink
(a digit) or a dark print (a product) on a sheet of paper, then photographs the sheet under one
condition (``CONDITIONS``): on a table of another shade with the sheet's edges visible and tilted,
under uneven light and a shadow, small in a large photo, with a thin or thick pen, coloured ink,
compressed hard, with a transparent background, stored sideways with an EXIF orientation, off-centre,
blurred, noisy, or drawn like the playground's canvas; ``mixed`` draws several of them at once.
The result is the bytes of the file (PNG, JPEG or WebP) that ``/classify`` receives.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112
# Pixels stored for EXIF orientation n are the upright picture put through the inverse of what a
# viewer does for n (ImageOps.exif_transpose's table), so a viewer that honours the tag shows it upright.
_STORE_FOR = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@dataclass
class Shot:
    """How one photo is taken; each condition changes some of these from the plain photo's values."""

    subject_px: float = 180.0  # the subject's longest side in the photo, before tilt
    paper_margin: float = 0.35  # paper around the subject, as a fraction of the subject's size, each side
    offset: tuple[float, float] = (0.0, 0.0)  # the subject's displacement on the paper (fraction of free room)
    photo_scale: float = 1.0  # the photo's width over the paper's (> 1: a small subject in a large photo)
    table: bool = False
    table_level: float = 90.0
    tilt: float = 0.0  # degrees
    paper_level: float = 235.0
    ink_level: float = 40.0
    paper_tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ink_colour: tuple[float, float, float] | None = None  # RGB; None = grey ink at ink_level
    pen: float = 1.0  # stroke width relative to the data set's (digits)
    canvas_pen: float | None = None  # redraw as round strokes this wide on a 280-px canvas (digits)
    gradient: tuple[float, float] = (0.0, 0.0)  # light falling off across x and y (fraction per photo)
    shadow: float = 0.0  # depth of a soft shadow over part of the photo (fraction)
    shadow_angle: float = 0.0
    shadow_at: float = 0.5
    blur: float = 0.0  # Gaussian σ as a fraction of the subject's size
    noise: float = 0.0  # sensor noise σ in grey levels
    fmt: str = "JPEG"  # JPEG | PNG | WEBP
    quality: int = 92
    orientation: int = 1  # EXIF orientation tag 1..8
    transparent: bool = False  # RGBA: only the ink is opaque


def _ink_map(pixels: np.ndarray, size: int, pen: float, digits: bool) -> np.ndarray:
    """The test image enlarged to ``size`` px as ink coverage 0..1, strokes thickened or thinned by ``pen``."""
    ink = cv2.resize(pixels.astype(np.float32) / 255.0, (size, size), interpolation=cv2.INTER_CUBIC)
    ink = np.clip(ink, 0, 1)
    if digits and pen != 1.0:
        stroke = size / 28 * 2.0  # MNIST's strokes are about 2 px of 28
        radius = max(1, round(abs(pen - 1.0) * stroke / 2))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        ink = cv2.dilate(ink, kernel) if pen > 1 else cv2.erode(ink, kernel)
    return ink


def _skeleton(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning: the one-pixel centre lines of a binary image (what a pen's path was)."""
    image = np.pad(mask.astype(np.uint8), 1)
    while True:
        changed = False
        for step in (0, 1):
            p = image
            n = [np.roll(np.roll(p, dy, 0), dx, 1) for dy, dx in
                 ((1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1))]
            # neighbours P2..P9 clockwise from north: roll by (+1, 0) brings the north pixel here
            p2, p3, p4, p5, p6, p7, p8, p9 = n
            count = sum(n)
            ring = [p2, p3, p4, p5, p6, p7, p8, p9, p2]
            transitions = sum(((ring[i] == 0) & (ring[i + 1] == 1)).astype(np.uint8) for i in range(8))
            cond = (((p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)) if step == 0
                    else ((p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)))
            remove = (p == 1) & (count >= 2) & (count <= 6) & (transitions == 1) & cond
            if remove.any():
                image = image & ~remove.astype(np.uint8)
                changed = True
        if not changed:
            return image[1:-1, 1:-1].astype(bool)


def canvas_drawing(pixels: np.ndarray, pen_width: float) -> bytes:
    """The digit redrawn as the playground's canvas draws: round black strokes of ``pen_width`` on 280×280 white.

    The canvas's pen is 8–40 px wide (22 by default); a person draws the digit large, about 200 px tall.
    """
    big = cv2.resize(pixels, (200, 200), interpolation=cv2.INTER_CUBIC)
    skeleton = _skeleton(cv2.GaussianBlur(big, (0, 0), 2.0) > 100)
    ys, xs = np.nonzero(skeleton)
    canvas = np.full((560, 560), 255, np.uint8)  # drawn at 2× and shrunk: the canvas's anti-aliasing
    for y, x in zip(ys, xs, strict=True):
        cv2.circle(canvas, (int(2 * (x + 40)), int(2 * (y + 40))), max(1, round(pen_width)), 0, -1, cv2.LINE_AA)
    image = Image.fromarray(cv2.resize(canvas, (280, 280), interpolation=cv2.INTER_AREA)).convert("RGB")
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def photograph(pixels: np.ndarray, shot: Shot, digits: bool, rng: np.random.Generator) -> bytes:
    """Render one test image as a photo taken as ``shot`` says; returns the encoded file."""
    if shot.canvas_pen is not None:
        return canvas_drawing(pixels, shot.canvas_pen)
    size = max(8, round(shot.subject_px))
    ink = _ink_map(pixels, size, shot.pen, digits)
    margin = round(shot.paper_margin * size)
    paper_h, paper_w = size + 2 * margin, size + 2 * margin
    coverage = np.zeros((paper_h, paper_w), np.float32)
    dy, dx = (round(o * margin) for o in shot.offset)
    coverage[margin + dy: margin + dy + size, margin + dx: margin + dx + size] = ink
    sheet = np.ones((paper_h, paper_w), np.float32)
    if shot.tilt:
        matrix = cv2.getRotationMatrix2D((paper_w / 2, paper_h / 2), shot.tilt, 1.0)
        cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
        new_w, new_h = int(paper_h * sin + paper_w * cos) + 2, int(paper_h * cos + paper_w * sin) + 2
        matrix[0, 2] += new_w / 2 - paper_w / 2
        matrix[1, 2] += new_h / 2 - paper_h / 2
        coverage = cv2.warpAffine(coverage, matrix, (new_w, new_h), flags=cv2.INTER_LINEAR)
        sheet = cv2.warpAffine(sheet, matrix, (new_w, new_h), flags=cv2.INTER_LINEAR)
    if shot.table or shot.photo_scale > 1.0:
        scale = max(shot.photo_scale, 1.0)
        photo_w = round(sheet.shape[1] * (scale if shot.photo_scale > 1 else rng.uniform(1.15, 1.4)))
        photo_h = round(sheet.shape[0] * (scale if shot.photo_scale > 1 else rng.uniform(1.15, 1.4)))
        top = int(rng.integers(0, photo_h - sheet.shape[0] + 1))
        left = int(rng.integers(0, photo_w - sheet.shape[1] + 1))
        placed_cov = np.zeros((photo_h, photo_w), np.float32)
        placed_sheet = np.zeros((photo_h, photo_w), np.float32) if shot.table else np.ones((photo_h, photo_w),
                                                                                            np.float32)
        placed_cov[top: top + coverage.shape[0], left: left + coverage.shape[1]] = coverage
        if shot.table:
            placed_sheet[top: top + sheet.shape[0], left: left + sheet.shape[1]] = sheet
        coverage, sheet = placed_cov, placed_sheet
    elif not shot.table:
        sheet = np.ones_like(sheet)  # the paper fills the photo: a tilted sheet shows no table
    height, width = coverage.shape
    tint = np.array(shot.paper_tint, np.float32)
    paper = shot.paper_level * tint
    ink_rgb = np.array(shot.ink_colour if shot.ink_colour is not None else (shot.ink_level,) * 3, np.float32)
    table_rgb = np.array((shot.table_level,) * 3, np.float32) * np.array([1.0, 0.97, 0.9], np.float32)
    a = coverage[..., None]
    surface = sheet[..., None] * paper + (1 - sheet[..., None]) * table_rgb
    rgb = surface * (1 - a) + ink_rgb * a
    # Light: a gradient across the photo and a soft-edged shadow.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    gain = 1 + shot.gradient[0] * (xs / width - 0.5) + shot.gradient[1] * (ys / height - 0.5)
    if shot.shadow:
        nx, ny = np.cos(shot.shadow_angle), np.sin(shot.shadow_angle)
        along = (xs / width - 0.5) * nx + (ys / height - 0.5) * ny - (shot.shadow_at - 0.5)
        gain *= 1 - shot.shadow / (1 + np.exp(-along / 0.06))
    rgb = rgb * gain[..., None]
    if shot.blur:
        rgb = cv2.GaussianBlur(rgb, (0, 0), max(0.3, shot.blur * shot.subject_px))
    if shot.noise:
        rgb = rgb + rng.normal(0, shot.noise, rgb.shape).astype(np.float32)
    rgb8 = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    if shot.transparent:
        alpha = np.clip(coverage * 255 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(np.dstack([rgb8, alpha]), "RGBA")
        fmt = "PNG"
    else:
        image = Image.fromarray(rgb8, "RGB")
        fmt = shot.fmt
    options: dict[str, object] = {}
    if shot.orientation != 1:
        image = image.transpose(_STORE_FOR[shot.orientation])
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = shot.orientation
        options["exif"] = exif
    if fmt == "JPEG" or fmt == "WEBP":
        options["quality"] = shot.quality
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


# ----- the conditions -------------------------------------------------------------------------------

def _plain(rng: np.random.Generator, digits: bool) -> Shot:
    """Dark ink on white-ish paper filling the photo, a little tint and noise, JPEG 92: an easy photo."""
    return Shot(subject_px=rng.uniform(120, 260), paper_margin=rng.uniform(0.25, 0.6),
                paper_level=rng.uniform(200, 245), ink_level=rng.uniform(15, 70),
                paper_tint=tuple(rng.uniform(0.94, 1.0, 3)), noise=rng.uniform(0, 3),
                offset=tuple(rng.uniform(-0.2, 0.2, 2)))


def _table(shot: Shot, rng: np.random.Generator) -> None:
    shot.table = True
    shot.tilt = rng.uniform(-15, 15)
    # Another shade: a dark table under white paper, or a white table under grey paper.
    if rng.random() < 0.6:
        shot.table_level = rng.uniform(30, 140)
    else:
        shot.table_level = rng.uniform(235, 255)
        shot.paper_level = rng.uniform(150, 200)


def _lighting(shot: Shot, rng: np.random.Generator) -> None:
    shot.gradient = tuple(rng.uniform(-0.5, 0.5, 2))
    shot.shadow = rng.uniform(0.2, 0.45)
    shot.shadow_angle = rng.uniform(0, 2 * np.pi)
    shot.shadow_at = rng.uniform(0.2, 0.8)


def _small(shot: Shot, rng: np.random.Generator) -> None:
    shot.subject_px = rng.uniform(100, 160)
    shot.photo_scale = 1 / rng.uniform(0.1, 0.3) / (1 + 2 * shot.paper_margin)


def _colour(shot: Shot, rng: np.random.Generator) -> None:
    inks = [(20, 40, 160), (170, 20, 30), (20, 110, 50), (60, 30, 110), (0, 90, 170)]
    shot.ink_colour = tuple(float(v) for v in inks[int(rng.integers(0, len(inks)))])
    shot.paper_tint = (1.0, rng.uniform(0.9, 1.0), rng.uniform(0.75, 0.95))  # warm, yellowish paper


def _exif(shot: Shot, rng: np.random.Generator, index: int) -> None:
    shot.orientation = 1 + index % 8


def _off_centre(shot: Shot, rng: np.random.Generator) -> None:
    shot.paper_margin = rng.uniform(0.6, 1.2)
    shot.offset = tuple(rng.uniform(0.6, 0.95, 2) * rng.choice([-1, 1], 2))


def _blur(shot: Shot, rng: np.random.Generator) -> None:
    shot.blur = rng.uniform(0.01, 0.025)
    shot.fmt, shot.quality = "WEBP", 80


def _noise(shot: Shot, rng: np.random.Generator) -> None:
    shot.noise = rng.uniform(6, 16)


def _jpeg(shot: Shot, rng: np.random.Generator) -> None:
    shot.fmt, shot.quality = "JPEG", int(rng.integers(30, 91))


def _mixed(shot: Shot, rng: np.random.Generator, digits: bool, index: int) -> None:
    """Several conditions at once, as real photos come: each drawn with its own probability."""
    if rng.random() < 0.6:
        _table(shot, rng)
    else:
        shot.tilt = rng.uniform(-8, 8)
    if rng.random() < 0.5:
        _lighting(shot, rng)
        shot.shadow *= 0.6
    if rng.random() < 0.3 and not shot.table:
        _small(shot, rng)
    if digits and rng.random() < 0.4:
        shot.pen = float(rng.choice([0.4, 1.8, 2.4]))
    if rng.random() < 0.3:
        _colour(shot, rng)
    shot.noise = rng.uniform(2, 12)
    if rng.random() < 0.3:
        shot.blur = rng.uniform(0.005, 0.015)
    shot.fmt = str(rng.choice(["JPEG", "JPEG", "WEBP", "PNG"]))
    shot.quality = int(rng.integers(40, 91))
    if rng.random() < 0.3:
        shot.orientation = int(rng.integers(1, 9))


Condition = Callable[[np.random.Generator, bool, int], Shot]


def _condition(*steps: Callable[..., None]) -> Condition:
    def make(rng: np.random.Generator, digits: bool, index: int) -> Shot:
        shot = _plain(rng, digits)
        for step in steps:
            if step is _exif:
                step(shot, rng, index)
            elif step is _mixed:
                step(shot, rng, digits, index)
            else:
                step(shot, rng)
        return shot
    return make


def _pen(width: float) -> Callable[[Shot, np.random.Generator], None]:
    def step(shot: Shot, rng: np.random.Generator) -> None:
        shot.pen = width * rng.uniform(0.9, 1.1)
    return step


def _canvas(shot: Shot, rng: np.random.Generator) -> None:
    shot.canvas_pen = rng.uniform(8, 40) / 2  # a radius: the canvas's pen is 8–40 px wide


def _transparent(shot: Shot, rng: np.random.Generator) -> None:
    shot.transparent = True


# name → (what it is, how it is made, for digits only)
CONDITIONS: dict[str, tuple[str, Condition, bool]] = {
    "plain": ("dark ink on paper filling the photo, JPEG 92", _condition(), False),
    "table": ("paper on a darker or lighter table, edges visible, tilted up to ±15°", _condition(_table), False),
    "lighting": ("light falling off across the page and a soft shadow", _condition(_lighting), False),
    "small": ("the subject 10–30% of a large photo's width", _condition(_small), False),
    "thin_pen": ("strokes thinned to about 40% of MNIST's", _condition(_pen(0.4)), True),
    "thick_pen": ("strokes thickened to about 2.4× MNIST's", _condition(_pen(2.4)), True),
    "colour_ink": ("blue, red, green or purple ink on yellowish paper", _condition(_colour), False),
    "jpeg": ("JPEG quality 30–90", _condition(_jpeg), False),
    "rgba": ("RGBA PNG: the ink opaque, the paper transparent", _condition(_transparent), False),
    "exif": ("stored rotated or mirrored with EXIF orientation 1–8 (each as often)", _condition(_exif), False),
    "off_centre": ("the subject near a corner of a wide sheet", _condition(_off_centre), False),
    "blur": ("out of focus (Gaussian σ 1–2.5% of the subject), WebP 80", _condition(_blur), False),
    "noise": ("sensor noise σ 6–16 grey levels", _condition(_noise), False),
    "canvas": ("drawn on the playground's canvas: round strokes 8–40 px on 280×280", _condition(_canvas), True),
    "mixed": ("several of the above at once, each with its own chance", _condition(_mixed), False),
}


def conditions_for(dataset: str) -> list[str]:
    digits = dataset == "mnist"
    return [name for name, (_, _, digits_only) in CONDITIONS.items() if digits or not digits_only]


def render(pixels: np.ndarray, dataset: str, condition: str, seed: int, index: int) -> bytes:
    """The photo of one test image under one condition; the same arguments give the same bytes."""
    rng = np.random.default_rng([seed, list(CONDITIONS).index(condition), index])
    digits = dataset == "mnist"
    shot = CONDITIONS[condition][1](rng, digits, index)
    return photograph(pixels, shot, digits, rng)
