"""A shadow's edge across a photographed page: found so the paper's surface can follow it.

Why: the photo → frame step (``serving/image_to_tensor.py``) tells ink from paper against a smooth
surface fitted to the paper, a quadratic, which follows light falling off across a page but not the
edge of a shadow (a phone or a hand held over the page, the edge of a lamp's light). Beside such an edge
the quadratic is off by the shadow's depth, so the shadowed paper looks like ink: a product photographed
half in shadow was framed together with the shadow, or lost (measured on the photographed benchmark's
``lighting`` condition: 77% of clothes right against 92% on plain photos, the frames showing the shadow
as part of the subject). Digits were less hurt because their strokes leave paper everywhere, which a
cell-by-cell correction follows; a garment covers too much of the page for that.

How: a shadow's edge is modelled as a soft step, a logistic function of the distance to a straight line,
added to the quadratic. The page's paper is sampled on a 20 × 20 grid, leaving out ink (what is darker
than 55% of the brightest paper within a third of the picture: a shadow dims paper less than that).
Every line of a coarse grid (12 directions, 9 positions that leave at least a tenth of the page on each
side) is fitted by least squares trimmed to the 60% of the points the model fits best, so the subject's
faint parts do not pull the fit (least trimmed squares); the best line is refined on a finer grid of
directions, positions and softnesses around it, then once more. The step is kept only when it explains
most of what the quadratic could not (the trimmed error falls below 40% of the quadratic's), is deeper
than 12 grey levels and shallower than 70% of its light, leaves the light under it gently curved (a
step and a bowl fitted around a faint product are refused), is soft (a sharp step along the same line
must fit worse: the edge of a sheet on a table, or a product's straight side, is sharp), and leaves
paper that fits on both of its sides: a subject is not a half-plane, so a step drawn along a dark
product leaves the paper beside the product unexplained on its dark side and is refused.

Cost: a page the quadratic already fits (no shadow: 0.2 grey levels rms on the benchmark's plain photos)
pays one fit, about 2 ms; a search costs about 13 ms (measured on this 2-core machine while a test suite
shared it). Measured on the photographed benchmark (200 photos per condition, in process, the full-profile
models): clothes under ``lighting`` 77.0% → 88.5%, every other condition of both models unchanged or up.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

SAMPLE_SIDE = 20  # the page is sampled on a SAMPLE_SIDE × SAMPLE_SIDE grid for the search
TRIM = 0.6  # the share of the sample points each fit is judged on (the best fitting ones)
GAIN = 0.4  # a step is kept when its trimmed error is below GAIN × the quadratic's
MIN_DEPTH = 12.0  # grey levels: a shallower step is noise or a gradient the quadratic already follows
COARSE_ANGLES = 12  # directions of the edge, 15° apart (a step and its mirror image are the same line)
COARSE_POSITIONS = 9  # positions, at the 10th to 90th percentiles of the page along the edge's normal
COARSE_SOFTNESS = (0.04,)  # the logistic's scale, as a fraction of the picture
FINE_SOFTNESS = (0.015, 0.02, 0.04, 0.06, 0.1)
# An object's edge (a sheet on a table, a product's side) is sharp: a step this sharp along the found line fitting
# as well as the soft one says the "shadow" is such an edge.
SHARP = 0.003
INK_RATIO = 0.55  # darker than this share of the brightest paper nearby is ink, not shadow
# Paper the quadratic fits to within this share of its level (rms of the trimmed fit) has no edge worth a search:
# measured on the benchmark's photos, 0.2 grey levels for plain ones, 1.0 for noisy ones, 2–5 under a shadow.
QUIET = 0.006
# A shadow takes at most this share of the paper's light (deeper, the paper under it reads as ink anyway); a fit
# that says more has bent the surface around a faint subject.
MAX_DEPTH = 0.7
# The light under a shadow stays gentle: the quadratic's second-order coefficients (in units of the picture, centred)
# sum to at most this share of the paper's level (vignetting that darkens the corners by a quarter sums to 1.0).
# Measured: 0.01-0.6 under the benchmark's shadows; 4.6 where a step and a bowl had been fitted around a faint
# pullover on grey paper.
MAX_CURVATURE = 1.5


@dataclass(frozen=True)
class ShadowEdge:
    """A found edge: its step over the picture (0 on one side, 1 on the other) and the fitted paper."""

    step: np.ndarray  # float32 [H, W], 0..1
    paper: np.ndarray  # float32 [H, W]: the quadratic plus the step, as fitted in the search
    depth: float  # grey levels between the two sides at the picture's centre


def _coordinates(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in units of the picture's size, centred on it (u across, v down, each in −½..½)."""
    u = (np.arange(width, dtype=np.float64) + 0.5) / width - 0.5
    v = (np.arange(height, dtype=np.float64) + 0.5) / height - 0.5
    return u, v


def _quadratic(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=-1)


def _steps(u: np.ndarray, v: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """Logistic steps ``[K, N]`` at points (u, v) for lines ``[K, 3]`` of (angle, position, softness)."""
    along = np.cos(lines[:, :1]) * u[None] + np.sin(lines[:, :1]) * v[None]
    return 1.0 / (1.0 + np.exp(-np.clip((along - lines[:, 1:2]) / lines[:, 2:3], -60, 60)))


def _trimmed_fits(quadratic: np.ndarray, steps: np.ndarray, values: np.ndarray, rounds: int = 3
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least trimmed squares of ``values`` on the quadratic ``[N, 6]`` plus each of K steps ``[K, N]``:
    coefficients ``[K, 7]``, residuals ``[K, N]`` and each fit's error (mean square over its best TRIM).

    The normal equations of all K fits are built at once (the quadratic's products are shared). ``einsum``
    rather than ``@``: the products are small, and a threaded BLAS made the search three times slower when
    other work held the cores (measured on this 2-core machine: 55 ms against 20 ms per photo).
    """
    k, n = steps.shape
    pairs = np.einsum("ni,nj->nij", quadratic, quadratic).reshape(n, 36)
    weights = np.ones((k, n))
    keep = max(8, int(TRIM * n))
    for _ in range(rounds):
        weighted_steps = weights * steps
        gram = np.empty((k, 7, 7))
        gram[:, :6, :6] = np.einsum("kn,nf->kf", weights, pairs).reshape(k, 6, 6)
        gram[:, :6, 6] = gram[:, 6, :6] = np.einsum("kn,nf->kf", weighted_steps, quadratic)
        gram[:, 6, 6] = np.einsum("kn,kn->k", weighted_steps, steps)
        rhs = np.empty((k, 7))
        rhs[:, :6] = np.einsum("kn,nf->kf", weights, quadratic * values[:, None])
        rhs[:, 6] = np.einsum("kn,n->k", weighted_steps, values)
        coef = np.linalg.solve(gram + 1e-6 * np.eye(7), rhs[..., None])[..., 0]
        residual = values[None] - np.einsum("kf,nf->kn", coef[:, :6], quadratic) - coef[:, 6:] * steps
        cut = np.partition(np.abs(residual), keep - 1, axis=1)[:, keep - 1:keep]
        weights = (np.abs(residual) <= cut).astype(np.float64)
    error = (residual ** 2 * weights).sum(axis=1) / weights.sum(axis=1)
    return coef, residual, error


def find_shadow_edge(smooth: np.ndarray, region: np.ndarray) -> ShadowEdge | None:
    """The straight, soft shadow edge across ``region`` of a (smoothed, grey) picture of dark ink on light paper,
    or None when there is none."""
    height, width = smooth.shape
    u_all, v_all = _coordinates(height, width)
    rows = np.linspace(0, height - 1, min(SAMPLE_SIDE, height)).round().astype(int)
    cols = np.linspace(0, width - 1, min(SAMPLE_SIDE, width)).round().astype(int)
    grid_r, grid_c = np.meshgrid(rows, cols, indexing="ij")
    # Ink is left out of the search: what is darker than INK_RATIO of the brightest paper within a third of
    # the picture. A shadow dims paper by less than that; the print of a product or a pen's stroke by more.
    reach = max(3, round(max(height, width) / 3)) | 1
    brightest = cv2.dilate(np.where(region, smooth, 0).astype(np.float32), np.ones((reach, reach), np.uint8))
    inside = region[grid_r, grid_c] & (smooth[grid_r, grid_c] >= INK_RATIO * brightest[grid_r, grid_c])
    if inside.sum() < 64:
        return None
    r, c = grid_r[inside], grid_c[inside]
    u, v = u_all[c], v_all[r]
    values = smooth[r, c].astype(np.float64)
    quadratic = _quadratic(u, v)
    _, _, (plain_error,) = _trimmed_fits(quadratic, np.zeros((1, len(values))), values)
    if np.sqrt(plain_error) < QUIET * float(np.median(values)):
        return None  # the quadratic alone fits the paper to within its grain: nothing to find

    def search(lines: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        coef, residual, error = _trimmed_fits(quadratic, _steps(u, v, lines), values)
        best = int(np.argmin(error))
        return lines[best], coef[best], residual[best], float(error[best])

    angles = np.arange(COARSE_ANGLES) * np.pi / COARSE_ANGLES
    coarse = []
    for angle in angles:
        along = np.cos(angle) * u + np.sin(angle) * v
        for position in np.quantile(along, np.linspace(0.1, 0.9, COARSE_POSITIONS)):
            coarse += [(angle, position, softness) for softness in COARSE_SOFTNESS]
    line, coef, residual, error = search(np.array(coarse))
    if error >= GAIN * plain_error:
        return None
    angle, position, _ = line
    spacing = np.pi / COARSE_ANGLES
    fine = np.array([(angle + da, position + dp, s) for da in np.linspace(-spacing / 2, spacing / 2, 5)
                     for dp in np.linspace(-0.04, 0.04, 5) for s in FINE_SOFTNESS])
    line, coef, residual, error = search(fine)
    # A last look around the line found, every candidate fitted trimmed (the ranking can miss by a grid step).
    angle, position, softness = line
    polish = np.array([(angle + da, position + dp, softness * ds) for da in (-spacing / 8, 0, spacing / 8)
                       for dp in (-0.01, 0, 0.01) for ds in (0.7, 1.0, 1.4)])
    line, coef, residual, error = search(polish)
    depth = abs(float(coef[6]))
    level = float(np.median(values))
    if error >= GAIN * plain_error or not MIN_DEPTH <= depth <= MAX_DEPTH * level:
        return None
    if np.abs(coef[3:6]).sum() > MAX_CURVATURE * level:
        return None  # the quadratic bent around something under the step: a faint subject, not light
    _, _, _, sharp_error = search(np.array([[line[0], line[1], SHARP]]))
    if sharp_error <= error:
        return None
    # Both sides must be mostly paper the model explains (a dark product is not a half-plane).
    side = _steps(u, v, line[None])[0] > 0.5
    tolerance = max(3.0 * np.sqrt(error), 6.0)
    fits = np.abs(residual) <= tolerance
    if min(side.sum(), (~side).sum()) < 0.1 * len(side) or fits[side].mean() < 0.5 or fits[~side].mean() < 0.5:
        return None
    uu, vv = np.meshgrid(u_all, v_all)
    step = _steps(uu.ravel(), vv.ravel(), line[None])[0].reshape(height, width)
    paper = (_quadratic(uu, vv) @ coef[:6]) + coef[6] * step
    return ShadowEdge(step.astype(np.float32), paper.astype(np.float32), depth)
