"""The 15 corruptions of MNIST-C (Mu & Gilmer, 2019, arXiv:1906.02337), written from the paper's description.

Each takes a ``uint8 [28, 28]`` data set image (light on dark) and a NumPy generator and returns a
``uint8 [28, 28]`` image, so the corrupted set can be sent to ``/classify_pixels`` exactly as the data
set's own images are. Severities follow the paper's single fixed level where it gives one; where it
does not, the value chosen here is named beside the function. They are applied to Fashion-MNIST too.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Corruption = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _unit(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(np.asarray(x, np.float32) * 255.0 + 0.5), 0, 255).astype(np.uint8)


def _affine(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2×2 linear map about the frame's centre (bilinear, black outside)."""
    centre = np.array([13.5, 13.5])
    offset = centre - matrix @ centre
    full = np.hstack([matrix, offset[:, None]]).astype(np.float32)
    return cv2.warpAffine(image, full, (28, 28), flags=cv2.INTER_LINEAR, borderValue=0)


def _either_side(rng: np.random.Generator, low: float, high: float) -> float:
    """A magnitude in [low, high] with a random sign (the paper's "[-high, -low] ∪ [low, high]")."""
    return float(rng.uniform(low, high) * rng.choice([-1.0, 1.0]))


def shot_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poisson noise, as if 60 photons made a full-white pixel."""
    return _uint8(rng.poisson(_unit(image) * 60.0) / 60.0)


def impulse_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper on 7% of the pixels (half white, half black)."""
    x = _unit(image)
    hit = rng.random(x.shape) < 0.07
    salt = rng.random(x.shape) < 0.5
    return _uint8(np.where(hit, salt.astype(np.float32), x))


def glass_blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur (σ 0.7), pixels swapped with a random neighbour within 1 px twice, blurred again."""
    x = cv2.GaussianBlur(_unit(image), (0, 0), 0.7)
    for _ in range(2):
        for y in range(27, 0, -1):
            for xx in range(27, 0, -1):
                dy, dx = rng.integers(-1, 2, size=2)
                ny, nx = min(max(y + dy, 0), 27), min(max(xx + dx, 0), 27)
                x[y, xx], x[ny, nx] = x[ny, nx], x[y, xx]
    return _uint8(cv2.GaussianBlur(x, (0, 0), 0.7))


def motion_blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A straight camera shake: a line kernel of 7 px (Gaussian weights, σ 2.5) at an angle in ±45°."""
    angle = np.deg2rad(rng.uniform(-45, 45))
    taps = np.arange(-3, 4, dtype=np.float32)
    weights = np.exp(-(taps ** 2) / (2 * 2.5 ** 2))
    kernel = np.zeros((7, 7), np.float32)
    for t, w in zip(taps, weights, strict=True):
        kernel[int(round(3 + t * np.sin(angle))), int(round(3 + t * np.cos(angle)))] += w
    kernel /= kernel.sum()
    return _uint8(cv2.filter2D(_unit(image), -1, kernel, borderType=cv2.BORDER_CONSTANT))


def shear(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Horizontal or vertical shear by a factor in [0.2, 0.6] either way."""
    s = _either_side(rng, 0.2, 0.6)
    matrix = np.array([[1.0, s], [0.0, 1.0]]) if rng.random() < 0.5 else np.array([[1.0, 0.0], [s, 1.0]])
    return _affine(image, matrix)


def scale(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shrink to 0.5–0.8 or enlarge to 1.2–1.4 of the size."""
    factor = rng.uniform(0.5, 0.8) if rng.random() < 0.5 else rng.uniform(1.2, 1.4)
    return _affine(image, np.eye(2) * factor)


def rotate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotation by 20–50° either way."""
    angle = np.deg2rad(_either_side(rng, 20, 50))
    c, s = np.cos(angle), np.sin(angle)
    return _affine(image, np.array([[c, -s], [s, c]]))


def brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Everything 0.3 brighter (HSV value + 0.3 on a gray image), clipped."""
    return _uint8(np.clip(_unit(image) + 0.3, 0, 1))


def translate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A shift of 3–6 px along each axis, either way."""
    shift = np.array([_either_side(rng, 3, 6), _either_side(rng, 3, 6)])
    matrix = np.hstack([np.eye(2), shift[:, None]]).astype(np.float32)
    return cv2.warpAffine(image, matrix, (28, 28), flags=cv2.INTER_LINEAR, borderValue=0)


def stripe(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A vertical band 3–6 px wide with its pixels inverted."""
    x = _unit(image)
    width = int(rng.integers(3, 7))
    left = int(rng.integers(4, 24 - width))
    x[:, left:left + width] = 1.0 - x[:, left:left + width]
    return _uint8(x)


def _plasma(size: int, rng: np.random.Generator, roughness: float = 3.0) -> np.ndarray:
    """A diamond-square plasma fractal in 0..1 (the fog of ImageNet-C, which MNIST-C uses)."""
    grid = np.zeros((size + 1, size + 1), np.float64)
    step, amplitude = size, 100.0
    while step > 1:
        half = step // 2
        for y in range(0, size, step):
            for x in range(0, size, step):
                mean = (grid[y, x] + grid[y + step, x] + grid[y, x + step] + grid[y + step, x + step]) / 4
                grid[y + half, x + half] = mean + rng.uniform(-amplitude, amplitude)
        for y in range(0, size + 1, half):
            for x in range((y + half) % step, size + 1, step):
                around = [grid[y2, x2] for y2, x2 in ((y - half, x), (y + half, x), (y, x - half), (y, x + half))
                          if 0 <= y2 <= size and 0 <= x2 <= size]
                grid[y, x] = np.mean(around) + rng.uniform(-amplitude, amplitude)
        step, amplitude = half, amplitude / roughness
    grid = grid[:size, :size]
    return (grid - grid.min()) / max(grid.max() - grid.min(), 1e-9)


def fog(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Plasma-fractal fog (strength 1.5, as ImageNet-C's middle severity), renormalised to the image's peak."""
    x = _unit(image)
    peak = float(x.max()) or 1.0
    x = x + 1.5 * _plasma(32, rng)[:28, :28]
    return _uint8(np.clip(x * peak / (peak + 1.5), 0, 1))


def spatter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Liquid spatter: blurred random noise thresholded into blobs, added as grey splashes."""
    x = _unit(image)
    liquid = cv2.GaussianBlur(rng.normal(0.65, 0.3, x.shape).astype(np.float32), (0, 0), 1.2)
    blobs = np.clip((liquid - 0.68) * 6.0, 0, 1)
    return _uint8(np.clip(x + 0.8 * blobs, 0, 1))


def _border_point(rng: np.random.Generator) -> tuple[int, int]:
    side = int(rng.integers(0, 4))
    t = int(rng.integers(0, 28))
    return [(t, 0), (t, 27), (0, t), (27, t)][side]


def dotted_line(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A straight line of white dots, every 3 px, from one border to another."""
    x = image.copy()
    (x0, y0), (x1, y1) = _border_point(rng), _border_point(rng)
    length = max(abs(x1 - x0), abs(y1 - y0), 1)
    for t in np.linspace(0, 1, length + 1)[::3]:
        x[int(round(y0 + t * (y1 - y0))), int(round(x0 + t * (x1 - x0)))] = 255
    return x


def zigzag(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A white zigzag of 3–6 straight segments across the frame."""
    x = image.copy()
    count = int(rng.integers(4, 8))
    xs = np.linspace(rng.uniform(0, 6), rng.uniform(21, 27), count)
    ys = np.clip(rng.uniform(4, 24) + np.where(np.arange(count) % 2 == 0, -1, 1) * rng.uniform(3, 8, count), 0, 27)
    if rng.random() < 0.5:  # vertical zigzags as often as horizontal ones
        xs, ys = ys, xs
    cv2.polylines(x, [np.round(np.stack([xs, ys], 1)).astype(np.int32)], False, 255, 1, lineType=cv2.LINE_AA)
    return x


def canny_edges(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Only the edges (Canny, thresholds 50/150 on 0..255) remain."""
    return cv2.Canny(image, 50, 150)


MNIST_C: dict[str, Corruption] = {
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "shear": shear,
    "scale": scale,
    "rotate": rotate,
    "brightness": brightness,
    "translate": translate,
    "stripe": stripe,
    "fog": fog,
    "spatter": spatter,
    "dotted_line": dotted_line,
    "zigzag": zigzag,
    "canny_edges": canny_edges,
}


def corrupt(images: np.ndarray, name: str, seed: int) -> np.ndarray:
    """Apply one corruption to every image of ``uint8 [N, 28, 28]``; the same seed gives the same set."""
    rng = np.random.default_rng([seed, list(MNIST_C).index(name)])
    return np.stack([MNIST_C[name](image, rng) for image in images])
